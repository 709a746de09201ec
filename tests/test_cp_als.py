"""Tests of cpconv.cp_als (C++ CP-ALS) against known answers, an independent numpy ALS and TensorLy."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tensorly.cp_tensor import CPTensor
from tensorly.decomposition import parafac

import cpconv
from cpconv import CPALSResult, cp_als
from cpconv.cp_als import CPALS, MAX_CP_ALS_RANK, max_cp_als_rank


# --------------------------------------------------------------------------------------------------
# Independent references (plain numpy, written from the definitions)


def khatri_rao_rows(mats):
    """Column-wise Kronecker product, rows in C order (the last matrix's index varies fastest)."""
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :] * m[None, :, :]).reshape(-1, out.shape[1])
    return out


def dense_from_factors(weights, factors):
    """sum_r w_r outer(a_0r, ..., a_{N-1}r) by einsum, independent of cpconv's reconstruction."""
    letters = "abcd"[: len(factors)]
    spec = ",".join(f"{c}r" for c in letters) + ",r->" + letters
    return np.einsum(spec, *factors, weights)


def reference_als(x, factors, n_iter):
    """Textbook ALS: for each mode, least squares against the explicit Khatri-Rao product (lstsq)."""
    x = x.astype(np.float64)
    A = [np.array(f, dtype=np.float64) for f in factors]
    ones = np.ones(A[0].shape[1])
    errors = []
    for _ in range(n_iter):
        for n in range(x.ndim):
            kr = khatri_rao_rows([A[k] for k in range(x.ndim) if k != n])
            unfolding = np.moveaxis(x, n, 0).reshape(x.shape[n], -1)
            A[n] = np.linalg.lstsq(kr, unfolding.T, rcond=None)[0].T
        errors.append(np.linalg.norm(x - dense_from_factors(ones, A)) / np.linalg.norm(x))
    return A, errors


def planted(shape, rank, noise, dtype, seed):
    """Rank-`rank` CP tensor plus Gaussian noise with ||noise|| = noise * ||signal||.

    Returns (tensor, noise floor = ||noise|| / ||tensor||)."""
    rng = np.random.default_rng(seed)
    factors = [rng.standard_normal((s, rank)) for s in shape]
    signal = dense_from_factors(np.ones(rank), factors)
    n = rng.standard_normal(shape)
    n *= noise * np.linalg.norm(signal) / np.linalg.norm(n)
    x = (signal + n).astype(dtype)
    return x, float(np.linalg.norm(n) / np.linalg.norm(x))


def explicit_rel_error(x, result):
    x64 = x.astype(np.float64)
    approx = dense_from_factors(result.weights.astype(np.float64), [f.astype(np.float64) for f in result.factors])
    return float(np.linalg.norm(x64 - approx) / np.linalg.norm(x64))


def assert_non_increasing(history, dtype):
    # The per-iteration error comes from ||X||^2 - 2<X, X_hat> + ||X_hat||^2 with MTTKRPs rounded in
    # the input dtype: e^2 (relative to ||X||^2) is resolved to about eps(dtype), so allow rises of
    # e^2 at that level.
    e2 = np.asarray(history) ** 2
    slack = 4 * np.finfo(dtype).eps
    rises = np.diff(e2)
    assert (rises <= slack).all(), f"squared error rises by up to {rises.max():.3g} (> {slack:.2g}): {e2[:8]} ..."


# --------------------------------------------------------------------------------------------------
# Known answers: planted rank reaches the noise floor


PLANTED_CASES = [
    # shape, rank: including R above a mode's size (kernel-like 3x3 modes)
    ((12, 10, 8), 4),
    ((10, 8, 4), 6),
    ((12, 9, 5), 7),
    ((20, 12, 3, 3), 5),
    ((16, 10, 3, 3), 12),
    ((10, 6, 5, 2), 3),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,rank", PLANTED_CASES)
def test_planted_rank_reaches_noise_floor(shape, rank, dtype):
    x, floor = planted(shape, rank, noise=1e-2, dtype=dtype, seed=len(shape) * 100 + rank)
    result = cp_als(x, rank, max_iter=2000, tol=1e-10, seed=0)
    assert isinstance(result, CPALSResult)
    # The best rank-R fit absorbs a little of the noise, so it may go slightly below ||noise||.
    assert 0.7 * floor <= result.rel_error <= 1.02 * floor, (shape, rank, dtype, result.rel_error, floor)
    assert result.weights.dtype == dtype and all(f.dtype == dtype for f in result.factors)
    assert [f.shape for f in result.factors] == [(s, rank) for s in shape]
    assert_non_increasing(result.error_history, dtype)
    assert len(result.error_history) == result.n_iter


@pytest.mark.parametrize("init", ["svd", "random"])
def test_exact_low_rank_tensor_is_recovered(init):
    x, _ = planted((8, 7, 3, 3), 3, noise=0.0, dtype=np.float64, seed=3)
    result = cp_als(x, 3, init=init, seed=5, max_iter=3000, tol=1e-12)
    assert result.rel_error < 1e-6
    assert result.converged


# --------------------------------------------------------------------------------------------------
# Agreement with the independent numpy ALS (same init -> same trajectory)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.one_of(
        st.tuples(*[st.integers(1, 7)] * 3),
        st.tuples(*[st.integers(1, 5)] * 4),
    ),
    rank_fraction=st.floats(0.0, 1.0),
    n_iter=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_reference_als(shape, rank_fraction, n_iter, seed):
    limit = max_cp_als_rank(shape)
    rank = 1 + int(rank_fraction * (limit - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    init = [rng.standard_normal((s, rank)) for s in shape]
    ref_factors, ref_errors = reference_als(x, init, n_iter)
    # The reference's least squares is only well defined when the normal equations are well
    # conditioned; compare where it is (a near-singular system legitimately takes the ridge path).
    result = cp_als(x, rank, init=init, max_iter=n_iter, tol=0.0)
    assume(result.regularised_solves == 0)
    ref = dense_from_factors(np.ones(rank), ref_factors)
    ours = dense_from_factors(result.weights, result.factors)
    scale = np.linalg.norm(x)
    info = f"shape={shape} rank={rank} n_iter={n_iter} seed={seed}"
    np.testing.assert_allclose(ours, ref, atol=1e-6 * scale, rtol=0, err_msg=info)
    # tol=0 runs every iteration unless the fit becomes exact (error 0), which ends the loop early.
    assert result.n_iter == n_iter or result.error_history[-1] == 0.0, info
    # cp_als takes the error from the fit formula, which resolves e^2 to ~1e-14 absolute (an exact fit
    # can read 1e-7 where the reference's explicit residual reads 1e-15): compare squares.
    np.testing.assert_allclose(np.square(result.error_history), np.square(ref_errors[: result.n_iter]), atol=1e-12,
                               rtol=2e-6, err_msg=info)


@pytest.mark.parametrize("line_search", [False, True])
@pytest.mark.parametrize("shape,rank", [((6, 5, 4), 3), ((5, 4, 3, 3), 7)])
def test_reported_errors_match_reconstruction(shape, rank, line_search):
    x, _ = planted(shape, rank, noise=0.1, dtype=np.float64, seed=11)
    result = cp_als(x, rank, init="random", seed=2, max_iter=30, tol=0.0, line_search=line_search)
    exact = explicit_rel_error(x, result)
    assert result.rel_error == pytest.approx(exact, rel=1e-10)
    assert result.error_history[-1] == pytest.approx(exact, rel=1e-8)
    np.testing.assert_allclose(result.to_tensor(), dense_from_factors(result.weights, result.factors), atol=1e-12)


def test_float32_rel_error_is_exact_and_history_close():
    x, _ = planted((16, 8, 3, 3), 6, noise=0.05, dtype=np.float32, seed=4)
    result = cp_als(x, 6, seed=0, max_iter=100, tol=0.0)
    exact = explicit_rel_error(x, result)
    assert result.rel_error == pytest.approx(exact, rel=1e-4)
    assert result.error_history[-1] == pytest.approx(exact, abs=1e-4)


# --------------------------------------------------------------------------------------------------
# Determinism, initialisation, options


@pytest.mark.parametrize("init", ["svd", "random"])
@pytest.mark.parametrize("line_search", [False, True])
def test_same_seed_gives_identical_results(init, line_search):
    x, _ = planted((12, 6, 3, 3), 8, noise=0.05, dtype=np.float32, seed=9)  # R = 8 > 6 and > 3: padding
    runs = [cp_als(x, 8, init=init, seed=123, max_iter=40, tol=0.0, line_search=line_search) for _ in range(2)]
    a, b = runs
    np.testing.assert_array_equal(a.weights, b.weights)
    for fa, fb in zip(a.factors, b.factors):
        np.testing.assert_array_equal(fa, fb)
    assert a.error_history == b.error_history and a.rel_error == b.rel_error


def test_different_seeds_differ_for_random_init():
    x, _ = planted((10, 6, 3, 3), 4, noise=0.05, dtype=np.float64, seed=9)
    a = cp_als(x, 4, init="random", seed=1, max_iter=3, tol=0.0)
    b = cp_als(x, 4, init="random", seed=2, max_iter=3, tol=0.0)
    assert a.error_history != b.error_history


def test_seed_none_is_reported_and_reproducible():
    x, _ = planted((10, 6, 3, 3), 4, noise=0.05, dtype=np.float64, seed=9)
    a = cp_als(x, 4, init="random", max_iter=5)
    b = cp_als(x, 4, init="random", seed=a.seed, max_iter=5)
    np.testing.assert_array_equal(a.factors[0], b.factors[0])


def test_svd_init_is_the_leading_left_singular_vectors():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 6, 4, 3))
    rank = 5  # > modes 2 and 3: those get 4 / 3 singular vectors plus random unit columns
    result = cp_als(x, rank, init="svd", seed=0, max_iter=0)
    assert result.n_iter == 0 and result.error_history == []
    for n, f in enumerate(result.factors):
        unfolding = np.moveaxis(x, n, 0).reshape(x.shape[n], -1)
        u = np.linalg.svd(unfolding, full_matrices=False)[0]
        k = min(rank, x.shape[n])
        np.testing.assert_allclose(np.abs(np.sum(f[:, :k] * u[:, :k], axis=0)), 1.0, atol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(f, axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(result.weights, np.ones(rank), rtol=1e-12)


def test_given_init_and_warm_start():
    x, floor = planted((10, 8, 3, 3), 4, noise=1e-2, dtype=np.float64, seed=1)
    first = cp_als(x, 4, seed=0, max_iter=5, tol=0.0)
    resumed = cp_als(x, 4, init=first, max_iter=3, tol=0.0)
    straight = cp_als(x, 4, seed=0, max_iter=8, tol=0.0)
    assert resumed.init == "given"
    assert resumed.rel_error == pytest.approx(straight.rel_error, rel=1e-9)
    given_lists = cp_als(x, 4, init=[torch.from_numpy(f) for f in straight.factors], max_iter=0)
    assert given_lists.rel_error == pytest.approx(
        np.linalg.norm(x - dense_from_factors(np.ones(4), straight.factors)) / np.linalg.norm(x), rel=1e-10
    )


def test_line_search_does_not_worsen_and_is_used():
    # Collinear components make plain ALS crawl (a "swamp"), where extrapolation helps.
    rng = np.random.default_rng(7)
    shape, rank = (12, 10, 8), 4
    base = [rng.standard_normal((s, 1)) for s in shape]
    factors = [b + 0.3 * rng.standard_normal((s, rank)) for b, s in zip(base, shape)]
    x = dense_from_factors(np.ones(rank), factors) + 1e-3 * rng.standard_normal(shape)
    plain = cp_als(x, rank, init="random", seed=3, max_iter=150, tol=0.0)
    searched = cp_als(x, rank, init="random", seed=3, max_iter=150, tol=0.0, line_search=True)
    assert searched.line_search_accepted > 0
    assert_non_increasing(searched.error_history, np.float64)
    assert searched.rel_error <= plain.rel_error * (1 + 1e-9)
    # Same starting iterations (extrapolation starts at the third).
    assert searched.error_history[:2] == plain.error_history[:2]


def test_l2_reg_shrinks_and_is_scale_free():
    x, _ = planted((10, 8, 3, 3), 4, noise=0.05, dtype=np.float64, seed=2)
    plain = cp_als(x, 4, seed=0, max_iter=50, tol=0.0)
    ridge = cp_als(x, 4, seed=0, max_iter=50, tol=0.0, l2_reg=1.0)
    assert ridge.rel_error > plain.rel_error
    scaled = cp_als(1e-4 * x, 4, seed=0, max_iter=50, tol=0.0, l2_reg=1.0)
    assert scaled.rel_error == pytest.approx(ridge.rel_error, rel=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e-20, 1e-6, 1e6, 1e20])
def test_result_does_not_depend_on_the_tensor_scale(scale, dtype):
    x, _ = planted((10, 8, 3, 3), 4, noise=0.05, dtype=np.float64, seed=8)
    base = cp_als(x.astype(dtype), 4, seed=0, max_iter=20, tol=0.0)
    scaled = cp_als((scale * x).astype(dtype), 4, seed=0, max_iter=20, tol=0.0)
    rtol = 1e-4 if dtype == np.float32 else 1e-9
    assert scaled.rel_error == pytest.approx(base.rel_error, rel=rtol)
    np.testing.assert_allclose(scaled.weights / scale, base.weights, rtol=10 * rtol)


@pytest.mark.parametrize("scale", [1e-300, 1e-170, 1e-150, 1e150, 1e160, 1e300])
def test_extreme_scales_float64(scale):
    # Squares of such entries under/overflow: without normalising, 1e-170 * x looked all-zero (zero
    # weights, rel_error 0) and 1e160 * x made the SVD init's eigh fail.
    x, _ = planted((6, 5, 3, 3), 3, noise=0.05, dtype=np.float64, seed=8)
    base = cp_als(x, 3, seed=0, max_iter=20, tol=0.0)
    scaled = cp_als(scale * x, 3, seed=0, max_iter=20, tol=0.0)
    assert scaled.rel_error == pytest.approx(base.rel_error, rel=1e-6)
    np.testing.assert_allclose(scaled.weights / scale, base.weights, rtol=1e-6)
    assert scaled.component_norm_ratio == pytest.approx(base.component_norm_ratio, rel=1e-6)


def test_max_iter_zero_keeps_the_initial_weights_at_any_scale():
    x, _ = planted((6, 5, 3), 2, noise=0.05, dtype=np.float64, seed=3)
    factors = [np.full((d, 2), 3.0) for d in x.shape]
    for scale in (1e-100, 1.0, 1e100):
        result = cp_als(scale * x, 2, init=factors, max_iter=0)
        np.testing.assert_allclose(result.weights, np.full(2, 27.0 * np.sqrt(6 * 5 * 3)), rtol=1e-12)
        expected = np.linalg.norm(scale * x - dense_from_factors(result.weights, result.factors)) / np.linalg.norm(scale * x)
        assert result.rel_error == pytest.approx(expected, rel=1e-9)


def test_seed_none_is_drawn_from_torchs_global_rng():
    x, _ = planted((10, 6, 3, 3), 4, noise=0.05, dtype=np.float64, seed=9)
    torch.manual_seed(5)
    a = cp_als(x, 4, init="random", max_iter=3)
    torch.manual_seed(5)
    b = cp_als(x, 4, init="random", max_iter=3)
    assert a.seed == b.seed
    np.testing.assert_array_equal(a.factors[0], b.factors[0])


def test_tolerance_stops_early_and_reports_convergence():
    x, _ = planted((10, 8, 6), 3, noise=1e-2, dtype=np.float64, seed=5)
    loose = cp_als(x, 3, seed=0, max_iter=500, tol=1e-3)
    assert loose.converged and loose.n_iter < 500
    h = loose.error_history
    assert abs(h[-2] - h[-1]) < 1e-3 * h[-2]
    assert all(abs(h[k - 1] - h[k]) >= 1e-3 * h[k - 1] for k in range(1, len(h) - 1))
    capped = cp_als(x, 3, seed=0, max_iter=2, tol=0.0)
    assert not capped.converged and capped.n_iter == 2


def test_singular_normal_equations_take_the_ridge_fallback():
    # Two identical initial components make every normal-equation matrix singular.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 4))
    init = [rng.standard_normal((s, 2)) for s in x.shape]
    for f in init:
        f[:, 1] = f[:, 0]
    result = cp_als(x, 2, init=init, max_iter=5, tol=0.0)
    assert result.regularised_solves > 0
    assert np.isfinite(result.rel_error) and all(np.isfinite(f).all() for f in result.factors)
    assert result.max_congruence == pytest.approx(1.0)


def test_torch_input_thread_counts_and_estimator():
    w = torch.randn(8, 6, 3, 3, requires_grad=True)
    result = cp_als(w, 5, seed=1, max_iter=20, num_threads=2)
    assert result.weights.dtype == np.float32
    single = cp_als(w.detach().numpy(), 5, seed=1, max_iter=20, num_threads=1)
    assert result.rel_error == pytest.approx(single.rel_error, rel=1e-4)
    transposed = cp_als(w.detach().permute(0, 1, 3, 2), 5, seed=1, max_iter=20)  # non-contiguous view
    assert transposed.shape == (8, 6, 3, 3)
    estimator = CPALS(5, seed=1, max_iter=20, num_threads=1)
    fitted = estimator.fit(w)
    assert estimator.result_ is fitted and fitted.rel_error == single.rel_error
    assert "rank=5" in repr(estimator)
    with pytest.raises(TypeError, match="unknown CPALS option"):
        CPALS(5, iterations=3)


@pytest.mark.parametrize("shape,rank", [((64, 32, 3, 3), 128), ((8, 64, 64, 8), 64)])
def test_threaded_phases_agree_with_one_thread(shape, rank):
    # Large enough that the GEMM phases (and, for the second shape, the contractions) really split.
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    one = cp_als(x, rank, seed=0, max_iter=3, tol=0.0, num_threads=1)
    two = [cp_als(x, rank, seed=0, max_iter=3, tol=0.0, num_threads=2) for _ in range(2)]
    np.testing.assert_array_equal(two[0].factors[0], two[1].factors[0])
    assert two[0].error_history == two[1].error_history
    np.testing.assert_allclose(two[0].error_history, one.error_history, rtol=1e-5)
    np.testing.assert_allclose(two[0].to_tensor(), one.to_tensor(), atol=1e-4 * np.abs(x).max())


def test_zero_tensor_gives_zero_weights():
    result = cp_als(np.zeros((4, 3, 2)), 2, seed=0)
    assert result.rel_error == 0.0 and result.n_iter == 0 and result.converged
    np.testing.assert_array_equal(result.weights, np.zeros(2))


def test_degeneracy_measures():
    rng = np.random.default_rng(1)
    a = [rng.standard_normal((s, 1)) for s in (5, 4, 3)]
    # Two nearly opposite large components that almost cancel: the classic degenerate pattern.
    b = [ai + 1e-3 * rng.standard_normal(ai.shape) for ai in a]
    weights = np.array([100.0, -100.0])
    factors = [np.hstack([ai, bi]) for ai, bi in zip(a, b)]
    x = dense_from_factors(weights, factors) + 1e-3 * rng.standard_normal((5, 4, 3))
    factors[0] = factors[0] * weights
    result = cp_als(x, 2, init=factors, max_iter=0)
    assert result.max_congruence > 0.99
    assert result.component_norm_ratio > 10
    healthy = cp_als(planted((8, 7, 6), 3, 1e-2, np.float64, 0)[0], 3, seed=0)
    assert healthy.component_norm_ratio < 1.5


def test_only_one_openmp_runtime_is_loaded():
    x, _ = planted((16, 8, 3, 3), 4, noise=0.05, dtype=np.float32, seed=0)
    cp_als(x, 4, seed=0, max_iter=3, num_threads=2)
    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if re.search(r"lib(g|i)omp[^/]*\.so", line)}
    assert len({re.sub(r".*/", "", p).split("-")[0].split(".so")[0] for p in libs}) <= 1, libs
    assert len(libs) <= 1, libs


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "tensor,rank,kwargs,error,match",
    [
        (np.full((3, 3, 3), np.nan), 1, {}, ValueError, "non-finite"),
        (np.array([[[1.0, np.inf]]]), 1, {}, ValueError, "non-finite"),
        (np.ones((3, 3, 3)), 0, {}, ValueError, "rank must be >= 1"),
        (np.ones((3, 3, 3)), -2, {}, ValueError, "rank must be >= 1"),
        (np.ones((3, 3, 3)), 10, {}, ValueError, r"rank must be <= 9"),
        (np.ones((6, 2, 2)), 5, {}, ValueError, r"rank must be <= 4"),
        (np.ones((3, 3, 3)), 2.0, {}, TypeError, "rank must be an int"),
        (np.ones((3, 3, 3)), True, {}, TypeError, "rank must be an int"),
        (np.ones((3, 3)), 1, {}, ValueError, "order 3 or 4"),
        (np.ones((2, 2, 2, 2, 2)), 1, {}, ValueError, "order 3 or 4"),
        (np.ones((3, 0, 3)), 1, {}, ValueError, "empty"),
        (np.ones((3, 3, 3), dtype=np.int64), 1, {}, TypeError, "float32 or float64"),
        (np.ones((3, 3, 3), dtype=np.float16), 1, {}, TypeError, "float32 or float64"),
        (np.ones((3, 3, 3), dtype=np.complex128), 1, {}, TypeError, "float32 or float64"),
        (torch.ones(3, 3, 3, dtype=torch.int32), 1, {}, TypeError, "float32 or float64"),
        ([[[1.0]]], 1, {}, TypeError, "numpy array or torch tensor"),
        (np.ones((3, 3, 3)), 1, {"init": "hosvd"}, ValueError, "init must be one of"),
        (np.ones((3, 3, 3)), 1, {"init": 3}, TypeError, "init must be a str"),
        (np.ones((3, 3, 3)), 1, {"init": [np.ones((3, 1))] * 2}, ValueError, "3 factor matrices"),
        (np.ones((3, 3, 3)), 1, {"init": [np.ones((3, 2))] * 3}, ValueError, r"shape \(3, 1\)"),
        (np.ones((3, 3, 3)), 1, {"init": [np.full((3, 1), np.nan)] * 3}, ValueError, "non-finite"),
        (np.ones((3, 3, 3)), 1, {"max_iter": -1}, ValueError, "max_iter must be >= 0"),
        (np.ones((3, 3, 3)), 1, {"max_iter": 2.5}, TypeError, "max_iter must be an int"),
        (np.ones((3, 3, 3)), 1, {"tol": -1e-3}, ValueError, "tol must be"),
        (np.ones((3, 3, 3)), 1, {"tol": float("nan")}, ValueError, "tol must be"),
        (np.ones((3, 3, 3)), 1, {"l2_reg": -1.0}, ValueError, "l2_reg must be"),
        (np.ones((3, 3, 3)), 1, {"seed": -5}, ValueError, "seed must be >= 0"),
        (np.ones((3, 3, 3)), 1, {"seed": "a"}, TypeError, "seed must be an int"),
        (np.ones((3, 3, 3)), 1, {"line_search": "yes"}, TypeError, "line_search must be a bool"),
        (np.ones((3, 3, 3)), 1, {"num_threads": 0}, ValueError, "num_threads must be >= 1"),
    ],
)
def test_bad_input_raises(tensor, rank, kwargs, error, match):
    with pytest.raises(error, match=match):
        cp_als(tensor, rank, **kwargs)


def test_rank_limit_is_stated_and_capped():
    assert max_cp_als_rank((256, 96, 5, 5)) == 2400
    assert max_cp_als_rank((512, 512, 3, 3)) == MAX_CP_ALS_RANK
    assert max_cp_als_rank((4, 3, 2)) == 6
    assert "rank" in cp_als.__doc__ and "4096" in cp_als.__doc__


def test_core_rejects_mismatched_factors():
    x = np.ones((3, 4, 5))
    with pytest.raises(ValueError, match="factor 1 must have shape"):
        cpconv._core.cp_als.cp_als(x, [np.ones((3, 2)), np.ones((5, 2)), np.ones((5, 2))], 1, 0.0, False, 0.0, 1)
    with pytest.raises(TypeError):  # float32 data with no matching float64 overload: no silent copy
        cpconv._core.cp_als.unfolding_gram(np.ones((3, 4, 5), dtype=np.int32), 0)


# --------------------------------------------------------------------------------------------------
# TensorLy comparison on kernels of a small CNN trained inside the test


def _oriented_gratings(n, rng):
    """12x12 images of a noisy grating in one of 4 orientations (the class)."""
    labels = rng.integers(0, 4, n)
    yy, xx = np.mgrid[0:12, 0:12].astype(np.float32)
    angles = labels * (np.pi / 4) + rng.normal(0, 0.1, n)
    freq = rng.uniform(0.6, 1.2, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy
    images = np.sin(freq[:, None, None] * proj + phase[:, None, None]) + 0.3 * rng.standard_normal((n, 12, 12))
    return torch.from_numpy(images[:, None].astype(np.float32)), torch.from_numpy(labels)


@pytest.fixture(scope="module")
def trained_kernels():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 24, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(24, 4),
    )
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    images, labels = _oriented_gratings(1024, rng)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest and leaves the other core alone
    try:
        for _ in range(100):
            idx = torch.from_numpy(rng.integers(0, 1024, 32))
            loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            accuracy = (model(images[:512]).argmax(1) == labels[:512]).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.5, f"the small CNN did not learn (accuracy {accuracy:.2f})"
    return [model[2].weight.detach().numpy().copy(), model[4].weight.detach().numpy().copy()]


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("rank", [6, 20])
def test_no_worse_than_tensorly_parafac_on_trained_kernels(trained_kernels, layer, rank):
    kernel = trained_kernels[layer]  # (16, 8, 3, 3) or (24, 16, 3, 3), float32
    n_iter = 25
    start = cp_als(kernel, rank, init="svd", seed=0, max_iter=0)
    tl_init = CPTensor((np.ones(rank, dtype=np.float32), [f.copy() for f in start.factors]))
    tl.set_backend("numpy")
    tl_cp, tl_errors = parafac(kernel, rank, n_iter_max=n_iter, init=tl_init, tol=0, return_errors=True)
    ours = cp_als(kernel, rank, init=start, max_iter=n_iter, tol=0.0)
    k64 = kernel.astype(np.float64)
    tl_error = np.linalg.norm(k64 - tl.cp_to_tensor(tl_cp).astype(np.float64)) / np.linalg.norm(k64)
    assert ours.n_iter == len(tl_errors) == n_iter
    assert ours.rel_error <= tl_error * (1 + 1e-4) + 1e-6, (ours.rel_error, tl_error)
    # Same algorithm from the same start: the trajectories agree closely, not just the end point.
    np.testing.assert_allclose(ours.error_history, np.asarray(tl_errors, dtype=np.float64), rtol=2e-3, atol=2e-4)
