"""CPConv2d against independent references: nn.Conv2d / F.conv2d with a kernel rebuilt in the test."""

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cpconv import CPConv2d


def kernel_from_factors(U, S, Y, X, groups):
    """Dense kernel rebuilt group by group with explicit sums (independent of CPConv2d.dense_weight)."""
    n, rg = U.shape
    cg, r = S.shape
    ng = n // groups
    out = torch.zeros(n, cg, Y.shape[0], X.shape[0], dtype=U.dtype)
    for g in range(groups):
        for rl in range(rg):
            col = g * rg + rl
            rank_one = torch.einsum("c,i,j->cij", S[:, col], Y[:, col], X[:, col])
            out[g * ng:(g + 1) * ng] += U[g * ng:(g + 1) * ng, rl, None, None, None] * rank_one
    return out


def dense_twin(layer: CPConv2d) -> nn.Conv2d:
    """An nn.Conv2d with the same arguments whose kernel is rebuilt by the test."""
    U, S, Y, X = (f.detach() for f in layer.factors)
    conv = nn.Conv2d(
        layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, dtype=U.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(kernel_from_factors(U, S, Y, X, layer.groups))
        if layer.bias is not None:
            conv.bias.copy_(layer.bias)
    return conv


@st.composite
def conv_configs(draw):
    groups = draw(st.integers(1, 4))
    in_channels = groups * draw(st.integers(1, max(1, 64 // groups)))
    out_channels = groups * draw(st.integers(1, max(1, 64 // groups)))
    rank = groups * draw(st.integers(1, 8))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    kind = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    if kind == "same" and stride != (1, 1):
        kind = "pair"
    if kind == "int":
        padding = draw(st.integers(0, 3))
    elif kind == "pair":
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    else:
        padding = kind
    # Spatial size: large enough for the dilated kernel and (reflect) for the padding.
    min_h = dilation[0] * (kh - 1) + 1
    min_w = dilation[1] * (kw - 1) + 1
    h = draw(st.integers(min_h, min_h + 6)) + 4
    w = draw(st.integers(min_w, min_w + 6)) + 4
    batch = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    # Compact forms (int kernel/stride/dilation) exercise the argument normalisation too.
    kernel_arg = kh if kh == kw and draw(st.booleans()) else (kh, kw)
    return dict(
        layer=dict(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_arg, rank=rank,
                   stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                   padding_mode=padding_mode),
        input=(batch, in_channels, h, w),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.integers(0, 2**31 - 1))
def test_forward_matches_dense_conv_float64(cfg, seed):
    torch.manual_seed(seed)
    layer = CPConv2d(**cfg["layer"], dtype=torch.float64)
    x = torch.randn(cfg["input"], dtype=torch.float64)
    expected = dense_twin(layer)(x)
    got = layer(x)
    assert got.shape == expected.shape, cfg
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"{cfg}: {m}")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs(), st.integers(0, 2**31 - 1))
def test_forward_matches_dense_conv_float32_inference(cfg, seed):
    torch.manual_seed(seed)
    layer = CPConv2d(**cfg["layer"]).eval()
    x = torch.randn(cfg["input"])
    with torch.no_grad():
        expected = dense_twin(layer)(x)
        got = layer(x)
    scale = expected.abs().max().item() + 1e-6
    assert (got - expected).abs().max().item() <= 1e-4 * scale, cfg


@pytest.mark.parametrize(
    "args",
    [
        dict(in_channels=2, out_channels=3, kernel_size=(3, 2), rank=2, stride=(2, 1), padding=1, dilation=(1, 2)),
        dict(in_channels=4, out_channels=2, kernel_size=3, rank=2, groups=2, padding="same", padding_mode="reflect"),
        dict(in_channels=3, out_channels=2, kernel_size=(1, 3), rank=3, padding="same", padding_mode="circular",
             bias=False),
        dict(in_channels=2, out_channels=2, kernel_size=2, rank=1, padding="same", padding_mode="replicate"),
    ],
)
def test_gradcheck_float64(args):
    torch.manual_seed(0)
    layer = CPConv2d(**args, dtype=torch.float64)
    x = torch.randn(1, args["in_channels"], 6, 5, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    inputs = (x, *[p.detach().clone().requires_grad_(True) for p in layer.parameters()])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_from_factors_round_trip_and_weights():
    torch.manual_seed(1)
    U, S, Y, X = torch.randn(6, 4), torch.randn(5, 4), torch.randn(3, 4), torch.randn(2, 4)
    bias = torch.randn(6)
    weights = torch.rand(4) + 0.5
    layer = CPConv2d.from_factors((U, S, Y, X), bias, weights=weights, stride=2, padding=(1, 0))
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.rank) == (5, 6, (3, 2), 4)
    expected = torch.einsum("nr,cr,ir,jr->ncij", U * weights, S, Y, X)
    torch.testing.assert_close(layer.dense_weight().detach(), expected)
    x = torch.randn(2, 5, 9, 8)
    torch.testing.assert_close(layer(x), F.conv2d(x, expected, bias, 2, (1, 0)), rtol=1e-5, atol=1e-5)


def test_from_factors_grouped_weights_fold_per_group():
    torch.manual_seed(2)
    groups, n, cg, rank = 2, 4, 3, 6
    U, S = torch.randn(n, rank // groups), torch.randn(cg, rank)
    Y, X = torch.randn(2, rank), torch.randn(3, rank)
    weights = torch.arange(1.0, rank + 1)
    layer = CPConv2d.from_factors((U, S, Y, X), None, weights=weights, groups=groups)
    # Folding the weights into S instead must give the same kernel.
    reference = kernel_from_factors(U, S * weights, Y, X, groups)
    torch.testing.assert_close(layer.dense_weight().detach(), reference)


def test_to_conv_matches_and_keeps_geometry():
    torch.manual_seed(3)
    layer = CPConv2d(6, 8, (3, 5), rank=4, stride=(1, 2), padding="valid", dilation=(2, 1), groups=2,
                     padding_mode="replicate")
    conv = layer.to_conv()
    assert isinstance(conv, nn.Conv2d)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(conv, attr) == getattr(layer, attr), attr
    x = torch.randn(2, 6, 12, 13)
    torch.testing.assert_close(conv(x), layer(x), rtol=1e-5, atol=1e-5)


def count_stage_macs(layer, x):
    """Multiply-adds counted from the shapes the four stages actually produce."""
    r, g = layer.rank, layer.groups
    _, c, h, w = x.shape
    oh, ow = layer(x).shape[-2:]
    kh, kw = layer.kernel_size
    stage1 = r * (c // g) * h * w
    stage2 = r * kh * oh * w
    stage3 = r * kw * oh * ow
    stage4 = layer.out_channels * (r // g) * oh * ow
    return stage1 + stage2 + stage3 + stage4, (oh, ow)


@pytest.mark.parametrize("hw", [(13, 13), (27, 31), (8, 9)])
def test_flops_and_parameter_counts(hw):
    layer = CPConv2d(16, 32, (5, 3), rank=8, stride=(2, 1), padding=(2, 1), groups=2)
    x = torch.randn(1, 16, *hw)
    macs, (oh, ow) = count_stage_macs(layer, x)
    assert layer.flops(hw) == macs
    assert layer.output_size(hw) == (oh, ow)
    assert layer.dense_flops(hw) == 32 * 8 * 5 * 3 * oh * ow
    assert layer.parameter_count() == 32 * 4 + 8 * 8 + 5 * 8 + 3 * 8 + 32
    assert layer.dense_parameter_count() == sum(p.numel() for p in layer.to_conv().parameters())


def test_default_init_matches_conv2d_scale():
    torch.manual_seed(4)
    layer = CPConv2d(64, 64, 3, rank=32)
    std = layer.dense_weight().std().item()
    expected = 1.0 / math.sqrt(3 * 64 * 9)
    assert 0.5 * expected < std < 2.0 * expected


def test_extra_repr():
    text = repr(CPConv2d(3, 8, (3, 5), 4, stride=2, padding=1, groups=1, bias=False,
                         padding_mode="reflect"))
    assert "CPConv2d(3, 8, kernel_size=(3, 5), rank=4, stride=(2, 2), padding=(1, 1)" in text
    assert "bias=False" in text and "padding_mode='reflect'" in text


def test_state_dict_round_trip():
    torch.manual_seed(5)
    a = CPConv2d(4, 6, 3, rank=5, padding=1)
    b = CPConv2d(4, 6, 3, rank=5, padding=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(a(x), b(x))
    assert set(a.state_dict()) == {"out_factor", "in_factor", "vert_factor", "horz_factor", "bias"}


def test_torch_save_whole_module_round_trip():
    torch.manual_seed(6)
    model = nn.Sequential(CPConv2d(3, 4, (3, 2), rank=3, padding="same", padding_mode="circular"), nn.ReLU())
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded[0].padding == "same"


def test_unbatched_channels_last_and_noncontiguous_inputs():
    torch.manual_seed(7)
    layer = CPConv2d(4, 5, 3, rank=3, padding=1)
    conv = dense_twin(layer)
    x = torch.randn(2, 4, 9, 10)
    torch.testing.assert_close(layer(x[0]), conv(x[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), conv(x), rtol=1e-5, atol=1e-5)
    strided = torch.randn(2, 4, 18, 20)[:, :, ::2, ::2]
    assert not strided.is_contiguous()
    torch.testing.assert_close(layer(strided), conv(strided), rtol=1e-5, atol=1e-5)
    transposed = torch.randn(2, 4, 10, 9).transpose(2, 3)
    torch.testing.assert_close(layer(transposed), conv(transposed), rtol=1e-5, atol=1e-5)


def test_training_step_changes_output_and_gradients_flow():
    torch.manual_seed(8)
    layer = CPConv2d(3, 4, 3, rank=2)
    x = torch.randn(2, 3, 8, 8)
    loss = layer(x).pow(2).mean()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, "rank must be >= 1"),
        (dict(rank=-3), ValueError, "rank must be >= 1"),
        (dict(rank=3, groups=2), ValueError, "divisible by groups"),
        (dict(rank=2.5), TypeError, "rank must be an int"),
        (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
        (dict(kernel_size=(3, 0)), ValueError, "kernel_size must be >= 1"),
        (dict(kernel_size=(3, 3, 3)), TypeError, "kernel_size"),
        (dict(stride=0), ValueError, "stride must be >= 1"),
        (dict(dilation=0), ValueError, "dilation must be >= 1"),
        (dict(padding=-1), ValueError, "padding must be >= 0"),
        (dict(padding="full"), ValueError, "padding must be"),
        (dict(padding="same", stride=2), ValueError, "same"),
        (dict(padding_mode="mirror"), ValueError, "padding_mode"),
        (dict(in_channels=3, groups=2, rank=2), ValueError, "divisible by groups"),
        (dict(in_channels=0), ValueError, "in_channels must be >= 1"),
    ],
)
def test_bad_constructor_arguments(kwargs, error, match):
    args = dict(in_channels=4, out_channels=4, kernel_size=3, rank=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        CPConv2d(**args)


def test_bad_forward_inputs():
    layer = CPConv2d(4, 4, 3, rank=2)
    with pytest.raises(ValueError, match="expects 4 input channels"):
        layer(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(8, 8))
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(1, 1, 4, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(1, 4, 8, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1.0]])
    for mode in (contextlib.nullcontext, torch.no_grad):  # the torch path and the fused path alike
        with mode(), pytest.raises(ValueError, match="smaller than the dilated kernel"):
            layer(torch.randn(1, 4, 2, 2))


@pytest.mark.parametrize(
    "factors, kwargs, match",
    [
        ((torch.randn(4, 2), torch.randn(3, 2), torch.randn(3, 3), torch.randn(3, 2)), {}, "same number of columns"),
        ((torch.randn(4, 2), torch.randn(3, 2), torch.randn(3, 2)), {}, "4 matrices"),
        ((torch.randn(4, 2, 1), torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)), {}, "matrix"),
        ((torch.randn(4, 2), torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)), dict(groups=2),
         "rank/groups"),
    ],
)
def test_bad_from_factors(factors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPConv2d.from_factors(factors, **kwargs)


def test_from_factors_rejects_integer_factors_and_bad_weights():
    with pytest.raises(TypeError, match="floating point"):
        CPConv2d.from_factors([torch.ones(2, 2, dtype=torch.int64)] * 4)
    with pytest.raises(ValueError, match="weights must have shape"):
        CPConv2d.from_factors([torch.ones(2, 2)] * 4, weights=torch.ones(3))
    with pytest.raises(ValueError, match="bias must have shape"):
        CPConv2d.from_factors([torch.ones(2, 2)] * 4, torch.ones(5))


def test_integer_arguments_accept_index_types_but_not_bool():
    import numpy as np

    with pytest.raises(TypeError, match="rank must be an int"):
        CPConv2d(4, 6, 3, rank=True)
    layer = CPConv2d(np.int64(4), np.int64(6), 3, rank=np.int64(4), groups=np.int64(2))
    assert (layer.in_channels, layer.out_channels, layer.rank, layer.groups) == (4, 6, 4, 2)
    assert all(type(v) is int for v in (layer.in_channels, layer.out_channels, layer.rank, layer.groups))
    factors = (torch.randn(6, 2), torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4))
    built = CPConv2d.from_factors(factors, groups=np.int64(2))
    assert built.groups == 2 and built.in_channels == 4
    with pytest.raises(ValueError, match="groups must be an int"):
        CPConv2d.from_factors(factors, groups=True)


# ---------------------------------------------------------------------- folding a following BatchNorm
def _trained_bn(features, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(features, affine=affine, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(features, generator=g, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(features, generator=g, dtype=torch.float64) * 3 + 0.05)
        if affine:
            bn.weight.copy_(torch.randn(features, generator=g, dtype=torch.float64))
            bn.bias.copy_(torch.randn(features, generator=g, dtype=torch.float64))
    return bn.eval()


@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, padding=1, bias=True),
    dict(kernel_size=(3, 5), stride=2, padding="valid", bias=False, groups=2),
    dict(kernel_size=3, padding=2, dilation=2, padding_mode="reflect", bias=True, groups=4),
], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_fold_batchnorm_matches_conv_then_bn(geometry, affine):
    torch.manual_seed(0)
    layer = CPConv2d(8, 12, rank=8, dtype=torch.float64, **geometry).eval()
    bn = _trained_bn(12, affine)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    folded = layer.fold_batchnorm(bn)
    assert isinstance(folded, CPConv2d) and folded.bias is not None and folded.rank == layer.rank
    assert (folded.stride, folded.padding, folded.dilation, folded.padding_mode, folded.groups) == (
        layer.stride, layer.padding, layer.dilation, layer.padding_mode, layer.groups)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())  # self untouched
    x = torch.randn(2, 8, 11, 13, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(layer(x)), rtol=1e-10, atol=1e-10)
        # float32, through the fused kernel
        f32, l32, b32 = folded.float(), copy.deepcopy(layer).float(), copy.deepcopy(bn).float()
        torch.testing.assert_close(f32(x.float()), b32(l32(x.float())), rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_with_fuse_modules_and_bad_input():
    from torch.ao.quantization import fuse_modules

    torch.manual_seed(0)
    model = nn.Sequential(CPConv2d(4, 6, 3, rank=3, padding=1), _trained_bn(6).float(), nn.ReLU()).eval()
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        expected = model(x)
    fused_model = fuse_modules(model, [["0", "1"]], fuse_custom_config_dict={"additional_fuser_method_mapping": {
        (CPConv2d, nn.BatchNorm2d): lambda is_qat, conv, bn: conv.fold_batchnorm(bn)}})
    assert isinstance(fused_model[0], CPConv2d) and isinstance(fused_model[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(fused_model(x), expected, rtol=1e-5, atol=1e-5)
    layer = CPConv2d(4, 6, 3, rank=3)
    sync = nn.SyncBatchNorm(6).eval()  # (a model converted for DDP training)
    sync.load_state_dict(model[1].state_dict())
    torch.testing.assert_close(layer.fold_batchnorm(sync).out_factor, layer.fold_batchnorm(model[1]).out_factor)
    with pytest.raises(TypeError, match=r"bn must be an nn.BatchNorm2d \(or an nn.SyncBatchNorm\), got BatchNorm1d"):
        layer.fold_batchnorm(nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match="training mode"):
        layer.fold_batchnorm(nn.BatchNorm2d(6))
    with pytest.raises(ValueError, match="no running statistics"):
        layer.fold_batchnorm(nn.BatchNorm2d(6, track_running_stats=False).eval())
    with pytest.raises(ValueError, match="bn has 5 features but the layer has 6 output channels"):
        layer.fold_batchnorm(nn.BatchNorm2d(5).eval())
