"""EVBMF / VBMF: the C++ solver against an independent numpy implementation of DESIGN.md's formulas,
planted-rank recovery, scale invariance, the exact tau_bar, and bad input."""

import math

import numpy as np
import pytest
import torch

import cpconv

# ---------------------------------------------------------------------------------------------------
# Independent numpy reference, written from the formulas (not from the C++ code): full psi with the
# -log x term, the residual and (L - H) log s terms, a dense log-grid scan and golden-section polish.


def ref_tau_bar(alpha):
    def f(t):
        return math.log(t + 1) + alpha * math.log(t / alpha + 1) - t

    lo, hi = math.sqrt(alpha), 10.0
    assert f(lo) > 0 > f(hi)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def ref_tau(x, alpha):
    return 0.5 * (x - (1 + alpha) + np.sqrt((x - (1 + alpha)) ** 2 - 4 * alpha))


def ref_omega(s, g, L, M, frob2, x_bar):
    alpha = L / M
    H = len(g)
    x = g**2 / (M * s)
    psi = x - np.log(x)
    big = x > x_bar
    t = ref_tau(x[big], alpha)
    psi[big] += np.log(t + 1) + alpha * np.log(t / alpha + 1) - t
    residual = frob2 - np.sum(g**2)
    return np.sum(psi) + residual / (M * s) + (L - H) * np.log(s)


def ref_evbmf(Y):
    Y = np.asarray(Y, dtype=np.float64)
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    alpha = L / M
    g = np.linalg.svd(Y, compute_uv=False)
    frob2 = float(np.sum(Y**2))
    H = L
    tau_bar = ref_tau_bar(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    h_bar = min(math.ceil(L / (1 + alpha)) - 1, H)
    upper = frob2 / (L * M)
    lower = max(g[h_bar] ** 2 / (M * x_bar), np.mean(g[h_bar:] ** 2) / M)
    grid = np.exp(np.linspace(np.log(lower), np.log(upper), 4001))
    values = np.array([ref_omega(s, g, L, M, frob2, x_bar) for s in grid])
    i = int(np.argmin(values))
    a, b = np.log(grid[max(i - 1, 0)]), np.log(grid[min(i + 1, len(grid) - 1)])
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        c, d = b - phi * (b - a), a + phi * (b - a)
        if ref_omega(math.exp(c), g, L, M, frob2, x_bar) <= ref_omega(math.exp(d), g, L, M, frob2, x_bar):
            b = d
        else:
            a = c
    s = math.exp(0.5 * (a + b))
    threshold = math.sqrt(M * s * x_bar)
    rank = int(np.sum(g > threshold))
    kept = g[:rank]
    shrunk = np.zeros_like(g)
    q = 1 - (L + M) * s / kept**2
    shrunk[:rank] = kept / 2 * (q + np.sqrt(q**2 - 4 * L * M * s**2 / kept**4))
    return dict(rank=rank, sigma2=s, threshold=threshold, shrunk=shrunk, tau_bar=tau_bar, g=g)


def ref_vbmf_given_sigma(g, L, M, prior, s):
    t = (L + M + s / prior**2) / 2
    threshold = math.sqrt(s * (t + math.sqrt(t * t - L * M)))
    rank = int(np.sum(g > threshold))
    kept = g[:rank]
    shrunk = np.zeros_like(g)
    shrunk[:rank] = kept * (1 - s / (2 * kept**2) * (L + M + np.sqrt((M - L) ** 2 + 4 * kept**2 / prior**2)))
    return rank, threshold, shrunk


# ---------------------------------------------------------------------------------------------------


def planted(L, M, rank, rng, sigma=1.0, strength=(2.5, 5.0)):
    """Signal of the given rank whose singular values sit well above the EVB threshold, plus noise."""
    Lm, Mm = min(L, M), max(L, M)
    alpha = Lm / Mm
    tb = ref_tau_bar(alpha)
    edge = sigma * math.sqrt(Mm * (1 + tb) * (1 + alpha / tb))
    U = np.linalg.qr(rng.standard_normal((L, rank)))[0]
    V = np.linalg.qr(rng.standard_normal((M, rank)))[0]
    d = edge * rng.uniform(*strength, size=rank)
    return (U * d) @ V.T + sigma * rng.standard_normal((L, M))


SHAPES = [
    (10, 1000, 2),  # alpha = 0.01
    (20, 400, 3),   # alpha = 0.05
    (32, 320, 4),   # alpha = 0.1
    (64, 576, 8),   # a 3x3 conv's output unfolding
    (40, 80, 5),
    (60, 60, 6),    # alpha = 1
    (120, 30, 3),   # tall
    (500, 50, 7),   # tall, alpha = 0.1
    (96, 96, 0),    # pure noise
]


@pytest.mark.parametrize("L,M,rank", SHAPES)
def test_planted_rank_recovered_and_matches_numpy_reference(L, M, rank):
    rng = np.random.default_rng(L * 1000 + M)
    Y = planted(L, M, rank, rng)
    got = cpconv.evbmf(Y)
    ref = ref_evbmf(Y)
    assert got.rank == rank == ref["rank"]
    assert got.transposed == (L > M)
    assert (got.L, got.M) == (min(L, M), max(L, M))
    assert got.sigma2 == pytest.approx(1.0, rel=0.15)  # the planted noise variance
    assert got.sigma2 == pytest.approx(ref["sigma2"], rel=1e-5)
    assert got.threshold == pytest.approx(ref["threshold"], rel=1e-5)
    np.testing.assert_allclose(got.singular_values, ref["g"], rtol=1e-10)
    np.testing.assert_allclose(got.shrunk, ref["shrunk"], rtol=1e-4, atol=1e-9)
    assert np.all(got.shrunk[:rank] < got.singular_values[:rank])  # shrinkage shrinks
    assert np.all(got.shrunk[rank:] == 0)
    lo, hi = got.search_bounds
    assert lo <= got.sigma2 <= hi


@pytest.mark.parametrize("seed", range(6))
def test_decaying_spectra_match_numpy_reference(seed):
    # Spectra without a clean gap (like trained conv kernels): the two searches must still agree.
    rng = np.random.default_rng(100 + seed)
    L, M = [(16, 144), (48, 432), (30, 90), (64, 64), (200, 24), (8, 8)][seed]
    Lm = min(L, M)
    U = np.linalg.qr(rng.standard_normal((L, Lm)))[0]
    V = np.linalg.qr(rng.standard_normal((M, Lm)))[0]
    d = np.exp(-np.arange(Lm) / (0.2 * Lm + 1)) * 10 * math.sqrt(M)
    Y = (U * d) @ V.T + 0.3 * rng.standard_normal((L, M))
    got = cpconv.evbmf(Y)
    ref = ref_evbmf(Y)
    assert got.rank == ref["rank"]
    assert got.sigma2 == pytest.approx(ref["sigma2"], rel=1e-5)
    assert got.threshold == pytest.approx(ref["threshold"], rel=1e-5)
    np.testing.assert_allclose(got.shrunk, ref["shrunk"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("L,M,rank", [(64, 576, 8), (120, 30, 3), (10, 1000, 2)])
def test_scale_invariance(L, M, rank):
    rng = np.random.default_rng(7)
    Y = planted(L, M, rank, rng)
    base = cpconv.evbmf(Y)
    for scale in [1e-6, 1e-3, 1.0, 1e3, 1e6]:
        for dtype in (np.float64, np.float32):
            got = cpconv.evbmf((Y * scale).astype(dtype))
            assert got.rank == base.rank == rank, (scale, dtype)
            rel = 1e-5 if dtype == np.float64 else 1e-3
            assert got.sigma2 == pytest.approx(base.sigma2 * scale**2, rel=rel), (scale, dtype)
            assert got.threshold == pytest.approx(base.threshold * scale, rel=rel), (scale, dtype)


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-150, 1e150, 1e300])
def test_scale_invariance_to_the_limits_of_float64(scale):
    # Squares of the entries under/overflow at these scales: 1e-300 * Y used to give rank 0.
    rng = np.random.default_rng(7)
    Y = planted(40, 120, 4, rng)
    base, base_vb = cpconv.evbmf(Y), cpconv.vbmf(Y, prior=10.0)
    got, got_vb = cpconv.evbmf(Y * scale), cpconv.vbmf(Y * scale, prior=10.0 * scale)
    assert got.rank == base.rank == 4 and got_vb.rank == base_vb.rank
    assert got.threshold == pytest.approx(base.threshold * scale, rel=1e-6)  # the noise search's tolerance
    np.testing.assert_allclose(got.shrunk, base.shrunk * scale, rtol=1e-6)
    np.testing.assert_allclose(got.singular_values, base.singular_values * scale, rtol=1e-9)
    if 1e-150 <= scale <= 1e150:  # sigma2 ~ scale**2 is representable
        assert got.sigma2 == pytest.approx(base.sigma2 * scale**2, rel=1e-6)
    # A known sigma2 goes with the matrix's units too.
    given = cpconv.vbmf(Y * 1e-120, prior=10.0 * 1e-120, sigma2=base.sigma2 * 1e-240)
    assert given.rank == cpconv.vbmf(Y, prior=10.0, sigma2=base.sigma2).rank


def test_small_magnitude_cnn_like_weights():
    # Trained CNN weights are ~1e-2..1e-3, so sigma2 < 1e-5: where absolute-tolerance searches break.
    rng = np.random.default_rng(3)
    Y = planted(64, 576, 10, rng) * 1e-4
    got = cpconv.evbmf(torch.from_numpy(Y).float())
    assert got.rank == 10
    assert got.sigma2 == pytest.approx(1e-8, rel=0.15)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.1, 0.03, 0.01, 0.001])
def test_tau_bar_solves_its_equation(alpha):
    tau = cpconv.evbmf_tau_bar(alpha)
    assert tau > math.sqrt(alpha)
    assert abs(math.log(tau + 1) + alpha * math.log(tau / alpha + 1) - tau) < 1e-12
    assert tau == pytest.approx(ref_tau_bar(alpha), rel=1e-12)


def test_tau_bar_differs_from_the_approximate_constant_at_small_alpha():
    assert cpconv.evbmf_tau_bar(1.0) == pytest.approx(2.5129, rel=1e-3)
    for alpha, min_gap in [(0.1, 0.02), (0.01, 0.1)]:
        approx = 2.5129 * math.sqrt(alpha)
        assert abs(cpconv.evbmf_tau_bar(alpha) - approx) / approx > min_gap


@pytest.mark.parametrize("shape", [(64, 576), (128, 128), (32, 16 * 9), (300, 27)])
def test_random_kernel_has_rank_zero(shape):
    # An untrained (i.i.d. random) kernel has no structure above the noise.
    weight = torch.nn.init.kaiming_uniform_(torch.empty(*shape), a=math.sqrt(5))
    got = cpconv.evbmf(weight)
    assert got.rank == 0
    assert np.all(got.shrunk == 0)
    assert got.threshold > got.singular_values[0]


def test_zero_matrix_rank_zero():
    got = cpconv.evbmf(np.zeros((5, 7)))
    assert got.rank == 0 and got.sigma2 == 0 and got.threshold == 0


def test_exact_low_rank_without_noise():
    rng = np.random.default_rng(5)
    Y = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 90))
    got = cpconv.evbmf(Y)
    assert got.rank == 3
    assert got.sigma2 < 1e-10 * np.mean(Y**2)


def test_torch_numpy_and_transpose_agree():
    rng = np.random.default_rng(11)
    Y = planted(48, 200, 5, rng).astype(np.float32)
    a = cpconv.evbmf(Y)
    b = cpconv.evbmf(torch.from_numpy(Y))
    c = cpconv.evbmf(Y.T.copy())
    assert a.rank == b.rank == c.rank == 5
    assert a.sigma2 == b.sigma2
    assert c.sigma2 == pytest.approx(a.sigma2, rel=1e-6)
    assert not a.transposed and c.transposed


def test_result_to_dict_is_json_serialisable():
    import json

    got = cpconv.evbmf(np.random.default_rng(0).standard_normal((6, 9)))
    d = json.loads(json.dumps(got.to_dict()))
    assert d["rank"] == got.rank and d["method"] == "evbmf" and len(d["singular_values"]) == 6


# --------------------------------------------------------------------------------------- VBMF


@pytest.mark.parametrize("prior", [0.05, 0.5, 5.0, 1e3])
def test_vbmf_given_sigma_matches_formula(prior):
    rng = np.random.default_rng(2)
    Y = planted(30, 120, 4, rng)
    g = np.linalg.svd(Y, compute_uv=False)
    got = cpconv.vbmf(Y, prior, sigma2=1.0)
    rank, threshold, shrunk = ref_vbmf_given_sigma(g, 30, 120, prior, 1.0)
    assert got.rank == rank
    assert got.threshold == pytest.approx(threshold, rel=1e-12)
    np.testing.assert_allclose(got.shrunk, shrunk, rtol=1e-9, atol=1e-12)
    assert not got.sigma2_estimated and got.sigma2 == 1.0 and got.prior == prior


def test_vbmf_threshold_limits_and_monotonicity():
    rng = np.random.default_rng(4)
    Y = planted(20, 80, 3, rng)
    # c -> infinity (flat prior): threshold -> sqrt(M sigma2); smaller c -> larger threshold, fewer kept.
    assert cpconv.vbmf(Y, 1e8, sigma2=2.0).threshold == pytest.approx(math.sqrt(80 * 2.0), rel=1e-9)
    thresholds = [cpconv.vbmf(Y, c, sigma2=1.0).threshold for c in (1e3, 1.0, 0.1, 0.01)]
    assert thresholds == sorted(thresholds)
    ranks = [cpconv.vbmf(Y, c, sigma2=1.0).rank for c in (1e3, 1.0, 0.1, 0.01)]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] >= 3 and ranks[-1] == 0


def test_vbmf_estimated_sigma_uses_evb_noise_search_and_is_scale_invariant():
    rng = np.random.default_rng(6)
    Y = planted(40, 160, 4, rng)
    e = cpconv.evbmf(Y)
    got = cpconv.vbmf(Y, prior=10.0)
    assert got.sigma2_estimated and got.sigma2 == pytest.approx(e.sigma2, rel=1e-12)
    rank, threshold, _ = ref_vbmf_given_sigma(e.singular_values, 40, 160, 10.0, got.sigma2)
    assert got.rank == rank and got.threshold == pytest.approx(threshold, rel=1e-9)
    # Scaling Y and the prior (units of Y) together leaves the rank unchanged.
    scaled = cpconv.vbmf(Y * 1e-5, prior=10.0 * 1e-5)
    assert scaled.rank == got.rank and scaled.sigma2 == pytest.approx(got.sigma2 * 1e-10, rel=1e-5)


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "non-finite"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, "non-finite"),
        (np.zeros((0, 4)), ValueError, "empty"),
        (np.zeros(5), ValueError, "2-D"),
        (np.zeros((2, 3, 4)), ValueError, "2-D"),
        (np.ones((3, 4), dtype=np.int64), TypeError, "floating"),
        (torch.ones(3, 4, dtype=torch.int32), TypeError, "floating"),
        (np.ones((3, 4), dtype=bool), TypeError, "floating"),
        ([[1.0, 2.0], [3.0, 4.0]], TypeError, "numpy array or torch tensor"),
        (torch.ones(3, 4, device="meta"), ValueError, "meta"),
    ],
)
def test_bad_matrix(bad, exc, match):
    with pytest.raises(exc, match=match):
        cpconv.evbmf(bad)
    with pytest.raises(exc, match=match):
        cpconv.vbmf(bad, 1.0)


@pytest.mark.parametrize("prior,sigma2,match", [(0.0, None, "prior"), (-1.0, None, "prior"),
                                                (float("nan"), None, "prior"), (1.0, 0.0, "sigma2"),
                                                (1.0, -2.0, "sigma2"), (1.0, float("inf"), "sigma2")])
def test_bad_prior_or_sigma2(prior, sigma2, match):
    with pytest.raises(ValueError, match=match):
        cpconv.vbmf(np.eye(3), prior, sigma2=sigma2)


def test_bad_tau_bar_alpha():
    for alpha in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            cpconv.evbmf_tau_bar(alpha)


def test_core_rejects_unsorted_or_inconsistent_spectrum():
    core = cpconv._core.vbmf
    with pytest.raises(ValueError, match="non-increasing"):
        core.evbmf(np.array([1.0, 2.0]), 2, 3, 10.0)
    with pytest.raises(ValueError, match="exceeds"):
        core.evbmf(np.array([3.0, 2.0]), 2, 3, 1.0)
    with pytest.raises(ValueError, match="L <= M"):
        core.evbmf(np.array([3.0, 2.0]), 3, 2, 20.0)
    with pytest.raises(TypeError):
        core.evbmf(np.array([3.0, 2.0], dtype=np.float32), 2, 3, 20.0)  # noconvert: float64 only


@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (1, 1), (2, 2), (3, 200)])
def test_tiny_matrices(shape):
    got = cpconv.evbmf(np.random.default_rng(0).standard_normal(shape))
    assert 0 <= got.rank <= min(shape)
    assert got.sigma2 > 0 and got.threshold > 0
    if min(shape) == 1:  # a single row/column cannot separate signal from noise
        assert got.rank == 0


def test_truncated_spectrum_gives_the_full_spectrum_answer():
    # The C++ solver also accepts the top H singular values plus ||Y||_F^2 (the rest is residual energy):
    # the objective differs by a constant and the lower bound is the same, so the answer must not change.
    rng = np.random.default_rng(9)
    Y = planted(60, 240, 6, rng)
    full = cpconv.evbmf(Y)
    frob = float(np.sum(Y**2))
    for H in (59, 50, 45):
        got = cpconv._core.vbmf.evbmf(np.ascontiguousarray(full.singular_values[:H]), 60, 240, frob)
        assert got["rank"] == full.rank
        assert got["sigma2"] == pytest.approx(full.sigma2, rel=1e-6)
        np.testing.assert_allclose(got["shrunk"], full.shrunk[:H], rtol=1e-5, atol=1e-12)
    # H <= H_bar: the lower bound comes from the residual alone
    got = cpconv._core.vbmf.evbmf(np.ascontiguousarray(full.singular_values[:10]), 60, 240, frob)
    assert got["rank"] == full.rank
