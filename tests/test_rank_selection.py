"""select_rank: VBMF on the two unfoldings, combine rules, weakening, energy/ratio/int methods, clamping,
groups, the rank-0 policy, and bad input."""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import cpconv
from cpconv.rank_selection import RatioNotMetWarning, check_rank_options


def tucker_kernel(N, C, kh, kw, r_out, r_in, seed=0, noise=1e-3):
    """A kernel whose output unfolding has rank r_out and input unfolding rank r_in, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, kh, kw, generator=g, dtype=torch.float64)
    A = torch.linalg.qr(torch.randn(N, r_out, generator=g, dtype=torch.float64))[0]
    B = torch.linalg.qr(torch.randn(C, r_in, generator=g, dtype=torch.float64))[0]
    W = torch.einsum("abij,na,cb->ncij", core, A, B)
    W = W / W.std()
    return (W + noise * torch.randn(W.shape, generator=g, dtype=torch.float64)).float()


def own_unfoldings(W):
    W = np.asarray(W, dtype=np.float64)
    return {"output": W.reshape(W.shape[0], -1), "input": W.transpose(1, 0, 2, 3).reshape(W.shape[1], -1)}


@pytest.fixture(scope="module")
def kernel():
    return tucker_kernel(64, 32, 3, 3, r_out=12, r_in=5)


def test_evbmf_mode_ranks_and_details(kernel):
    sel = cpconv.select_rank(kernel)
    assert sel.mode_ranks == {"output": 12, "input": 5}
    assert sel.rank == 12 and sel.method == "evbmf" and sel.combine == "max"
    unf = own_unfoldings(kernel)
    for mode in ("output", "input"):
        (result,) = sel.details[mode]
        assert result.rank == cpconv.evbmf(unf[mode]).rank
        np.testing.assert_allclose(result.singular_values, np.linalg.svd(unf[mode], compute_uv=False), rtol=1e-9)
    assert "EVBMF" in sel.reason and not sel.leave_dense
    d = json.loads(json.dumps(sel.to_dict()))
    assert d["rank"] == 12 and d["mode_ranks"] == {"output": 12, "input": 5}
    assert len(d["details"]["output"]) == 1 and d["details"]["output"][0]["rank"] == 12


@pytest.mark.parametrize("combine,expected", [("max", 12), ("min", 5), ("mean", 9), ("output", 12), ("input", 5)])
def test_combine_rules(kernel, combine, expected):
    sel = cpconv.select_rank(kernel, combine=combine)
    assert sel.rank == expected and sel.combine == combine


def test_conv_and_weight_give_the_same_answer(kernel):
    conv = nn.Conv2d(32, 64, 3)
    with torch.no_grad():
        conv.weight.copy_(kernel)
    a, b = cpconv.select_rank(conv), cpconv.select_rank(kernel.numpy())
    assert a.rank == b.rank and a.mode_ranks == b.mode_ranks


def test_weakening_formula_and_monotonicity(kernel):
    full = {"output": 64, "input": 32}
    evb = {"output": 12, "input": 5}
    previous = None
    for w in np.linspace(0.0, 1.0, 11):
        sel = cpconv.select_rank(kernel, weakening=w)
        for mode in ("output", "input"):
            expected = max(math.floor(full[mode] - w * (full[mode] - evb[mode]) + 1e-9), 0)
            assert sel.mode_ranks[mode] == expected, (w, mode)
        if previous is not None:
            assert sel.rank <= previous
        previous = sel.rank
    assert cpconv.select_rank(kernel, weakening=0.0).mode_ranks == full
    assert cpconv.select_rank(kernel, weakening=1.0).mode_ranks == evb


def test_vbmf_method_uses_prior(kernel):
    unf = own_unfoldings(kernel)
    for prior in (0.05, 1.0):
        sel = cpconv.select_rank(kernel, "vbmf", prior=prior)
        assert sel.mode_ranks == {m: cpconv.vbmf(unf[m], prior).rank for m in unf}
        assert sel.options == {"prior": prior, "sigma2": None}
    sel = cpconv.select_rank(kernel, "vbmf", prior=1.0, sigma2=1e-2)
    assert sel.mode_ranks == {m: cpconv.vbmf(unf[m], 1.0, 1e-2).rank for m in unf}


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99, 1.0])
def test_energy_method(kernel, energy):
    sel = cpconv.select_rank(kernel, "energy", energy=energy)
    unf = own_unfoldings(kernel)
    for mode in ("output", "input"):
        g = np.linalg.svd(unf[mode], compute_uv=False)
        frac = np.cumsum(g**2) / np.sum(g**2)
        r = sel.mode_ranks[mode]
        assert frac[r - 1] >= energy * (1 - 1e-9)
        assert r == 1 or frac[r - 2] < energy
    assert sel.rank == max(sel.mode_ranks.values())
    if energy == 1.0:
        assert sel.mode_ranks["input"] == 32


@pytest.mark.parametrize("ratio", [2.0, 5.0, 20.0])
def test_ratio_method(kernel, ratio):
    sel = cpconv.select_rank(kernel, "ratio", ratio=ratio)
    per_rank = 64 + 32 + 3 + 3
    dense = 64 * 32 * 9
    assert dense / (sel.rank * per_rank) >= ratio
    assert dense / ((sel.rank + 1) * per_rank) < ratio
    assert sel.parameter_ratio == pytest.approx(dense / (sel.rank * per_rank))
    # Rounded down to the multiple so that the target ratio still holds.
    sel4 = cpconv.select_rank(kernel, "ratio", ratio=ratio, multiple_of=4)
    assert sel4.rank % 4 == 0 and sel4.rank <= sel.rank and dense / (sel4.rank * per_rank) >= ratio


def test_int_method_and_limit(kernel):
    assert cpconv.max_cp_rank((64, 32, 3, 3)) == 32 * 9
    assert cpconv.max_cp_rank((64, 32, 1, 1)) == 32
    assert cpconv.max_cp_rank((64, 16, 3, 3), groups=2) == 2 * 16 * 9
    sel = cpconv.select_rank(kernel, 17)
    assert sel.rank == 17 and sel.method == "fixed" and sel.mode_ranks == {}
    assert cpconv.select_rank(kernel, 288).rank == 288
    with pytest.raises(ValueError, match="exceeds the limit 288"):
        cpconv.select_rank(kernel, 289)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="rank must be >= 1"):
            cpconv.select_rank(kernel, bad)


def test_min_max_multiple_of(kernel):
    assert cpconv.select_rank(kernel, min_rank=20).rank == 20
    assert cpconv.select_rank(kernel, max_rank=7).rank == 7
    assert cpconv.select_rank(kernel, multiple_of=8).rank == 16  # 12 rounded up
    assert cpconv.select_rank(kernel, multiple_of=8, max_rank=15).rank == 8  # up would exceed max_rank
    sel = cpconv.select_rank(kernel, 7, multiple_of=4)
    assert sel.rank == 8 and sel.unadjusted_rank == 7 and "adjusted to 8" in sel.reason
    with pytest.raises(ValueError, match="multiple of 16"):
        cpconv.select_rank(kernel, multiple_of=16, max_rank=15)
    with pytest.raises(ValueError, match="max_rank=3 must be >= min_rank=5"):
        cpconv.select_rank(kernel, min_rank=5, max_rank=3)


def test_groups_decomposed_per_group():
    w0 = tucker_kernel(32, 16, 3, 3, r_out=4, r_in=3, seed=1)
    w1 = tucker_kernel(32, 16, 3, 3, r_out=7, r_in=2, seed=2)
    conv = nn.Conv2d(32, 64, 3, groups=2)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([w0, w1]))
    sel = cpconv.select_rank(conv)
    assert sel.groups == 2 and len(sel.details["output"]) == 2
    assert [d.rank for d in sel.details["output"]] == [4, 7]
    assert [d.rank for d in sel.details["input"]] == [3, 2]
    # per mode the largest group rank; total = groups x combined per-group rank
    assert sel.mode_ranks == {"output": 14, "input": 6}
    assert sel.rank == 14
    assert cpconv.select_rank(conv, combine="min").rank == 6
    assert cpconv.select_rank(conv, 5).rank == 6  # rounded up to a multiple of groups
    assert cpconv.select_rank(conv, multiple_of=3).rank == 18  # lcm(3, 2) = 6
    assert cpconv.select_rank(conv.weight, groups=2).rank == 14
    with pytest.raises(ValueError, match="contradicts"):
        cpconv.select_rank(conv, groups=1)


def test_depthwise_conv():
    conv = nn.Conv2d(8, 8, 3, groups=8)
    sel = cpconv.select_rank(conv, 8)
    # each group's kernel is 1 x 1 x 3 x 3, a 3 x 3 matrix: rank <= 3 per group
    assert sel.rank == 8 and sel.rank_limit == 24
    assert cpconv.select_rank(conv, 24).rank == 24
    with pytest.raises(ValueError, match="exceeds the limit 24"):
        cpconv.select_rank(conv, 32)


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (128, 64, 3, 3), (96, 3, 11, 11), (64, 64, 1, 1)])
def test_rank_zero_policy_for_random_kernel(shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], shape[0], shape[2:])
    sel = cpconv.select_rank(conv)  # default min_rank=1 does not lift 0
    assert sel.rank == 0 and sel.leave_dense
    assert "leave this layer dense" in sel.reason and "explicit integer rank" in sel.reason
    assert sel.parameter_ratio is None
    d = json.loads(json.dumps(sel.to_dict()))
    assert d["rank"] == 0 and d["leave_dense"] is True
    # Weakening moves towards the full rank, so a weakened selection is positive.
    assert cpconv.select_rank(conv, weakening=0.5).rank > 0
    # An explicit rank still decomposes it.
    assert cpconv.select_rank(conv, 4).rank == 4


def test_rank_zero_for_all_zero_kernel():
    zero = torch.zeros(8, 4, 3, 3)
    for method, kwargs in (("evbmf", {}), ("energy", {"energy": 0.9})):
        sel = cpconv.select_rank(zero, method, **kwargs)
        assert sel.rank == 0 and "leave this layer dense" in sel.reason


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda k: cpconv.select_rank(cpconv.CPConv2d(4, 4, 3, rank=2)), TypeError, "already decomposed"),
        (lambda k: cpconv.select_rank(nn.Linear(3, 3)), TypeError, "nn.Conv2d"),
        (lambda k: cpconv.select_rank([[1.0]]), TypeError, "nn.Conv2d"),
        (lambda k: cpconv.select_rank(torch.ones(4, 4, 3, 3, dtype=torch.int64)), TypeError, "floating"),
        (lambda k: cpconv.select_rank(torch.full((4, 4, 3, 3), float("nan"))), ValueError, "non-finite"),
        (lambda k: cpconv.select_rank(torch.ones(4, 4, 3)), ValueError, "4-D"),
        (lambda k: cpconv.select_rank(torch.ones(0, 4, 3, 3)), ValueError, "empty"),
        (lambda k: cpconv.select_rank(nn.Conv2d(4, 4, 3, device="meta")), ValueError, "meta"),
        (lambda k: cpconv.select_rank(k, "svd"), ValueError, "method must be one of"),
        (lambda k: cpconv.select_rank(k, True), TypeError, "method"),
        (lambda k: cpconv.select_rank(k, combine="sum"), ValueError, "combine"),
        (lambda k: cpconv.select_rank(k, weakening=1.5), ValueError, "weakening"),
        (lambda k: cpconv.select_rank(k, "energy", weakening=0.5), ValueError, "weakening applies"),
        (lambda k: cpconv.select_rank(k, energy=0.5), TypeError, "unexpected option"),
        (lambda k: cpconv.select_rank(k, "vbmf"), TypeError, "prior"),
        (lambda k: cpconv.select_rank(k, "vbmf", prior=-1.0), ValueError, "prior"),
        (lambda k: cpconv.select_rank(k, "energy", energy=1.5), ValueError, "energy"),
        (lambda k: cpconv.select_rank(k, "ratio"), TypeError, "ratio"),
        (lambda k: cpconv.select_rank(k, "ratio", ratio=0), ValueError, "ratio"),
        (lambda k: cpconv.select_rank(k, min_rank=0), ValueError, "min_rank"),
        (lambda k: cpconv.select_rank(k, max_rank=2.5), TypeError, "max_rank"),
        (lambda k: cpconv.select_rank(k, multiple_of=0), ValueError, "multiple_of"),
        (lambda k: cpconv.select_rank(torch.ones(6, 4, 3, 3), groups=4), ValueError, "divisible"),
    ],
)
def test_bad_input(kernel, call, exc, match):
    with pytest.raises(exc, match=match):
        call(kernel)


def test_rank_limit_respects_the_cp_als_cap():
    from cpconv.cp_als import MAX_CP_ALS_RANK

    assert cpconv.max_cp_rank((1024, 1024, 3, 3)) == MAX_CP_ALS_RANK  # bound 9216 capped
    assert cpconv.max_cp_rank((2048, 1024, 3, 3), groups=2) == 2 * MAX_CP_ALS_RANK
    assert cpconv.max_cp_rank((8192, 6000, 1, 1)) == 6000  # 1x1: truncated SVD, no ALS cap


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4]),
    c_g=st.integers(1, 6),
    n_g=st.integers(1, 6),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    method=st.one_of(st.integers(1, 400), st.sampled_from(["ratio", "energy", "evbmf"])),
    min_rank=st.integers(1, 12),
    extra=st.one_of(st.none(), st.integers(0, 30)),
    multiple_of=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_clamping_invariants(groups, c_g, n_g, kh, kw, method, min_rank, extra, multiple_of, seed):
    weight = torch.randn(n_g * groups, c_g, kh, kw, generator=torch.Generator().manual_seed(seed))
    limit = cpconv.max_cp_rank(weight.shape, groups)
    max_rank = None if extra is None else min_rank + extra
    options = {"ratio": 2.0} if method == "ratio" else {}
    step = math.lcm(multiple_of, groups)
    cap = limit if max_rank is None else min(limit, max_rank)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sel = cpconv.select_rank(weight, method, min_rank=min_rank, max_rank=max_rank,
                                     multiple_of=multiple_of, groups=groups, **options)
    except ValueError as e:
        # only two legitimate refusals: an int rank above the limit, or no multiple of step under the cap
        assert ("exceeds the limit" in str(e) and isinstance(method, int) and method > limit) or (
            "no rank that is a multiple" in str(e) and cap < step), str(e)
        return
    assert sel.rank % step == 0 and sel.rank <= cap and sel.rank <= limit
    # A ratio that the smallest allowed rank cannot meet is said, never silent.
    missed = method == "ratio" and sel.parameter_ratio < 2.0
    assert [w.category for w in caught] == ([RatioNotMetWarning] if missed else [])
    if sel.rank == 0:
        assert method in ("evbmf", "energy") and "leave this layer dense" in sel.reason
    elif method != "ratio":
        # rounded up from max(unadjusted, min_rank) unless the cap forced it down
        wanted = max(min(max(sel.unadjusted_rank, min_rank), cap), 1)
        assert sel.rank >= wanted or sel.rank == cap // step * step
    json.dumps(sel.to_dict())


def test_ratio_that_cannot_be_met_warns_and_keeps_the_floor():
    conv = nn.Conv2d(16, 32, 3)
    with pytest.warns(RatioNotMetWarning, match=r"ratio 1e\+06 is not met .*\(32, 16, 3, 3\).*rank 1 gives only 85.3x"):
        sel = cpconv.select_rank(conv, "ratio", ratio=1e6)
    assert sel.rank == 1 and sel.parameter_ratio == pytest.approx(32 * 16 * 9 / 54)
    assert "is not met" in sel.reason
    # min_rank lifting the rank above what the ratio allows is said too; a met ratio is silent.
    with pytest.warns(RatioNotMetWarning, match="smallest allowed rank 40"):
        cpconv.select_rank(conv, "ratio", ratio=4.0, min_rank=40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpconv.select_rank(conv, "ratio", ratio=4.0).parameter_ratio >= 4.0


def test_check_rank_options_raises_what_select_rank_raises_without_computing():
    conv = nn.Conv2d(32, 8, 1)
    check_rank_options(conv, 8)
    check_rank_options(conv, "evbmf", max_rank=4)
    for args, kwargs, exc, match in [
        ((12,), {}, ValueError, "rank 12 exceeds the limit 8"),
        (("vbmf",), {}, TypeError, "prior"),
        (("ratio",), {}, TypeError, "ratio"),
        (("energy",), {"energy": 2.0}, ValueError, "energy"),
        (("evbmf",), {"max_rank": 2, "multiple_of": 4}, ValueError, "no rank that is a multiple of 4"),
    ]:
        with pytest.raises(exc, match=match):
            check_rank_options(conv, *args, **kwargs)
        with pytest.raises(exc, match=match):
            cpconv.select_rank(conv, *args, **kwargs)


def test_energy_rank_is_scale_invariant():
    kernel = tucker_kernel(16, 8, 3, 3, 3, 2, noise=1e-3).double()
    base = cpconv.select_rank(kernel, "energy", energy=0.99)
    assert base.rank > 0
    for scale in (1e-170, 1e-150, 1e150, 1e160):
        assert cpconv.select_rank(kernel * scale, "energy", energy=0.99).mode_ranks == base.mode_ranks, scale
