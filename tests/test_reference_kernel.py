"""The C++ reference CP convolution against F.conv2d on a kernel rebuilt in the test."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cpconv
from cpconv import cp_conv2d_reference

from test_cp_conv import kernel_from_factors


def random_case(rng: random.Random):
    groups = rng.randint(1, 4)
    cg, ng, rg = rng.randint(1, 64 // groups), rng.randint(1, 64 // groups), rng.randint(1, 6)
    kh, kw = rng.randint(1, 7), rng.randint(1, 7)
    stride = (rng.randint(1, 3), rng.randint(1, 3))
    dilation = (rng.randint(1, 3), rng.randint(1, 3))
    padding = (rng.randint(0, 3), rng.randint(0, 3))
    h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]) + rng.randint(0, 8)
    w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]) + rng.randint(0, 8)
    return dict(groups=groups, C=cg * groups, N=ng * groups, R=rg * groups, kh=kh, kw=kw, stride=stride,
                dilation=dilation, padding=padding, B=rng.randint(1, 3), H=h, W=w, bias=rng.random() < 0.5)


def make_factors(case, gen):
    g = case["groups"]
    U = torch.randn(case["N"], case["R"] // g, generator=gen)
    S = torch.randn(case["C"] // g, case["R"], generator=gen)
    Y = torch.randn(case["kh"], case["R"], generator=gen)
    X = torch.randn(case["kw"], case["R"], generator=gen)
    return U, S, Y, X


@pytest.mark.parametrize("seed", range(300))
def test_reference_matches_conv2d(seed):
    case = random_case(random.Random(seed))
    gen = torch.Generator().manual_seed(seed)
    U, S, Y, X = make_factors(case, gen)
    bias = torch.randn(case["N"], generator=gen) if case["bias"] else None
    x = torch.randn(case["B"], case["C"], case["H"], case["W"], generator=gen)
    kernel = kernel_from_factors(U.double(), S.double(), Y.double(), X.double(), case["groups"])
    expected = F.conv2d(x.double(), kernel, None if bias is None else bias.double(), case["stride"],
                        case["padding"], case["dilation"], case["groups"])
    got = cp_conv2d_reference(x, (U, S, Y, X), bias, stride=case["stride"], padding=case["padding"],
                              dilation=case["dilation"], groups=case["groups"])
    assert got.dtype == torch.float32 and got.shape == expected.shape, case
    err = (got.double() - expected).abs().max().item()
    assert err <= 1e-5 * (expected.abs().max().item() + 1.0), f"{case}: max abs error {err}"


def test_reference_accepts_noncontiguous_and_numpy_inputs():
    gen = torch.Generator().manual_seed(0)
    U, S, Y, X = torch.randn(5, 3, generator=gen), torch.randn(4, 3, generator=gen), torch.randn(3, 3, generator=gen), \
        torch.randn(2, 3, generator=gen)
    x = torch.randn(2, 4, 20, 18, generator=gen)[:, :, ::2, ::2]
    expected = F.conv2d(x, kernel_from_factors(U, S, Y, X, 1), padding=1)
    got = cp_conv2d_reference(x, (U, S.t().contiguous().t(), Y, X), padding=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    got_np = cp_conv2d_reference(x.contiguous().numpy(), tuple(f.numpy() for f in (U, S, Y, X)), padding=1)
    torch.testing.assert_close(got_np, expected, rtol=1e-5, atol=1e-5)


def test_reference_matches_cpconv2d_module():
    torch.manual_seed(1)
    layer = cpconv.CPConv2d(6, 4, (3, 2), rank=4, stride=(1, 2), padding=(1, 2), dilation=(2, 1), groups=2)
    x = torch.randn(3, 6, 11, 9)
    with torch.no_grad():
        expected = layer(x)
        got = cp_conv2d_reference(x, layer.factors, layer.bias, stride=layer.stride, padding=layer.padding,
                                  dilation=layer.dilation, groups=layer.groups)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


FACTORS = (torch.randn(4, 2), torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2))


@pytest.mark.parametrize(
    "x, factors, kwargs, error, match",
    [
        (torch.randn(1, 3, 8, 8, dtype=torch.float64), FACTORS, {}, TypeError, "x must be float32"),
        (torch.ones(1, 3, 8, 8, dtype=torch.int32), FACTORS, {}, TypeError, "x must be float32"),
        (torch.randn(3, 8, 8), FACTORS, {}, ValueError, "4-D"),
        (torch.randn(1, 5, 8, 8), FACTORS, {}, ValueError, "channels"),
        (torch.randn(1, 3, 2, 2), FACTORS, {}, ValueError, "smaller than the dilated kernel"),
        (torch.randn(1, 3, 8, 8), FACTORS[:3], {}, ValueError, r"\(U, S, Y, X\)"),
        (torch.randn(1, 3, 8, 8), (FACTORS[0].double(),) + FACTORS[1:], {}, TypeError, "U must be float32"),
        (torch.randn(1, 3, 8, 8), (torch.randn(4, 3),) + FACTORS[1:], {}, ValueError, "out_factor"),
        (torch.randn(1, 3, 8, 8), FACTORS, dict(stride=0), ValueError, "stride must be >= 1"),
        (torch.randn(1, 3, 8, 8), FACTORS, dict(groups=0), ValueError, "groups"),
        (torch.randn(1, 3, 8, 8), FACTORS, dict(bias=torch.randn(3)), ValueError, "bias"),
        ("not a tensor", FACTORS, {}, ValueError, "4-D"),
    ],
)
def test_reference_bad_inputs(x, factors, kwargs, error, match):
    with pytest.raises(error, match=match):
        cp_conv2d_reference(x, factors, **kwargs)


def test_core_binding_refuses_silent_conversion():
    """The raw binding takes float32 C-contiguous arrays only (no converting copy of the output)."""
    x = np.zeros((1, 3, 8, 8), dtype=np.float64)
    f = [a.numpy() for a in FACTORS]
    out = np.zeros((1, 4, 6, 6), dtype=np.float32)
    with pytest.raises(TypeError):
        cpconv._core.reference.cp_conv2d(x, f[1], f[2], f[3], f[0], None, out, (1, 1), (0, 0), (1, 1), 1)
    with pytest.raises(TypeError):
        cpconv._core.reference.cp_conv2d(x.astype(np.float32), f[1], f[2], f[3], f[0], None,
                                         np.zeros((1, 4, 6, 6), dtype=np.float64), (1, 1), (0, 0), (1, 1), 1)
