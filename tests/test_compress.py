"""End-to-end ``cpconv.compress`` on real MNIST digits, the schedules, the report, and bad input."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.utils.prune
from torch import nn

from cpconv import CompressionReport, CPConv2d, accuracy, compress, finetune, load_compressed_state_dict
from cpconv.compress import eligible_convs, trace_convs
from cpconv.inspect_model import inspect_model
from cpconv.rank_selection import RatioNotMetWarning

from compress_worker import build_model, planted_conv
from mnist_model import small_trained_alexnet


@pytest.fixture(scope="module")
def mnist():
    """A few hundred real digits and a small AlexNet-style CNN trained on them (seconds); the module's
    tests run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield small_trained_alexnet()
    torch.set_num_threads(threads)


def _callbacks(train, test):
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    test_loader = torch.utils.data.DataLoader(test, batch_size=200)
    calls = []

    def fine_tune(m, step):
        calls.append(step)
        finetune(m, loader, max_batches=3, lr=1e-3, optimizer="adam")

    return fine_tune, (lambda m: accuracy(m, test_loader)), calls


@pytest.mark.parametrize("schedule", ["iterative", "static", "uniform"])
def test_compress_mnist_end_to_end(mnist, schedule):
    dense, train, test = mnist
    model = copy.deepcopy(dense)
    fine_tune, evaluate, calls = _callbacks(train, test)
    dense_acc = evaluate(dense)
    assert dense_acc > 0.5, "the fixture's training failed; the test would prove nothing"
    kwargs = {"ratio": 6.0} if schedule == "uniform" else {}
    report = compress(model, schedule=schedule, fine_tune=fine_tune, evaluate=evaluate, input_shape=(1, 28, 28),
                      progress=False, seed=0, **kwargs)
    names = ["features.conv2", "features.conv3", "features.conv4", "features.conv5"]
    assert report.planned_layers == names and [r.name for r in report.layers] == names  # conv1 skipped: 1 channel
    assert report.finished and report.metric_before == pytest.approx(dense_acc)
    compressed = [r for r in report.layers if r.status == "compressed"]
    assert compressed, "no layer compressed: EVBMF found no signal in a trained network"
    assert calls == [r_i for r_i, r in enumerate(report.layers) if r.status == "compressed"]
    for r in report.layers:
        module = model.get_submodule(r.name)
        if r.status == "compressed":
            assert isinstance(module, CPConv2d) and module.rank == r.rank > 0
            assert r.params_after == module.parameter_count() < r.params_before
            assert r.flops_after == module.flops(r.input_hw) < r.flops_before
            assert 0 <= r.rel_error < 1
            assert 0 <= r.metric_after_decomposition <= 1 and 0 <= r.metric_after_finetune <= 1
            if schedule == "uniform":
                assert r.selected_from == "ratio"
                assert r.selection["method"] == "ratio"
                n, c, kh, kw = r.kernel_shape
                assert n * c * kh * kw / (r.rank * (n + c + kh + kw)) >= 6.0
            else:
                assert set(r.mode_ranks) == {"output", "input"}
                assert r.selected_from == ("current weights" if schedule == "iterative" else "original weights")
        else:
            assert isinstance(module, nn.Conv2d) and r.rank == 0 and "dense" in r.reason
    # The report's totals match the model.
    assert report.model_params_after == sum(p.numel() for p in model.parameters())
    assert report.model_params_after < report.model_params_before
    assert report.metric_after == pytest.approx(evaluate(model))
    # It renders, and survives JSON.
    table = str(report)
    assert all(n in table for n in names) and "total" in table
    again = CompressionReport.from_dict(json.loads(report.to_json()))
    assert again.to_dict() == report.to_dict()


def test_report_save_load(tmp_path):
    model = build_model()
    report = compress(model, progress=False, seed=0, input_shape=(3, 8, 8))
    path = tmp_path / "r.json"
    report.save(path)
    loaded = CompressionReport.load(path)
    assert loaded.to_dict() == report.to_dict()
    assert loaded.ranks == report.ranks and loaded.flops_after == report.flops_after
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CompressionReport.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a cpconv compression report"):
        CompressionReport.load(tmp_path / "other.json")


def test_report_names_the_convs_it_leaves_alone(tmp_path):
    class Std(nn.Conv2d):  # a conv with its own forward: never compressed
        def forward(self, x):
            return super().forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 1),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 16, 1), Std(16, 16, 3),
                          nn.Conv2d(16, 8, 3))
    report = compress(model, rank=4, layers=["1", "3"], progress=False, seed=0)
    assert list(report.skipped) == ["0", "2", "4", "5"]
    assert "one input channel per group" in report.skipped["0"] and "one input channel" in report.skipped["2"]
    assert "own forward" in report.skipped["4"] or "overrides" in report.skipped["4"]
    assert report.skipped["5"] == "not named in layers="
    table = str(report)
    assert all(f"note: {n} not processed: " in table for n in report.skipped)
    report.save(tmp_path / "r.json")
    assert CompressionReport.load(tmp_path / "r.json").skipped == report.skipped
    data = report.to_dict()
    del data["skipped"]  # a report written before the field existed
    assert CompressionReport.from_dict(data).skipped == {}
    for bad in (["0"], {"0": 5}, [["x", "y"]]):
        with pytest.raises(ValueError, match="malformed compression report: .*skipped must map layer names"):
            CompressionReport.from_dict(dict(data, skipped=bad))


def _singular_values(weight, mode):
    w = weight.detach().double()
    mat = w.reshape(w.shape[0], -1) if mode == "output" else w.transpose(0, 1).reshape(w.shape[1], -1)
    return torch.linalg.svdvals(mat).numpy()


def test_static_and_iterative_select_from_different_weights():
    """Static ranks come from the original weights, iterative ones from the fine-tuned weights."""
    original = build_model()
    g = torch.Generator().manual_seed(3)
    # The "fine-tuning" adds a planted rank-8 component to every conv still dense: it changes exactly
    # the weights the iterative schedule looks at and the static one must not.
    seen = {}

    def fine_tune(m, step):
        for name, mod in m.named_modules():
            if isinstance(mod, nn.Conv2d):
                extra = planted_conv(mod.in_channels, mod.out_channels, 3, 8, g).weight
                with torch.no_grad():
                    mod.weight.add_(2.0 * extra)
                seen.setdefault(name, []).append(mod.weight.detach().clone())

    reports = {}
    for schedule in ("iterative", "static"):
        model = copy.deepcopy(original)
        seen.clear()
        g.manual_seed(3)
        reports[schedule] = compress(model, schedule=schedule, fine_tune=fine_tune, progress=False, seed=0)
        if schedule == "iterative":
            weights_before = {name: w[-1] for name, w in seen.items()}
    it, st = reports["iterative"], reports["static"]
    assert it.layers[0].rank == st.layers[0].rank  # nothing was fine-tuned before the first layer
    for k in range(1, len(it.layers)):
        name = it.layers[k].name
        orig_w = original.get_submodule(name).weight
        for mode in ("output", "input"):
            static_sv = np.asarray(st.layers[k].selection["details"][mode][0]["singular_values"])
            np.testing.assert_allclose(static_sv, _singular_values(orig_w, mode), rtol=1e-4, atol=1e-6)
            iter_sv = np.asarray(it.layers[k].selection["details"][mode][0]["singular_values"])
            np.testing.assert_allclose(iter_sv, _singular_values(weights_before[name], mode), rtol=1e-4, atol=1e-6)
        assert st.layers[k].selected_from == "original weights" and it.layers[k].selected_from == "current weights"
        # The planted rank-8 component is visible to the iterative schedule only.
        assert it.layers[k].rank > st.layers[k].rank


def test_forward_order_and_registration_order():
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.late = planted_conv(8, 8, 3, 2, g)
            self.early = planted_conv(3, 8, 3, 2, g)
            self.single = nn.Conv2d(1, 3, 3, padding=1)

        def forward(self, x):
            return self.late(self.early(self.single(x)))

    names, sizes = trace_convs(Backwards(), (1, 6, 6))
    assert names == ["single", "early", "late"] and sizes["early"] == (6, 6)
    r = compress(Backwards(), progress=False, input_shape=(1, 6, 6), seed=0)
    assert r.planned_layers == ["early", "late"]  # forward order; 'single' has one input channel
    r = compress(Backwards(), progress=False, seed=0)
    assert r.planned_layers == ["late", "early"]  # no input shape: registration order
    assert r.flops_before is None and r.layers[0].input_hw is None
    r = compress(Backwards(), layers=["single"], rank=2, progress=False, seed=0)  # named: compressed anyway
    assert r.layers[0].status == "compressed" and r.layers[0].selected_from == "fixed rank"


def test_rank_zero_leaves_layer_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))  # random: pure noise
    calls = []
    report = compress(model, fine_tune=lambda m, s: calls.append(s), evaluate=lambda m: 0.5, progress=False)
    assert [r.rank for r in report.layers] == [0, 0] and calls == []
    assert all(isinstance(model[i], nn.Conv2d) for i in (0, 2))
    assert all(r.status == "dense" and r.params_after == r.params_before for r in report.layers)
    assert "left dense" in str(report)


# ---------------------------------------------------------------------- bad input
def test_no_eligible_conv():
    with pytest.raises(ValueError, match="contains no nn.Conv2d"):
        compress(nn.Sequential(nn.Linear(4, 4)), progress=False)
    with pytest.raises(ValueError, match="one input channel per group"):
        compress(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3, groups=8)), progress=False)


def test_bad_layer_names():
    model = build_model()
    with pytest.raises(ValueError, match="'nope' does not exist.*'0', '2', '4', '6'"):
        compress(model, layers=["nope"], progress=False)
    with pytest.raises(ValueError, match="'1' is a ReLU, not an nn.Conv2d"):
        compress(model, layers=["1"], progress=False)
    with pytest.raises(ValueError, match="listed twice"):
        compress(model, layers=["0", "0"], progress=False)
    with pytest.raises(TypeError, match="list of module names"):
        compress(model, layers="0", progress=False)
    with pytest.raises(ValueError, match="at least one"):
        compress(model, layers=[], progress=False)
    assert all(isinstance(model[i], nn.Conv2d) for i in (0, 2, 4, 6))  # nothing was touched


def test_bad_arguments():
    model = build_model()
    with pytest.raises(ValueError, match="schedule must be one of"):
        compress(model, schedule="greedy", progress=False)
    with pytest.raises(ValueError, match="needs ratio="):
        compress(model, schedule="uniform", progress=False)
    with pytest.raises(ValueError, match="ratio must be a positive number"):
        compress(model, schedule="uniform", ratio=-1, progress=False)
    with pytest.raises(ValueError, match="only used by"):
        compress(model, ratio=2.0, progress=False)
    with pytest.raises(TypeError, match="fine_tune must be a callable"):
        compress(model, fine_tune=3, progress=False)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        compress("model", progress=False)
    with pytest.raises(TypeError, match="evaluate\\(model\\) must return a number"):
        compress(model, evaluate=lambda m: "good", progress=False)
    with pytest.raises(TypeError):
        compress(model, no_such_option=1, progress=False)
    never = []
    with pytest.raises(ValueError, match="combine must be one of"):
        compress(model, combine="median", evaluate=never.append, progress=False)
    with pytest.raises(ValueError, match="weakening must be a number in \\[0, 1\\]"):
        compress(model, weakening=1.5, evaluate=never.append, progress=False)
    assert never == []  # refused before any work


# ---------------------------------------------------------------------- shared, frozen, up-front checks
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = planted_conv(8, 8, 3, 2, torch.Generator().manual_seed(0))
        self.b = self.a  # one conv used twice (weight tying)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("layers", [None, ["a"], ["b"]])
def test_shared_conv_is_compressed_once_and_stays_shared(layers):
    model = _Tied()
    dense_params = sum(p.numel() for p in model.parameters())
    report = compress(model, layers=layers, progress=False, seed=0, max_iter=10)
    assert model.a is model.b and isinstance(model.a, CPConv2d)
    assert len(report.layers) == 1 and "shared module" in report.layers[0].reason
    after = sum(p.numel() for p in model.parameters())
    assert report.model_params_before == dense_params and report.model_params_after == after
    assert report.layers[0].params_after == after  # the one CP layer, counted once
    assert model(torch.randn(1, 8, 6, 6)).shape == (1, 8, 6, 6)


def test_shared_conv_listed_under_two_names_is_refused():
    model = _Tied()
    with pytest.raises(ValueError, match="'a' and 'b' are the same \\(shared\\) module"):
        compress(model, layers=["a", "b"], progress=False)
    assert isinstance(model.a, nn.Conv2d) and model.a is model.b


def test_invalid_rank_for_a_later_layer_fails_before_anything_is_touched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 3), nn.Conv2d(32, 8, 1))  # last: max rank 8
    before = copy.deepcopy(model.state_dict())
    calls = []
    for kwargs, match in [
        ({"rank": 12}, "layer '2': rank 12 exceeds the limit 8 for a kernel of shape \\(8, 32, 1, 1\\)"),
        ({"rank": 12, "schedule": "static"}, "layer '2': rank 12 exceeds the limit 8"),
        ({"max_rank": 6, "multiple_of": 8}, "layer '0': no rank that is a multiple of 8"),
        ({"tol": -1.0}, "tol must be a finite number >= 0, got -1.0"),
        ({"rank": "svd"}, "method must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            compress(model, progress=False, fine_tune=lambda m, s: calls.append(s),
                     evaluate=lambda m: calls.append("evaluate") or 0.0, **kwargs)
    with pytest.raises(TypeError, match="needs the option prior"):
        compress(model, rank="vbmf", progress=False, evaluate=lambda m: calls.append("evaluate") or 0.0)
    assert calls == [] and all(type(m) is nn.Conv2d for m in model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_frozen_conv_stays_frozen_through_compress_and_fine_tuning():
    model = build_model()
    model[2].requires_grad_(False)
    frozen_before = {}

    def fine_tune(m, step):
        frozen_before[step] = [p.detach().clone() for p in m[2].parameters()]
        finetune(m, [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))] * 2, lr=0.1)

    compress(model, layers=["0", "2"], fine_tune=fine_tune, progress=False, seed=0, max_iter=10)
    assert isinstance(model[2], CPConv2d) and not any(p.requires_grad for p in model[2].parameters())
    assert all(p.requires_grad for p in model[0].parameters())
    # The last fine-tuning (after layer 2 was replaced) left its frozen factors alone.
    assert all(torch.equal(a, b) for a, b in zip(frozen_before[1], model[2].parameters()))


def test_uniform_ratio_that_a_layer_cannot_meet_warns_with_its_name():
    model = build_model()
    with pytest.warns(RatioNotMetWarning, match="layer '0'.*ratio 50 is not met.*rank 1 gives only 17.3x"):
        report = compress(model, schedule="uniform", ratio=50.0, progress=False, seed=0, max_iter=5)
    assert report.ranks["0"] == 1


# ---------------------------------------------------------------------- evaluate's result, strict JSON
def test_evaluate_returning_none_is_refused_before_anything_is_touched():
    model = build_model()
    before = copy.deepcopy(model.state_dict())
    calls = []
    with pytest.raises(TypeError, match="must return a number, got None \\(does it lack a `return`\\?\\) "
                                        "on the dense model, before any layer was replaced"):
        compress(model, evaluate=lambda m: None, fine_tune=lambda m, s: calls.append(s), progress=False, seed=0)
    assert calls == [] and all(type(model[i]) is nn.Conv2d for i in (0, 2, 4, 6))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    results = iter([0.5, 0.4, None])  # dense, after decomposing '0', after fine-tuning '0'
    with pytest.raises(TypeError, match="got None .* after fine-tuning layer '0'"):
        compress(build_model(), evaluate=lambda m: next(results), fine_tune=lambda m, s: None, progress=False,
                 seed=0, max_iter=5)


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_metrics_are_recorded_and_saved_as_strict_json(tmp_path):
    results = iter([float("nan"), float("inf"), float("-inf")])
    report = compress(build_model(), layers=["0"], evaluate=lambda m: next(results), fine_tune=lambda m, s: None,
                      progress=False, seed=0, max_iter=5)
    assert math.isnan(report.metric_before) and report.metric_after == -math.inf
    assert report.layers[0].metric_after_decomposition == math.inf
    assert "nan" in str(report) and "-inf" in str(report)
    report.save(tmp_path / "r.json")
    data = _strict_json((tmp_path / "r.json").read_text())
    assert data["metric_before"] == "NaN" and data["totals"]["metric_after"] == "-Infinity"
    assert data["layers"][0]["metric_after_decomposition"] == "Infinity"
    loaded = CompressionReport.load(tmp_path / "r.json")
    assert math.isnan(loaded.metric_before) and loaded.metric_after == -math.inf
    assert loaded.layers[0].metric_after_decomposition == math.inf
    assert loaded.to_dict() == report.to_dict() and str(loaded) == str(report)


# ---------------------------------------------------------------------- conv subclasses
class _StdConv2d(nn.Conv2d):
    """A weight-standardised conv (BiT, timm): its forward is not nn.Conv2d's."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _ScaledConv2d(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


class _PlainSubclass(nn.Conv2d):
    """Keeps nn.Conv2d's forward: eligible."""


def _as(cls, conv):
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    new.load_state_dict(conv.state_dict())
    return new


def _subclass_model():
    g = torch.Generator().manual_seed(0)
    return nn.Sequential(planted_conv(3, 8, 3, 2, g), nn.ReLU(), _as(_StdConv2d, planted_conv(8, 8, 3, 2, g)),
                         nn.ReLU(), _as(_ScaledConv2d, planted_conv(8, 8, 3, 2, g)), nn.ReLU(),
                         _as(_PlainSubclass, planted_conv(8, 8, 3, 2, g)))


def test_conv_subclass_with_its_own_forward_is_never_compressed():
    model = _subclass_model()
    assert eligible_convs(model) == ["0", "6"]
    report = compress(model, progress=False, seed=0, max_iter=10, input_shape=(3, 6, 6))
    assert report.planned_layers == ["0", "6"] and isinstance(model[0], CPConv2d) and isinstance(model[6], CPConv2d)
    assert type(model[2]) is _StdConv2d and type(model[4]) is _ScaledConv2d
    for name, cls in (("2", "_StdConv2d"), ("4", "_ScaledConv2d")):
        model = _subclass_model()
        with pytest.raises(ValueError, match=f"layer '{name}' is a {cls}, an nn.Conv2d subclass whose forward is "
                                             "not nn.Conv2d's .*would not compute the same function"):
            compress(model, layers=["6", name], progress=False)
        assert type(model[6]) is _PlainSubclass  # refused before anything was touched
    with pytest.raises(ValueError, match="no eligible nn.Conv2d.*0: a _StdConv2d, an nn.Conv2d subclass"):
        compress(nn.Sequential(_StdConv2d(8, 8, 3)), progress=False)


def test_inspect_marks_a_conv_subclass_with_its_own_forward_not_eligible():
    result = inspect_model(_subclass_model(), input_shape=(3, 6, 6))
    layers = {c.name: c for c in result.layers}
    for name in ("2", "4"):
        c = layers[name]
        assert c.rank == 0 and c.mode_ranks == {} and c.params_cp == c.params_dense and c.flops_cp == c.flops_dense
        assert c.note.startswith("not eligible: a _") and "forward is not nn.Conv2d's" in c.note
    assert layers["0"].rank > 0 and layers["6"].rank > 0 and layers["6"].note == ""
    assert "note: 2: not eligible" in str(result)


# ---------------------------------------------------------------------- reloading a compressed state_dict
def _grouped_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, (3, 5), padding=(1, 2), groups=2),
                         nn.ReLU(), nn.Conv2d(32, 8, 1, bias=False))


def test_load_compressed_state_dict_rebuilds_the_compressed_model(tmp_path):
    model = build_model()
    compress(model, layers=["2", "4", "6"], progress=False, seed=0, max_iter=20)
    model[4] = nn.Conv2d(24, 24, 3, padding=1)  # one layer back to dense: it must load as a dense conv
    model.eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = build_model(seed=1).eval()
    replaced = load_compressed_state_dict(fresh, torch.load(tmp_path / "sd.pt"))
    assert replaced == ["2", "6"]
    assert [type(m) for m in fresh] == [type(m) for m in model]
    assert [m.rank for m in (fresh[2], fresh[6])] == [model[2].rank, model[6].rank]
    x = torch.randn(3, 3, 9, 11)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # grouped, non-square kernel, no bias; the layers keep the fresh model's mode and trainability
    model = _grouped_model()
    model[2] = CPConv2d.from_conv(model[2], rank=6)
    model[4] = CPConv2d.from_conv(model[4], rank=5)
    fresh = _grouped_model(seed=3).train()
    fresh[4].requires_grad_(False)
    assert load_compressed_state_dict(fresh, model.state_dict()) == ["2", "4"]
    assert fresh[2].training and fresh[4].bias is None and not fresh[4].in_factor.requires_grad
    assert fresh[2].in_factor.requires_grad
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_load_compressed_state_dict_keeps_shared_convs_shared():
    model = _Tied()
    compress(model, progress=False, seed=0, max_iter=10, rank=4)
    fresh = _Tied()
    assert load_compressed_state_dict(fresh, model.state_dict()) == ["a", "b"]
    assert fresh.a is fresh.b and isinstance(fresh.a, CPConv2d) and fresh.a.rank == 4


def test_load_compressed_state_dict_errors_name_the_layer():
    model = _grouped_model()
    model[2] = CPConv2d.from_conv(model[2], rank=6)
    sd = model.state_dict()
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        load_compressed_state_dict(_grouped_model(), [1, 2])
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        load_compressed_state_dict({}, sd)
    incomplete = {k: v for k, v in sd.items() if k != "2.vert_factor"}
    fresh = _grouped_model()
    with pytest.raises(ValueError, match=r"layer '2': state_dict has CP factors .* but not \['2.vert_factor'\]"):
        load_compressed_state_dict(fresh, incomplete)
    assert type(fresh[2]) is nn.Conv2d  # nothing replaced before the check
    other = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=2))
    with pytest.raises(ValueError, match=r"layer '2': the CP factors in state_dict .*'horz_factor': \(5, 6\).* do not fit"):
        load_compressed_state_dict(other, sd)
    assert type(other[2]) is nn.Conv2d
    odd = dict(sd, **{k: torch.zeros(v.shape[0], 5) for k, v in sd.items() if k in ("2.in_factor",)})
    with pytest.raises(ValueError, match="R a positive multiple of groups=2"):
        load_compressed_state_dict(_grouped_model(), odd)
    with pytest.raises(ValueError, match="model is itself an nn.Conv2d"):
        load_compressed_state_dict(nn.Conv2d(16, 32, (3, 5), groups=2),
                                   {k[2:]: v for k, v in sd.items() if k.startswith("2.")})
    fresh = _grouped_model(seed=5)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"(?s)loading the compressed state_dict failed: .*Unexpected key.*extra"):
        load_compressed_state_dict(fresh, dict(sd, extra=torch.zeros(1)))
    assert type(fresh[2]) is nn.Conv2d  # the structure as it was, and the values (load_state_dict had
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # copied layer 0's)
    pruned_model = copy.deepcopy(model)
    torch.nn.utils.prune.l1_unstructured(pruned_model[2], "in_factor", amount=0.5)
    with pytest.raises(ValueError, match=r"2.in_factor_orig and 2.in_factor_mask are there: the layer was pruned"):
        load_compressed_state_dict(_grouped_model(), pruned_model.state_dict())
    fresh = _grouped_model()
    load_compressed_state_dict(fresh, dict(sd, extra=torch.zeros(1)), strict=False)
    assert isinstance(fresh[2], CPConv2d)


class _TwiceCalled(nn.Module):
    """One conv applied at two resolutions, and a second one shared under two names."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = planted_conv(8, 8, 3, 2, g)
        self.b = planted_conv(8, 8, 3, 2, g)
        self.c = self.b

    def forward(self, x):
        y = self.a(x) + self.a(x)
        y = self.a(torch.nn.functional.max_pool2d(y, 2))
        return self.c(self.b(y))


def test_flops_count_every_call_of_a_conv():
    model = _TwiceCalled()
    report = compress(model, rank=4, input_shape=(8, 12, 12), progress=False, seed=0, max_iter=20)
    by_name = {r.name: r for r in report.layers}
    a, b = by_name["a"], by_name["b"]
    dense = 8 * 8 * 9  # multiply-adds per output pixel
    assert a.input_hw == (12, 12) and a.flops_before == dense * (2 * 12 * 12 + 6 * 6)
    assert b.input_hw == (6, 6) and b.flops_before == dense * 2 * 6 * 6
    cp_a = model.a.flops((12, 12)) * 2 + model.a.flops((6, 6))
    assert a.flops_after == cp_a and b.flops_after == 2 * model.b.flops((6, 6))
    assert report.conv_flops_before == a.flops_before + b.flops_before
    assert report.conv_flops_after == a.flops_after + b.flops_after
    inspection = inspect_model(_TwiceCalled(), input_shape=(8, 12, 12))
    rows = {c.name: c for c in inspection.layers}
    assert rows["a"].flops_dense == a.flops_before and rows["b"].flops_dense == b.flops_before
