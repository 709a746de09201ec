"""CPConv2d.from_conv: planted low-CP-rank kernels recovered over many geometries, 1x1 convs by SVD,
decomposition_info, and bad input."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cpconv
from cpconv import CPConv2d


def planted_conv(in_ch, out_ch, kernel_size, group_rank, *, groups=1, bias=True, seed=0, dtype=torch.float32,
                 **geometry):
    """An nn.Conv2d whose kernel is an exact CP of rank group_rank in every group."""
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, groups=groups, bias=bias, dtype=dtype, **geometry)
    n_g, c_g = out_ch // groups, in_ch // groups
    kh, kw = conv.kernel_size
    blocks = []
    for _ in range(groups):
        U, S, Y, X = (torch.randn(d, group_rank, generator=g, dtype=torch.float64) for d in (n_g, c_g, kh, kw))
        blocks.append(torch.einsum("nr,cr,ir,jr->ncij", U, S, Y, X))
    with torch.no_grad():
        w = torch.cat(blocks)
        conv.weight.copy_(w / w.std() * 0.05)
        if bias:
            conv.bias.copy_(torch.randn(out_ch, generator=g, dtype=torch.float64) * 0.1)
    return conv


def rel_output_error(conv, layer, hw=(9, 11), seed=1):
    x = torch.randn(2, conv.in_channels, *hw, generator=torch.Generator().manual_seed(seed), dtype=conv.weight.dtype)
    with torch.no_grad(), warnings.catch_warnings():
        # torch warns that padding='same' with an even kernel copies the input: irrelevant here
        warnings.filterwarnings("ignore", message="Using padding='same'", category=UserWarning)
        ref = conv(x)
        out = layer(x)
    return float((out - ref).norm() / ref.norm())


# (in, out, kernel, group rank, groups, geometry) -- small sizes, every geometry CPConv2d supports.
GEOMETRIES = [
    (6, 8, 3, 3, 1, dict()),
    (5, 7, (3, 5), 2, 1, dict(padding=1)),
    (8, 6, (5, 3), 4, 1, dict(stride=2, padding=(2, 1))),
    (4, 4, 3, 2, 1, dict(padding="same", dilation=2)),
    (6, 5, (2, 4), 3, 1, dict(padding="same")),
    (6, 6, 3, 2, 1, dict(padding="valid", stride=(1, 2))),
    (3, 8, 3, 3, 1, dict(padding=2, dilation=(2, 1), padding_mode="reflect")),
    (4, 6, 3, 2, 1, dict(padding=1, padding_mode="circular")),
    (6, 4, (1, 3), 2, 1, dict(padding=(0, 1), padding_mode="replicate")),
    (8, 8, 3, 2, 2, dict(padding=1)),
    (12, 6, (3, 2), 2, 3, dict(stride=(2, 1), dilation=(1, 2))),
    (6, 6, 3, 1, 6, dict(padding=1)),  # depthwise
]


@pytest.mark.parametrize("in_ch,out_ch,kernel,group_rank,groups,geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [True, False])
def test_planted_cp_kernel_recovered(in_ch, out_ch, kernel, group_rank, groups, geometry, bias):
    conv = planted_conv(in_ch, out_ch, kernel, group_rank, groups=groups, bias=bias, **geometry)
    layer = CPConv2d.from_conv(conv, rank=group_rank * groups, seed=0, max_iter=2000, tol=1e-12)
    assert isinstance(layer, CPConv2d)
    assert layer.rank == group_rank * groups and layer.groups == groups
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.padding_mode) == (
        conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.padding_mode)
    assert (layer.bias is None) == (not bias)
    info = layer.decomposition_info
    assert info["rel_error"] < 1e-5, info  # float32 rounding of the factors is ~1e-7
    assert rel_output_error(conv, layer) < 1e-4
    if bias:
        torch.testing.assert_close(layer.bias, conv.bias)


def test_default_evbmf_rank_finds_planted_rank_and_decomposes():
    conv = planted_conv(16, 24, 3, 5, padding=1)
    layer = CPConv2d.from_conv(conv, seed=0, max_iter=2000, tol=1e-12)
    info = layer.decomposition_info
    assert layer.rank == 5
    assert info["rank_selection"]["method"] == "evbmf"
    assert info["rank_selection"]["mode_ranks"] == {"output": 5, "input": 5}
    assert rel_output_error(conv, layer) < 1e-4


def test_decomposition_info_is_complete_and_json_serialisable():
    conv = planted_conv(6, 8, 3, 3, padding=1)
    layer = CPConv2d.from_conv(conv, rank=3, seed=0, max_iter=50)
    info = json.loads(json.dumps(layer.decomposition_info))
    for key in ("rank_selection", "rank", "method", "rel_error", "n_iter", "converged", "degeneracy",
                "max_congruence", "seconds", "cp_als_options", "per_group"):
        assert key in info, key
    assert 0 < info["degeneracy"] < 2 and 0 <= info["max_congruence"] <= 1
    assert info["method"] == "cp_als" and info["rank"] == 3
    assert info["rank_selection"]["method"] == "fixed"
    assert 1 <= info["n_iter"] <= 50 and info["seconds"] >= 0
    assert info["cp_als_options"] == {"seed": 0, "max_iter": 50}


def test_same_seed_same_factors():
    conv = planted_conv(6, 8, 3, 4)
    a = CPConv2d.from_conv(conv, rank=3, seed=7, max_iter=20)
    b = CPConv2d.from_conv(conv, rank=3, seed=7, max_iter=20)
    for fa, fb in zip(a.factors, b.factors):
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)


def test_float64_conv_keeps_dtype_and_factor_balance():
    conv = planted_conv(6, 8, (3, 2), 3, dtype=torch.float64, padding=1).eval()
    layer = CPConv2d.from_conv(conv, rank=3, seed=0, max_iter=2000, tol=1e-14)
    assert all(f.dtype == torch.float64 for f in layer.factors)
    assert not layer.training  # follows the conv's mode
    assert layer.decomposition_info["rel_error"] < 1e-7  # float64 ALS: near sqrt(eps64)
    # Every rank-one component has equal column norms across the four factors.
    norms = torch.stack([f.norm(dim=0) for f in layer.factors])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms), rtol=1e-9, atol=1e-12)


def test_rank_selection_object_and_options_pass_through():
    conv = planted_conv(8, 8, 3, 4, padding=1)
    sel = cpconv.select_rank(conv, multiple_of=3)
    assert sel.rank == 6
    layer = CPConv2d.from_conv(conv, rank=sel, seed=0, max_iter=200)
    assert layer.rank == 6 and layer.decomposition_info["rank_selection"] == sel.to_dict()
    layer = CPConv2d.from_conv(conv, rank="ratio", ratio=4.0, seed=0, max_iter=10)
    assert layer.decomposition_info["rank_selection"]["method"] == "ratio"
    assert layer.dense_parameter_count() - 8 >= 4.0 * (layer.parameter_count() - 8)


# ------------------------------------------------------------------------------------- 1x1 by SVD


@pytest.mark.parametrize("in_ch,out_ch,groups", [(6, 9, 1), (12, 5, 1), (8, 8, 2), (9, 6, 3)])
def test_pointwise_conv_by_svd_exact_at_full_rank(in_ch, out_ch, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_ch, out_ch, 1, groups=groups, stride=2)
    full = groups * min(in_ch // groups, out_ch // groups)
    assert cpconv.max_cp_rank(conv.weight.shape, groups) == full
    layer = CPConv2d.from_conv(conv, rank=full)
    assert layer.kernel_size == (1, 1) and layer.decomposition_info["method"] == "svd"
    assert layer.decomposition_info["rel_error"] < 1e-6
    assert rel_output_error(conv, layer) < 1e-5
    with pytest.raises(ValueError, match="exceeds the limit"):
        CPConv2d.from_conv(conv, rank=full + groups)


def test_pointwise_truncated_svd_error_is_the_tail_energy():
    torch.manual_seed(1)
    conv = nn.Conv2d(10, 7, 1, bias=False, dtype=torch.float64)
    weight = conv.weight.detach()[:, :, 0, 0]
    sv = torch.linalg.svdvals(weight)
    for r in (1, 3, 6):
        layer = CPConv2d.from_conv(conv, rank=r)
        expected = float(sv[r:].norm() / sv.norm())
        assert layer.decomposition_info["rel_error"] == pytest.approx(expected, rel=1e-9)
        assert layer.decomposition_info["per_group"][0]["rel_error"] == pytest.approx(expected, rel=1e-9)
        # the truncated SVD is the best rank-r approximation: compare with an independent torch SVD
        U, s, Vh = torch.linalg.svd(weight)
        best = (U[:, :r] * s[:r]) @ Vh[:r]
        torch.testing.assert_close(layer.dense_weight().detach()[:, :, 0, 0], best)


# ------------------------------------------------------------------------------------ bad input


def test_random_conv_default_rank_zero_raises_with_advice():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 64, 3)
    with pytest.raises(ValueError, match=r"rank 0.*leave this layer dense.*explicit rank"):
        CPConv2d.from_conv(conv)


@pytest.mark.parametrize(
    "make,kwargs,exc,match",
    [
        (lambda: nn.Linear(3, 3), {}, TypeError, "nn.Conv2d"),
        (lambda: CPConv2d(4, 4, 3, rank=2), {}, TypeError, "already a CPConv2d"),
        (lambda: nn.Conv2d(4, 4, 3, device="meta"), {"rank": 2}, ValueError, "meta"),
        (lambda: nn.LazyConv2d(4, 3), {"rank": 2}, ValueError, "uninitialised"),
        (lambda: nn.Conv2d(4, 4, 3), {"rank": 0}, ValueError, "rank must be >= 1"),
        (lambda: nn.Conv2d(4, 4, 3), {"rank": -2}, ValueError, "rank must be >= 1"),
        (lambda: nn.Conv2d(4, 4, 3), {"rank": 37}, ValueError, "exceeds the limit 36"),
        (lambda: nn.Conv2d(4, 4, 3), {"rank": 2.5}, TypeError, "rank must be"),
        (lambda: nn.Conv2d(4, 4, 3), {"rank": 2, "iterations": 3}, TypeError, "unexpected option"),
        (lambda: nn.Conv2d(4, 4, 3), {"rank": "svd"}, ValueError, "method must be one of"),
    ],
)
def test_bad_input(make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CPConv2d.from_conv(make(), **kwargs)


def test_non_finite_weights():
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        CPConv2d.from_conv(conv, rank=2)


def test_rank_selection_for_another_kernel_is_refused():
    sel = cpconv.select_rank(torch.randn(4, 4, 3, 3), 2)
    with pytest.raises(ValueError, match="was made for a kernel"):
        CPConv2d.from_conv(nn.Conv2d(4, 8, 3), rank=sel)
    with pytest.raises(TypeError, match="precomputed RankSelection"):
        CPConv2d.from_conv(nn.Conv2d(4, 4, 3), rank=sel, min_rank=2)


def test_returned_layer_forward_matches_its_dense_kernel():
    # The returned layer is an ordinary CPConv2d: its output equals the conv with its dense kernel.
    conv = planted_conv(6, 8, 3, 3, padding=1, stride=2)
    layer = CPConv2d.from_conv(conv, rank=3, seed=0, max_iter=30)
    x = torch.randn(1, 6, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.dense_weight(), conv.bias, stride=2, padding=1),
                                   rtol=1e-4, atol=1e-5)
    assert np.isfinite(layer.decomposition_info["degeneracy"])


def test_half_precision_conv_keeps_dtype():
    conv = planted_conv(6, 8, 3, 2, padding=1).to(torch.float16)
    layer = CPConv2d.from_conv(conv, rank=2, seed=0, max_iter=200)
    assert all(f.dtype == torch.float16 for f in layer.factors) and layer.bias.dtype == torch.float16
    assert layer.decomposition_info["rel_error"] < 1e-2  # float16 rounding of the factors


def test_seed_none_follows_torchs_global_rng():
    # rank 8 > kh, kw: the SVD init pads with random columns, so the seed matters.
    conv = planted_conv(16, 16, 3, 4)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(CPConv2d.from_conv(conv, rank=8, max_iter=5).out_factor.detach())
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(1)
    assert not torch.equal(runs[0], CPConv2d.from_conv(conv, rank=8, max_iter=5).out_factor.detach())


@pytest.mark.parametrize("kernel", [3, 1])
def test_frozen_conv_gives_frozen_factors(kernel):
    conv = planted_conv(8, 8, kernel, 2)
    conv.weight.requires_grad_(False)
    layer = CPConv2d.from_conv(conv, rank=2, seed=0)
    assert [p.requires_grad for p in layer.factors] == [False] * 4 and layer.bias.requires_grad
    conv.requires_grad_(False)
    assert not any(p.requires_grad for p in CPConv2d.from_conv(conv, rank=2, seed=0).parameters())
    conv.requires_grad_(True)
    assert all(p.requires_grad for p in CPConv2d.from_conv(conv, rank=2, seed=0).parameters())


# ---------------------------------------------------------------------- stabilised CP-ALS (l2_reg="auto")
@pytest.fixture(scope="module")
def trained_conv():
    """conv4 of a small AlexNet-style CNN trained on real MNIST digits (about a second)."""
    from mnist_model import small_trained_alexnet

    return small_trained_alexnet()[0].features.conv4


def _low_precision_error(layer, conv, dtype):
    """Relative error of the layer run in ``dtype`` against itself in float64 (and the same for the dense conv)."""
    x = torch.randn(2, conv.in_channels, 9, 9, generator=torch.Generator().manual_seed(0))
    out = []
    for module in (layer, conv):
        with torch.no_grad():
            ref = copy.deepcopy(module).double()(x.double())
            low = copy.deepcopy(module).to(dtype)(x.to(dtype)).double()
        out.append(float((low - ref).norm() / ref.norm()))
    return out


def test_default_cp_als_keeps_trained_kernels_well_conditioned(trained_conv):
    """On trained kernels plain CP-ALS tends to cancelling components; the default ridge + polish does not,
    at the same CP error, and the layer stays usable in bfloat16."""
    for rank in (6, 12):
        stable = CPConv2d.from_conv(trained_conv, rank=rank, seed=0)
        plain = CPConv2d.from_conv(trained_conv, rank=rank, seed=0, l2_reg=0.0)
        info, plain_info = stable.decomposition_info, plain.decomposition_info
        assert info["cp_als_options"] == {"seed": 0}
        assert info["degeneracy"] <= 3.0 + 1e-9, info
        assert info["rel_error"] <= plain_info["rel_error"] + 0.005
        # four bfloat16 roundings (eps 2^-8 = 0.004) of the stages: a few percent; cancelling components
        # of size 10-100x multiply that (measured 0.1-2.9 on trained convs before)
        layer_err, dense_err = _low_precision_error(stable, trained_conv, torch.bfloat16)
        assert layer_err < 0.05 and dense_err < 0.01, (layer_err, dense_err)


def test_default_cp_als_still_recovers_exact_kernels():
    conv = planted_conv(12, 16, 3, 5, padding=1, dtype=torch.float64)
    layer = CPConv2d.from_conv(conv, rank=5, seed=0)
    assert layer.decomposition_info["rel_error"] < 1e-6  # the polish removes the ridge's bias (~1e-3)
    ridge_only = CPConv2d.from_conv(conv, rank=5, seed=0, l2_reg=1e-3)
    assert ridge_only.decomposition_info["rel_error"] > 1e-4


@pytest.mark.parametrize("value, exc, match", [
    ("none", ValueError, "l2_reg must be 'auto' or a number >= 0, got 'none'"),
    (-1.0, ValueError, "l2_reg must be"),
])
def test_bad_l2_reg(value, exc, match):
    with pytest.raises(exc, match=match):
        CPConv2d.from_conv(planted_conv(4, 4, 3, 2), rank=2, l2_reg=value)
    with pytest.raises(exc, match=match):
        cpconv.compress(nn.Sequential(planted_conv(4, 4, 3, 2)), rank=2, l2_reg=value, progress=False)
