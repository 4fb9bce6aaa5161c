"""Each extension is one file: a criterion, a structured score or a command registered in one place is what
the API, both commands and the bench take (the re-fit's own test: tests/core/test_refit_registry.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import relprune
import relprune.cli
from relprune.cli.main import build_parser, main
from relprune.core.criteria import CRITERIA
from relprune.core.recipe import Recipe
from relprune.core.units import GROUP_SCORES, register_group_score, score_names
from relprune.deploy.graph import DependencyGraph
from relprune.deploy.groups import group_scores
from relprune.experiments.bench import BenchConfig
from relprune.experiments.experiment import Method


@pytest.fixture
def toy_criterion():
    """Scores every weight by its column index: the last columns are kept, easy to check by hand."""

    @relprune.register("toy-columns", description="test only")
    def score(weight, stats, opts):
        return torch.arange(weight.shape[1], dtype=torch.float64).expand(weight.shape[0], -1).clone()

    yield "toy-columns"
    del CRITERIA["toy-columns"]


@pytest.fixture
def toy_score():
    """Scores every channel by its index in the group, from the producing rows: the last ones are kept."""

    @register_group_score("toy-index")
    def score(module, member, size, stats):
        if member.role != "out":
            return torch.zeros(size, dtype=torch.float64)
        return torch.arange(size, dtype=torch.float64)

    yield "toy-index"
    del GROUP_SCORES["toy-index"]


def _llm_args(*extra: str) -> list[str]:
    return ["llm", "prune", "--model", "m", "--sparsity", "0.5", "--calibration", "c", "--out", "o", *extra]


def test_a_registered_criterion_reaches_prune_the_recipe_labels_the_bench_and_both_commands(toy_criterion):
    model = nn.Sequential(nn.Linear(4, 3))
    masks = relprune.prune(model, None, sparsity=0.5, scope="row", criterion=toy_criterion)
    assert masks["0"].tolist() == [[False, False, True, True]] * 3
    assert Recipe.build(criterion=toy_criterion, sparsity=0.5).criterion == toy_criterion
    method = Method.parse(f"{toy_criterion} [row]")
    assert method.criterion == toy_criterion and Method.parse(method.label) == method
    BenchConfig(criteria=[toy_criterion]).validate()
    with pytest.raises(relprune.RelpruneError, match="toy-rows"):
        BenchConfig(criteria=["toy-rows"]).validate()
    parser = build_parser()
    assert parser.parse_args(["prune", "--checkpoint", "x", "--criterion", toy_criterion, "--out", "o"]).criterion \
        == toy_criterion
    assert parser.parse_args(_llm_args("--criterion", toy_criterion)).criterion == toy_criterion


def test_a_registered_structured_score_reaches_the_graph_the_decoder_units_and_both_commands(toy_score):
    assert toy_score in score_names(gradients=False)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    graph = DependencyGraph(net, torch.zeros(1, 5))
    (scores,) = group_scores(graph, None, toy_score).values()
    assert scores.tolist() == list(range(6))
    transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")
    from relprune.llm.structured import unit_scores

    cfg = transformers.LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    units = unit_scores(transformers.LlamaForCausalLM(cfg).eval(), None, toy_score)
    # A head group lives in q (2 query heads), k and v: three producing members, each adding its index.
    assert units[0, "heads"].tolist() == [0.0, 3.0] and units[1, "mlp"].tolist() == [2.0 * i for i in range(24)]
    parser = build_parser()
    assert parser.parse_args(["export", "--structured", "0.5", "--score", toy_score]).score == toy_score
    assert parser.parse_args(["llm", "shrink", "--model", "m", "--ratio", "0.3", "--calibration", "c", "--out", "o",
                              "--score", toy_score]).score == toy_score
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--structured", "0.5", "--score", "toy-rank"])


def test_a_command_is_one_module_of_the_cli_package(tmp_path, monkeypatch, capsys):
    (tmp_path / "toy_command.py").write_text(
        "def add_commands(sub):\n"
        "    p = sub.add_parser('toy', help='test only')\n"
        "    p.add_argument('--times', type=int, default=1)\n"
        "    p.set_defaults(func=lambda ns: print('toy ' * ns.times) or 0)\n")
    monkeypatch.setattr(relprune.cli, "__path__", [*relprune.cli.__path__, str(tmp_path)])
    try:
        assert main(["toy", "--times", "2"]) == 0
        assert capsys.readouterr().out.strip() == "toy toy"
        commands = build_parser()._subparsers._group_actions[0].choices
        assert {"toy", "prune", "llm", "bench"} <= set(commands)
    finally:
        sys.modules.pop("relprune.cli.toy_command", None)
