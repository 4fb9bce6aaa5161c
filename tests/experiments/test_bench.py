"""Sweeps: resumable, refuse mixed settings, write the three outputs."""

from __future__ import annotations

import json

import pytest

from relprune.errors import RelpruneError
from relprune.experiments.bench import TIMING_FIELDS, BenchConfig, cells, run_bench
from relprune.experiments.experiment import Method
from relprune.experiments.report import load_results, markdown_tables


def tiny_config(**kw):
    base = dict(models=["lenet300:digits"], criteria=["rc", "magnitude"], sparsities=[0.5, 0.8], seeds=[0],
                regimes=["oneshot", "finetune"], calib_samples=[128], epochs=2, batch_size=64,
                finetune_epochs=1, max_train_samples=400)
    base.update(kw)
    return BenchConfig(**base)


def _comparable(path):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in load_results(path)]


class Interrupt(Exception):
    pass


def test_interrupted_sweep_resumes_to_the_same_results(tmp_path):
    cfg = tiny_config()
    straight = run_bench(cfg, tmp_path / "a", log=lambda *_: None)

    count = {"n": 0}

    def stop_after_three(msg):
        if " acc " in msg:
            count["n"] += 1
            if count["n"] == 3:
                raise Interrupt

    with pytest.raises(Interrupt):
        run_bench(cfg, tmp_path / "b", log=stop_after_three)
    assert len(load_results(tmp_path / "b" / "results.jsonl")) == 3
    with (tmp_path / "b" / "results.jsonl").open("a") as fh:
        fh.write('{"torn": ')  # a write cut short by the interruption
    resumed = run_bench(cfg, tmp_path / "b", log=lambda *_: None)
    assert _comparable(resumed) == _comparable(straight)
    assert len(_comparable(straight)) == len(list(cells(cfg))) == 8
    for name in ("report.md", "accuracy_vs_sparsity.png"):
        assert (tmp_path / "b" / name).stat().st_size > 0
    text = (tmp_path / "b" / "report.md").read_text()
    assert "lenet300 on digits, finetune" in text and "**" in text


def test_rerun_skips_finished_cells(tmp_path):
    cfg = tiny_config(regimes=["oneshot"], sparsities=[0.5])
    run_bench(cfg, tmp_path, log=lambda *_: None)
    msgs = []
    run_bench(cfg, tmp_path, log=msgs.append)
    assert msgs[0].startswith("2 cells finished before, 0 to run")


def test_other_settings_are_refused(tmp_path):
    run_bench(tiny_config(regimes=["oneshot"], sparsities=[0.5]), tmp_path, log=lambda *_: None)
    with pytest.raises(RelpruneError, match=r"different settings.*epochs"):
        run_bench(tiny_config(regimes=["oneshot"], sparsities=[0.5], epochs=3), tmp_path, log=lambda *_: None)


def test_config_file_and_validation(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('models = ["lenet5:mnist"]\nsparsities = [0.9]\n')
    cfg = BenchConfig.from_file(path)
    assert cfg.models == ["lenet5:mnist"] and cfg.sparsities == [0.9]
    path.write_text("colour = 1\n")
    with pytest.raises(RelpruneError, match="unknown settings"):
        BenchConfig.from_file(path)
    with pytest.raises(RelpruneError):
        tiny_config(regimes=["twice"]).validate()
    with pytest.raises(RelpruneError):
        tiny_config(criteria=["nope"]).validate()


def test_method_grid_and_table():
    cfg = tiny_config(criteria=["rc", "magnitude"], liveness=[True, False], bias_compensation=[False, True],
                      n_m=["2:4"])
    labels = [m.label for m in cfg.methods()]
    assert "rc -live +bc" in labels and "magnitude 2:4" in labels and labels.count("magnitude") == 1
    rows = [{"model": "m", "dataset": "d", "regime": "oneshot", "calib_samples": 1, "pat": "none",
             "pat_alpha": 0.0, "method": meth, "sparsity": 0.5, "accuracy": acc, "seed": seed,
             "dense_accuracy": 0.9}
            for meth, acc in (("a", 0.8), ("b", 0.7)) for seed in (0, 1)]
    table = markdown_tables(rows)
    assert "| a | **80.00 ± 0.00** |" in table and "| b | 70.00 ± 0.00 |" in table
    assert json.dumps(rows)


def test_method_labels_parse_back_to_the_same_method():
    from relprune.experiments.experiment import Method

    cfg = tiny_config(criteria=["rc", "wanda", "magnitude", "rc-ucb", "obs"], liveness=[True, False],
                      bias_compensation=[False, True], reconstruct=[False, True], scopes=["global", "row"],
                      n_m=["2:4"], ucb_k=[1.0, 2.0])
    methods = cfg.methods()
    assert len(methods) > 20
    for m in methods:
        assert Method.parse(m.label) == m, m.label
    assert Method.parse("wanda -live [row]") == Method("wanda", "row", False)
    assert not any(m.bias_compensation and m.reconstruct for m in methods)
    for bad in ("", "nope", "rc +bc +refit", "rc [row] sideways"):
        with pytest.raises(RelpruneError):
            Method.parse(bad)


def test_extra_methods_gradual_regime_and_early_stopped_finetune(tmp_path):
    cfg = tiny_config(criteria=["magnitude"], methods_extra=["wanda -live [row]", "rc +refit"],
                      regimes=["gradual", "finetune"], sparsities=[0.8], finetune_epochs=3, finetune_patience=1,
                      gradual_steps=3)
    rows = load_results(run_bench(cfg, tmp_path, log=lambda *_: None))
    assert {r["method"] for r in rows} == {"magnitude", "wanda -live [row]", "rc +refit"}
    assert {r["regime"] for r in rows} == {"gradual", "finetune"}
    for r in rows:
        assert r["achieved_sparsity"] == pytest.approx(0.8, abs=0.01)
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["finetune_patience"] == 1 and settings["gradual_steps"] == 3
    # Cells of methods without a re-fit keep the keys they had before re-fits existed.
    assert all(("m_reconstruct" in r["key"]) == ("+refit" in r["method"]) for r in rows)


def test_dense_models_remember_their_recipe_and_unknown_pairs_are_refused(tmp_path, monkeypatch):
    from relprune.experiments import recipes
    from relprune.experiments.training import TrainConfig

    with pytest.raises(RelpruneError, match="no converged recipe for lenet300:digits"):
        run_bench(tiny_config(dense_recipe="converged"), tmp_path / "x", log=lambda *_: None)
    with pytest.raises(RelpruneError, match="dense_recipe"):
        tiny_config(dense_recipe="long").validate()
    assert "dense_recipe" not in tiny_config().settings()  # folders from before the option stay valid
    monkeypatch.setitem(recipes.CONVERGED, ("lenet300", "digits"), TrainConfig(epochs=2, batch_size=64))
    cfg = tiny_config(dense_recipe="converged", regimes=["oneshot"], sparsities=[0.5])
    run_bench(cfg, tmp_path / "y", log=lambda *_: None)
    monkeypatch.setitem(recipes.CONVERGED, ("lenet300", "digits"), TrainConfig(epochs=3, batch_size=64))
    with pytest.raises(RelpruneError, match="trained with another recipe \\(epochs differ\\)"):
        run_bench(tiny_config(dense_recipe="converged", regimes=["oneshot"], sparsities=[0.8]), tmp_path / "y",
                  log=lambda *_: None)


def test_every_refit_a_recipe_can_take_is_a_bench_method(tmp_path):
    """reconstruct = [false, true, "exact", "obs"] in a config and in --reconstruct: labels, parse and recipes agree."""
    from relprune.cli.main import build_parser
    from relprune.experiments.bench import BenchConfig
    from relprune.experiments.experiment import Method

    config = tmp_path / "c.toml"
    config.write_text('criteria = ["wanda"]\nreconstruct = [false, true, "exact", "obs"]\n')
    cfg = BenchConfig.from_file(config)
    cfg.validate()
    methods = cfg.methods()
    assert [m.label for m in methods] == ["wanda", "wanda +refit", "wanda +obs"]
    assert [m.recipe(0.5).reconstruct for m in methods] == [None, "exact", "obs"]
    assert all(Method.parse(m.label) == m for m in methods)
    assert all("input_gram" in m.statistics() for m in methods[1:])
    ns = build_parser().parse_args(["bench", "--reconstruct", "false,obs"])
    assert ns.reconstruct == [False, "obs"]
    config.write_text('reconstruct = ["sweep"]\n')
    with pytest.raises(RelpruneError, match="reconstruct takes"):
        BenchConfig.from_file(config).validate()


ROUND_TRIP = [
    # (label, the recipe it must name at a sweep sparsity of 0.5)
    ("rc", dict(criterion="rc", sparsity=0.5, scope="global")),
    ("rc t=0.5", dict(criterion="rc", threshold=0.5, scope="global")),
    ("contrib-share +refit t=0.25", dict(criterion="contrib-share", threshold=0.25, scope="global",
                                         reconstruct="exact")),
    ("wanda +refine [row]", dict(criterion="wanda", sparsity=0.5, scope="row", refine=True)),
    ("wanda +refine +refit 2:4", dict(criterion="wanda", n_m="2:4", scope="global", refine=True,
                                      reconstruct="exact")),
    ("obs +obs [layer]", dict(criterion="obs", sparsity=0.5, scope="layer", reconstruct="obs")),
    ("rc-ucb -live +bc k=2 [row]", dict(criterion="rc-ucb", sparsity=0.5, scope="row", bias_compensation=True,
                                        options={"ucb_k": 2.0})),
    ("admm", dict(criterion="admm", sparsity=0.5)),
    ("sparsegpt +refit 2:4", dict(criterion="sparsegpt", n_m="2:4", reconstruct="exact")),
]


@pytest.mark.parametrize("label,recipe", ROUND_TRIP)
def test_every_recipe_round_trips_through_a_bench_label_its_cells_and_the_prune_flags(label, recipe):
    """A recipe the Python API can build is a bench method: its label parses back to it, a sweep's cell
    rebuilds the same method, and `relprune prune`'s flags spell the same method."""
    from relprune.cli.flags import from_args
    from relprune.cli.main import build_parser
    from relprune.cli.vision import MethodArgs, PruneArgs, method_of
    from relprune.core.recipe import Recipe
    from relprune.experiments.experiment import Method

    method = Method.parse(label)
    assert method.label == label
    assert method.recipe(0.5) == Recipe.build(**recipe)
    cfg = tiny_config(criteria=[], methods_extra=[label], regimes=["oneshot"])
    cfg.validate()
    (cell,) = [c for c in cells(cfg) if c["sparsity"] in (0.5, None) or method.n_m]
    assert Method(**{k[2:]: v for k, v in cell.items() if k.startswith("m_")}) == method
    flags = ["prune", "--criterion", method.criterion, "--scope", method.scope]
    flags += [] if method.liveness else ["--no-liveness"]
    flags += ["--bias-compensation"] if method.bias_compensation else []
    flags += ["--refine"] if method.refine else []
    flags += ["--ucb-k", str(method.ucb_k)]
    flags += ["--reconstruct", {True: "exact", "obs": "obs", False: "none"}[method.reconstruct]]
    if method.n_m:
        flags += ["--n-m", method.n_m]
    elif method.threshold is not None:
        flags += ["--threshold", str(method.threshold)]
    else:
        flags += ["--sparsity", "0.5"]
    ns = build_parser().parse_args(flags)
    p = from_args(PruneArgs, ns)
    assert method_of(from_args(MethodArgs, ns), p, {"exact": True, "none": False, "obs": "obs"}[p.reconstruct]) \
        == method


def test_a_threshold_method_runs_in_a_sweep_and_reports_the_sparsity_it_reached(tmp_path):
    cfg = tiny_config(criteria=[], methods_extra=["rc t=0.5"], regimes=["oneshot"], sparsities=[0.5])
    run_bench(cfg, tmp_path / "t", log=lambda *_: None)
    (row,) = load_results(tmp_path / "t" / "results.jsonl")
    assert row["sparsity"] == pytest.approx(row["achieved_sparsity"], abs=1e-6) and 0 < row["sparsity"] < 1
    assert json.loads(row["key"])["sparsity"] is None
    run_bench(cfg, tmp_path / "t", log=lambda *_: None)  # resumes: nothing to run again
    assert len(load_results(tmp_path / "t" / "results.jsonl")) == 1
    with pytest.raises(RelpruneError, match="no sparsity schedule"):
        tiny_config(criteria=[], methods_extra=["rc t=0.5"], regimes=["gradual"]).validate()
    with pytest.raises(RelpruneError, match="one budget"):
        Method.parse("rc t=0.5 2:4")
    with pytest.raises(RelpruneError, match="needs a number"):
        Method.parse("rc t=half")
