"""Statistics against the per-sample reference, across layer kinds, conv settings and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import relprune
from reference import reference_stats, to_rows
from relprune import StatisticNotCollectedError

STATS = ["contribution_mean", "contribution_std", "abs_contribution_mean", "relative_mean",
         "relative_std", "input_sq_mean"]

# (layer factory, input shape)
LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (6, 7)),
    "linear-nobias": (lambda: nn.Linear(7, 5, bias=False), (6, 7)),
    "linear-tokens": (lambda: nn.Linear(4, 6), (2, 3, 4)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (2, 3, 11)),
    "conv1d-depthwise-same": (lambda: nn.Conv1d(3, 6, 3, padding="same", dilation=2, groups=3), (2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, padding=1), (2, 3, 6, 6)),
    "conv2d-stride": (lambda: nn.Conv2d(3, 4, 3, stride=2), (2, 3, 7, 8)),
    "conv2d-dilation": (lambda: nn.Conv2d(2, 4, 3, dilation=2, padding=2), (2, 2, 7, 7)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 6, (2, 3), groups=2, stride=(1, 2)), (2, 4, 5, 7)),
    "conv2d-depthwise": (lambda: nn.Conv2d(4, 8, 3, groups=4, padding=1, bias=False), (2, 4, 5, 5)),
    "conv2d-same-even": (lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 2, 6, 5)),
    "conv2d-reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 2, 5, 5)),
    "conv2d-circular": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular", bias=False), (2, 2, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1), (2, 2, 4, 4, 3)),
}


def _batches(shape, count=3, dtype=torch.float64, offset=0.0):
    return [torch.randn(shape, dtype=dtype) + offset for _ in range(count)]


def _assert_matches(stats, ref, rtol=1e-6, atol=1e-10):
    torch.testing.assert_close(stats.live_count, ref["live_count"], rtol=0, atol=0)
    assert stats.total_count == int(ref["total_count"])
    for name in STATS:
        ours, theirs = getattr(stats, name), ref[name]
        if name.endswith("_std"):
            # A variance that is exactly zero comes out as rounding noise of the
            # sum-of-squares form; its square root would hide a correct variance.
            ours, theirs = ours**2, theirs**2
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol**1.5, msg=name)


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("liveness", [True, False])
def test_statistics_match_per_sample_reference(kind, liveness):
    factory, shape = LAYERS[kind]
    layer = factory().double()
    model = nn.Sequential(layer, nn.ReLU())
    xs = _batches(shape, offset=0.3)
    stats = relprune.collect_stats(model, xs, liveness=liveness)
    ref = reference_stats(layer, xs, (lambda z: z > 0) if liveness else None)
    _assert_matches(stats["0"], ref)


@pytest.mark.parametrize("kind", ["linear", "conv2d-groups"])
def test_float32_model_close_to_float64_reference(kind):
    factory, shape = LAYERS[kind]
    layer = factory()
    xs = _batches(shape, dtype=torch.float32, offset=5.0)  # a large mean tests the shifted variance
    stats = relprune.collect_stats(nn.Sequential(layer, nn.ReLU()), xs)
    ref = reference_stats(layer.double(), [x.double() for x in xs], lambda z: z > 0)
    for name in STATS:
        torch.testing.assert_close(getattr(stats["0"], name), ref[name], rtol=2e-4, atol=1e-5, msg=name)


@settings(max_examples=15, deadline=None)
@given(
    in_ch=st.integers(1, 3), groups=st.sampled_from([1, 2]), out_per_group=st.integers(1, 3),
    k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
    bias=st.booleans(), size=st.integers(5, 7), seed=st.integers(0, 10_000),
)
def test_conv2d_random_settings(in_ch, groups, out_per_group, k, stride, padding, dilation, bias, size, seed):
    torch.manual_seed(seed)
    layer = nn.Conv2d(in_ch * groups, out_per_group * groups, k, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=bias).double()
    xs = _batches((2, in_ch * groups, size, size), count=2)
    stats = relprune.collect_stats(nn.Sequential(layer, nn.ReLU()), xs)
    _assert_matches(stats["0"], reference_stats(layer, xs, lambda z: z > 0))


def test_blind_range_of_hardtanh_and_relu6():
    layer = nn.Linear(5, 8).double()
    xs = _batches((20, 5), offset=0.0)
    for act, live in [(nn.ReLU6(), lambda z: (z > 0) & (z < 6)),
                      (nn.Hardtanh(-0.5, 0.5), lambda z: (z > -0.5) & (z < 0.5))]:
        stats = relprune.collect_stats(nn.Sequential(layer, act), xs)
        _assert_matches(stats["0"], reference_stats(layer, xs, live))


def test_smooth_activation_has_no_blind_range():
    layer = nn.Linear(5, 4).double()
    xs = _batches((10, 5))
    stats = relprune.collect_stats(nn.Sequential(layer, nn.GELU()), xs)
    assert stats["0"].liveness is None
    _assert_matches(stats["0"], reference_stats(layer, xs, None))


class ConvBNReLU(nn.Module):
    """A custom module: BN sits between the conv and a functional ReLU; attribute order differs."""

    def __init__(self):
        super().__init__()
        self.act = nn.Identity()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        h = F.relu(self.drop(self.act(self.bn(self.conv(x)))), inplace=True)
        return self.head(h.flatten(1))


def test_liveness_through_batchnorm_in_custom_module():
    model = ConvBNReLU().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(-1, 1)  # a negative scale flips which side is blind
        model.bn.bias.uniform_(-1, 1)
    model.train()
    xs = _batches((3, 2, 5, 5))
    stats = relprune.collect_stats(model, xs)
    assert model.training and model.bn.training, "modes are restored"
    bn = model.bn

    def live(z):
        post = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        return post > 0

    _assert_matches(stats["conv"], reference_stats(model.conv, xs, live))
    assert stats["conv"].liveness == "relu(0, inf)"
    assert stats["head"].liveness is None


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        return torch.relu(h + self.b(torch.relu(h)))


def test_output_used_beyond_activation_is_always_live():
    model = Residual().double()
    stats = relprune.collect_stats(model, _batches((8, 4)))
    assert stats["a"].liveness is None  # h also feeds the residual add
    assert stats["b"].liveness is None  # b's output goes into an add first
    assert torch.all(stats["a"].live_count == 24)


def test_user_override_per_layer():
    layer = nn.Linear(5, 4).double()
    model = nn.Sequential(layer, nn.ReLU())
    xs = _batches((10, 5))
    stats = relprune.collect_stats(model, xs, blind_ranges={"0": None})
    assert stats["0"].liveness is None
    stats = relprune.collect_stats(model, xs, blind_ranges={"0": relprune.BlindRange(0.2, 1.0)})
    _assert_matches(stats["0"], reference_stats(layer, xs, lambda z: (z > 0.2) & (z < 1.0)))


def test_merge_equals_one_pass():
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    model = nn.Sequential(layer, nn.ReLU())
    xs = _batches((2, 3, 5, 5), count=4, offset=1.0)
    both = relprune.collect_stats(model, xs)
    merged = relprune.collect_stats(model, xs[:1]) + relprune.collect_stats(model, [x * 3 for x in xs[1:2]] and xs[1:])
    _assert_matches(merged["0"], reference_stats(layer, xs, lambda z: z > 0))
    for name in STATS:
        torch.testing.assert_close(getattr(merged["0"], name), getattr(both["0"], name), rtol=1e-9, atol=1e-12)


def test_save_load_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    stats = relprune.collect_stats(model, _batches((6, 5)))
    stats.save(tmp_path / "s.safetensors")
    back = relprune.Stats.load(tmp_path / "s.safetensors")
    assert back.keys() == stats.keys() and back.liveness
    for layer in stats:
        for name in STATS:
            torch.testing.assert_close(getattr(back[layer], name), getattr(stats[layer], name))


def test_a_changed_statistics_file_is_refused_unless_verification_is_off(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    path = tmp_path / "s.safetensors"
    relprune.collect_stats(model, _batches((6, 5))).save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # written whole, no temporary file left
    with safe_open(str(path), framework="pt") as fh:
        metadata, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    key = next(k for k in tensors if "sum." in k)
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(relprune.IntegrityError, match="changed since relprune wrote it"):
        relprune.Stats.load(path)
    relprune.Stats.load(path, verify=False)


def test_only_requested_statistics_are_gathered():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
    stats = relprune.collect_stats(model, _batches((6, 5), dtype=torch.float32), statistics=["relative_mean"])
    assert set(stats["0"].sums) == {"r1"}
    stats["0"].relative_mean  # noqa: B018 - available
    with pytest.raises(StatisticNotCollectedError, match="contribution_std"):
        stats["0"].contribution_std  # noqa: B018


def test_weight_grad_matches_autograd():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    stats = relprune.collect_stats(model, [(x, y)])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(stats["2"].weight_grad, model[2].weight.grad)
    assert all(p.requires_grad for p in model.parameters())


def test_rows_helper_is_consistent():
    layer = nn.Conv2d(2, 3, 3).double()
    y = layer(torch.randn(2, 2, 5, 5, dtype=torch.float64))
    assert to_rows(layer, y).shape == (2 * 3 * 3, 3)


@pytest.mark.parametrize("bad", [
    torch.randn(4, 7),                                   # wrong width
    torch.randn(4, 3, 5),                                # wrong rank for this Linear chain
    torch.randn(4, 6, dtype=torch.float64),              # wrong dtype
    torch.randint(0, 3, (4, 6)),                         # integer input
])
def test_batches_that_do_not_fit_raise_calibration_error(bad):
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(relprune.CalibrationError, match=r"batch 1 \(shape"):
        relprune.collect_stats(model, [torch.randn(4, 6), bad])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks for m in model.modules())


def test_labels_that_do_not_fit_raise_calibration_error():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(relprune.CalibrationError, match="loss failed"):
        relprune.collect_stats(model, [(torch.randn(4, 6), torch.randint(0, 2, (3,)))],
                               statistics=["weight_grad"])


def test_input_moments_of_layers_without_liveness_are_kept_as_one_row():
    torch.manual_seed(0)
    gelu = nn.Sequential(nn.Linear(6, 40), nn.GELU(), nn.Linear(40, 3))
    relu = nn.Sequential(nn.Linear(6, 40), nn.ReLU(), nn.Linear(40, 3))
    data = [torch.randn(8, 6) for _ in range(3)]
    lean = relprune.collect_stats(gelu, data, statistics=["contribution_std", "abs_contribution_mean"])
    assert lean["0"].sums["s1"].shape == (1, 6) and lean["0"].sums["sa"].shape == (1, 6)
    assert lean["0"].contribution_std.shape == (40, 6)
    full = relprune.collect_stats(relu, data, statistics=["contribution_std"])
    assert full["0"].sums["s1"].shape == (40, 6)  # live samples differ per neuron: weight-shaped
    merged = lean + relprune.collect_stats(gelu, data[:1], statistics=["contribution_std", "abs_contribution_mean"])
    both = relprune.collect_stats(gelu, data + data[:1], statistics=["contribution_std", "abs_contribution_mean"])
    torch.testing.assert_close(merged["0"].contribution_std, both["0"].contribution_std)


@pytest.mark.parametrize("act, traced_batches", [(nn.GELU, 1), (nn.ReLU, 3)])
def test_liveness_tracing_stops_after_one_batch_when_nothing_has_a_blind_range(monkeypatch, act, traced_batches):
    from relprune.core import liveness

    entered = []
    original = liveness.LivenessTracer.__enter__

    def counting(self):
        entered.append(1)
        return original(self)

    monkeypatch.setattr(liveness.LivenessTracer, "__enter__", counting)
    model = nn.Sequential(nn.Linear(4, 8), act(), nn.Linear(8, 2))
    relprune.collect_stats(model, [torch.randn(5, 4) for _ in range(3)], statistics=["contribution_std"])
    assert len(entered) == traced_batches


@pytest.mark.parametrize("kind", ["linear", "linear-tokens", "conv2d", "conv2d-groups", "conv1d-depthwise-same"])
@pytest.mark.parametrize("liveness", [True, False])
@pytest.mark.parametrize("signed_batch", [None, 0, 2, 20])
def test_non_negative_inputs_match_the_reference_also_when_a_signed_batch_comes_later(kind, liveness,
                                                                                    signed_batch):
    # Non-negative inputs take a shorter path (sum |x| from sum x, no |x| copy) until the first
    # signed batch; after FLUSH_EVERY batches the pending sums have been flushed once.
    from relprune.core.collect import FLUSH_EVERY

    torch.manual_seed(1)
    factory, shape = LAYERS[kind]
    layer = factory().double()
    count = FLUSH_EVERY + 6
    xs = [torch.rand(shape, dtype=torch.float64) + 0.1 * (i % 3) for i in range(count)]
    if signed_batch is not None:
        xs[signed_batch] = xs[signed_batch] - 0.5
    stats = relprune.collect_stats(nn.Sequential(layer, nn.ReLU()), xs, liveness=liveness)
    _assert_matches(stats["0"], reference_stats(layer, xs, (lambda z: z > 0) if liveness else None))


@pytest.mark.parametrize("size, batches", [(5, 1), (7, 3), (13, 18), (1, 2)])
@pytest.mark.parametrize("signed", [True, False])
def test_input_gram_is_the_full_symmetric_sum_of_every_batch(size, batches, signed):
    # Only the upper block triangle is added per batch and mirrored on flush: the result must be
    # the whole x^T x, across sizes that do not divide into the slabs and across flushes.
    torch.manual_seed(2)
    xs = [torch.randn(4, size, dtype=torch.float64) + (0 if signed else 3) for _ in range(batches)]
    stats = relprune.collect_stats(nn.Sequential(nn.Linear(size, 3).double()), xs,
                                   statistics=["input_gram", "contribution_std", "relative_mean"])
    x = torch.cat(xs)
    torch.testing.assert_close(stats["0"].input_gram, x.t() @ x / len(x))
