"""CP decomposition of dense order-3/4 tensors by alternating least squares (CP-ALS).

The loop runs in C++ (``cpconv._core.cp_als``) on the BLAS of the ``scipy-openblas32`` wheel: a
two-level dimension tree (two large GEMMs per sweep, the Khatri-Rao product built in cache-sized
blocks, never whole), cached Gram matrices, Cholesky solves of the R x R normal equations with a
ridge fallback when they are singular, and the error from the last MTTKRP. This module validates and
converts the input, builds the initial factors and packages the result.

Threads: one by default, so results are bit-for-bit the same for a seed on any machine. With
``num_threads > 1`` the two GEMM phases of each sweep are split over plain threads started for the
phase (no OpenMP team whose idle workers would spin through the serial R x R solves, and OpenBLAS kept
single-threaded inside, so neither its pthread pool nor a second OpenMP runtime competes with torch's
threads). On two idle cores that gains up to ~1.4x (the solves stay serial); on a busy machine extra
threads lose, because each phase waits for its slowest, descheduled thread. Results are bit-for-bit
repeatable for a given seed and thread count.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from . import _core

__all__ = ["CPALS", "CPALSResult", "cp_als", "check_cp_als_options", "cp_to_tensor", "max_cp_als_rank",
           "MAX_CP_ALS_RANK"]

#: Hard cap on the rank, whatever the shape: the R x R Gram matrices (one per mode, float64) stay
#: below ~130 MB each.
MAX_CP_ALS_RANK = 4096

_INIT_METHODS = ("svd", "random")


def max_cp_als_rank(shape: Sequence[int]) -> int:
    """Largest rank :func:`cp_als` accepts for a tensor of this shape.

    ``min(prod(shape) // max(shape), MAX_CP_ALS_RANK)``: no tensor has a CP rank above
    ``prod(shape) / max(shape)`` (each slice along the largest mode is a matrix of at most that
    rank), so a larger rank only adds redundant components.

    Parameters
    ----------
    shape
        Tensor shape (positive ints).

    Returns
    -------
    int
    """
    dims = [int(d) for d in shape]
    return int(min(int(np.prod(dims)) // max(dims), MAX_CP_ALS_RANK))


@dataclass(frozen=True, eq=False)
class CPALSResult:
    """Result of :func:`cp_als`.

    The model is ``X_hat[i0, .., iN-1] = sum_r weights[r] * prod_n factors[n][i_n, r]``, with the
    components sorted by decreasing weight (after ``max_iter=0``: in the initial factors' order).

    Attributes
    ----------
    weights : numpy.ndarray
        (R,) component norms, non-negative, in the input's float dtype.
    factors : list of numpy.ndarray
        One (I_n, R) array per mode, unit-norm columns, in the input's float dtype.
    rel_error : float
        ``||X - X_hat||_F / ||X||_F`` computed by an explicit (blocked) reconstruction.
    n_iter : int
        Number of ALS iterations run.
    converged : bool
        True when the relative change of the error fell below ``tol`` (or the fit became exact).
    error_history : list of float
        The relative error after each iteration, from the fast formula
        ``||X||^2 - 2<X, X_hat> + ||X_hat||^2`` with MTTKRPs rounded in the input dtype: e^2 is
        resolved to about eps(dtype), i.e. ~1e-7 / (2 e) absolute on e for float32 (1e-5 at e = 0.01).
        ``rel_error`` is the exact figure.
    max_congruence : float
        Largest ``|prod_n <a_n_r, a_n_s>|`` over pairs of components r != s (0 for R = 1): near 1 with
        large, cancelling weights is the degenerate, diverging pattern of Phan et al. (ECCV 2020).
    component_norm_ratio : float
        ``sqrt(sum_r weights[r]^2) / ||X||_F``: about 1 or below for a well-behaved decomposition, much
        larger when components cancel each other (degeneracy).
    init : str
        ``"svd"``, ``"random"`` or ``"given"``.
    seed : int
        The seed used for any random initial columns (drawn from torch's global RNG when ``seed=None``
        was passed).
    line_search_accepted : int
        Number of accepted extrapolation steps (0 without ``line_search``).
    regularised_solves : int
        Number of normal-equation solves that needed the ridge fallback (singular systems).
    """

    weights: np.ndarray
    factors: List[np.ndarray]
    rel_error: float
    n_iter: int
    converged: bool
    error_history: List[float] = field(repr=False)
    max_congruence: float
    component_norm_ratio: float
    init: str
    seed: int
    line_search_accepted: int = 0
    regularised_solves: int = 0

    @property
    def rank(self) -> int:
        """Number of components R."""
        return int(self.weights.shape[0])

    @property
    def shape(self) -> tuple:
        """Shape of the decomposed tensor."""
        return tuple(int(f.shape[0]) for f in self.factors)

    def to_tensor(self) -> np.ndarray:
        """Reconstruct the dense tensor ``X_hat`` (shape :attr:`shape`, the factors' dtype)."""
        return cp_to_tensor(self.weights, self.factors)


def cp_to_tensor(weights: np.ndarray, factors: Sequence[np.ndarray]) -> np.ndarray:
    """Dense tensor ``sum_r weights[r] * outer(factors[0][:, r], ..., factors[-1][:, r])``.

    Parameters
    ----------
    weights
        (R,) array.
    factors
        Arrays of shape (I_n, R).

    Returns
    -------
    numpy.ndarray
        Shape (I_0, ..., I_{N-1}).
    """
    rank = weights.shape[0]
    khatri_rao = factors[-1]
    for f in reversed(factors[1:-1]):
        khatri_rao = (f[:, None, :] * khatri_rao[None, :, :]).reshape(-1, rank)
    matrix = (factors[0] * weights) @ khatri_rao.T
    return matrix.reshape(tuple(f.shape[0] for f in factors))


def _as_float_array(tensor, name: str = "tensor") -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        if tensor.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} must be float32 or float64, got {tensor.dtype}")
        tensor = tensor.detach().cpu().numpy()
    if not isinstance(tensor, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got dtype {tensor.dtype}")
    return np.ascontiguousarray(tensor)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_nonnegative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_cp_als_options(*, init="svd", max_iter=500, tol=1e-6, seed=None, line_search=False, l2_reg=0.0,
                         num_threads=None):
    """Validate :func:`cp_als`'s options without a tensor (the same errors it raises).

    Returns ``(max_iter, tol, seed, l2_reg, num_threads)`` normalised (``seed`` stays None when not
    given). Explicit initial factors are only type-checked here (their shapes need the tensor).
    """
    if isinstance(init, str):
        if init not in _INIT_METHODS:
            raise ValueError(f"init must be one of {_INIT_METHODS}, a sequence of factors or a CPALSResult, got {init!r}")
    elif not isinstance(init, (CPALSResult, list, tuple)):
        raise TypeError(f"init must be a str, a sequence of factor matrices or a CPALSResult, got {type(init).__name__}")
    max_iter = _check_int("max_iter", max_iter, 0)
    tol = _check_nonnegative_float("tol", tol)
    l2_reg = _check_nonnegative_float("l2_reg", l2_reg)
    if not isinstance(line_search, (bool, np.bool_)):
        raise TypeError(f"line_search must be a bool, got {type(line_search).__name__}")
    seed = None if seed is None else _check_int("seed", seed, 0)
    num_threads = 1 if num_threads is None else _check_int("num_threads", num_threads, 1)
    return max_iter, tol, seed, l2_reg, num_threads


def _normalised(x: np.ndarray):
    """``(||x||_F, x / ||x||_F)`` in x's dtype, the norm computed in float64 without over/underflow;
    ``(0.0, x)`` for an all-zero x."""
    x64 = x.astype(np.float64, copy=False)
    peak = float(np.max(np.abs(x64)))
    if peak == 0.0:
        return 0.0, x
    scaled = x64 / peak
    norm_scaled = float(np.linalg.norm(scaled))
    return peak * norm_scaled, np.ascontiguousarray(scaled / norm_scaled, dtype=x.dtype)


def _unit_columns(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=0)
    return matrix / np.where(norms > 0, norms, 1.0)


def _svd_init(x: np.ndarray, rank: int, rng: np.random.Generator) -> List[np.ndarray]:
    """Leading left singular vectors of each unfolding, from the eigenvectors of its I_n x I_n Gram
    matrix (the P/I_n-wide right singular vectors are never formed). Columns beyond I_n are seeded
    random unit vectors."""
    factors = []
    for mode, size in enumerate(x.shape):
        gram = _core.cp_als.unfolding_gram(x, mode)
        _, vectors = np.linalg.eigh(gram)  # ascending eigenvalues
        k = min(rank, size)
        lead = vectors[:, ::-1][:, :k]
        # Fix the sign so the largest-magnitude entry is positive (eigh's sign is arbitrary).
        pivots = lead[np.argmax(np.abs(lead), axis=0), np.arange(k)]
        lead = lead * np.where(pivots < 0, -1.0, 1.0)
        if rank > size:
            lead = np.concatenate([lead, _unit_columns(rng.standard_normal((size, rank - size)))], axis=1)
        factors.append(np.ascontiguousarray(lead, dtype=x.dtype))
    return factors


def _random_init(x: np.ndarray, rank: int, rng: np.random.Generator) -> List[np.ndarray]:
    return [np.ascontiguousarray(_unit_columns(rng.standard_normal((size, rank))), dtype=x.dtype) for size in x.shape]


def _given_init(x: np.ndarray, rank: int, init) -> List[np.ndarray]:
    if isinstance(init, CPALSResult):
        factors = [np.array(f, dtype=np.float64) for f in init.factors]
        factors[0] = factors[0] * np.asarray(init.weights, dtype=np.float64)
    else:
        factors = [_as_float_array(f, f"init[{n}]").astype(np.float64) for n, f in enumerate(init)]
    if len(factors) != x.ndim:
        raise ValueError(f"init must hold {x.ndim} factor matrices (one per mode), got {len(factors)}")
    for n, f in enumerate(factors):
        if f.shape != (x.shape[n], rank):
            raise ValueError(f"init[{n}] must have shape ({x.shape[n]}, {rank}), got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError(f"init[{n}] contains non-finite values")
    return [np.ascontiguousarray(f, dtype=x.dtype) for f in factors]


def _congruence_and_ratio(weights: np.ndarray, factors: Sequence[np.ndarray], norm_x: float):
    w = weights.astype(np.float64)
    congruence = np.ones((w.shape[0], w.shape[0]))
    for f in factors:
        f64 = f.astype(np.float64)
        congruence *= f64.T @ f64
    np.fill_diagonal(congruence, 0.0)
    max_congruence = float(np.abs(congruence).max()) if w.shape[0] > 1 else 0.0
    ratio = float(np.sqrt(np.sum(w * w)) / norm_x) if norm_x > 0 else 0.0
    return max_congruence, ratio


def cp_als(
    tensor: Union[np.ndarray, torch.Tensor],
    rank: int,
    *,
    init: Union[str, Sequence, CPALSResult] = "svd",
    max_iter: int = 500,
    tol: float = 1e-6,
    seed: Optional[int] = None,
    line_search: bool = False,
    l2_reg: float = 0.0,
    num_threads: Optional[int] = None,
) -> CPALSResult:
    """CP decomposition of a dense order-3 or order-4 tensor by alternating least squares.

    Finds ``weights`` (R,) and ``factors`` (I_n x R each) minimising ``||X - X_hat||_F`` with
    ``X_hat[i0, ..] = sum_r weights[r] prod_n factors[n][i_n, r]``.

    Parameters
    ----------
    tensor
        Dense float32 or float64 numpy array or torch tensor (detached and moved to the CPU) of order 3
        or 4 with fewer than 2**31 entries, e.g. a conv kernel (out, in, kh, kw). Computation runs in
        this dtype (normal equations and error in float64).
    rank
        Number of components R, ``1 <= rank <= max_cp_als_rank(shape)``, that is at most
        ``min(prod(shape) // max(shape), 4096)`` (no tensor has a larger CP rank).
    init
        ``"svd"``: leading left singular vectors of each unfolding (from the eigenvectors of the
        I_n x I_n Gram matrix, so memory stays O(tensor + I_n^2)); where R exceeds a mode's size the
        extra columns are seeded random unit vectors. ``"random"``: seeded standard-normal columns.
        Or explicit initial factors: a sequence of (I_n, R) arrays, or a previous :class:`CPALSResult`
        (warm start).
    max_iter
        Maximum number of ALS iterations (sweeps over all modes), >= 0; 0 returns the initial
        factors (unit columns, weights = product of the initial column norms).
    tol
        Stop when the relative change of the error, ``|e_{k-1} - e_k| / e_{k-1}``, drops below tol,
        or (tol > 0) when ``|e_{k-1}^2 - e_k^2|`` drops below the machine epsilon of the dtype: the
        per-iteration error comes from MTTKRPs rounded in that dtype, so smaller changes are not
        measurable (this matters for float32 fits with errors below ~1e-2). tol must be >= 0;
        0 runs all ``max_iter`` iterations unless the fit becomes exact.
    seed
        Seed (int >= 0) for the random columns; None draws one from torch's global RNG (reported in the
        result), so ``torch.manual_seed(s)`` before the call makes it reproducible.
    line_search
        Try a Bro extrapolation ``A_prev + k^(1/p) (A - A_prev)`` from the third iteration on; it is
        kept only when it lowers the error, and p grows after 4 rejections in a row.
    l2_reg
        Ridge (>= 0) added to the diagonal of every R x R normal-equation matrix. The other factors have
        unit columns, so that matrix has a unit diagonal and ``l2_reg`` is relative, independent of the
        tensor's scale.
    num_threads
        Threads (>= 1) for the GEMM phases; None means 1 (see the module notes: more threads help
        only on an otherwise idle machine).

    Returns
    -------
    CPALSResult

    Raises
    ------
    TypeError
        ``tensor`` not a numpy array / torch tensor, or not float32/float64 (integer, bool, float16,
        complex); non-integer ``rank``/``max_iter``/``seed``/``num_threads``; ``line_search`` not a bool.
    ValueError
        Order not 3 or 4, an empty dimension, non-finite values, 2**31 or more entries, rank outside
        ``[1, max_cp_als_rank(shape)]``, an unknown ``init`` string or badly shaped initial factors,
        negative ``max_iter``/``tol``/``l2_reg``/``seed``.
    RuntimeError
        The iteration overflowed to non-finite values (try ``l2_reg > 0``).

    Notes
    -----
    The iteration runs on ``tensor / ||tensor||_F`` (the norm computed without over/underflow) and the
    weights are scaled back, so the factors and ``rel_error`` do not depend on the tensor's scale, from
    denormal-sized to near-overflow values. An identically zero tensor gives zero weights,
    ``rel_error = 0`` and ``n_iter = 0``.
    """
    x = _as_float_array(tensor)
    if x.ndim not in (3, 4):
        raise ValueError(f"tensor must have order 3 or 4, got order {x.ndim} (shape {x.shape})")
    if x.size == 0:
        raise ValueError(f"tensor must not be empty, got shape {x.shape}")
    if x.size >= 2**31:
        raise ValueError(f"tensor must have fewer than 2**31 entries (32-bit BLAS), got {x.size}")
    rank = _check_int("rank", rank, 1)
    limit = max_cp_als_rank(x.shape)
    if rank > limit:
        raise ValueError(
            f"rank must be <= {limit} for a tensor of shape {x.shape} (min(prod(shape) // max(shape), "
            f"{MAX_CP_ALS_RANK})), got {rank}"
        )
    max_iter, tol, seed, l2_reg, num_threads = check_cp_als_options(
        init=init, max_iter=max_iter, tol=tol, seed=seed, line_search=line_search, l2_reg=l2_reg,
        num_threads=num_threads)
    if not np.isfinite(x).all():
        raise ValueError("tensor contains non-finite values (NaN or inf)")
    if seed is None:
        # From torch's global RNG, so torch.manual_seed (and a checkpoint's restored RNG states) fix it.
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))

    # Work on x / ||x||: at extreme scales the squares in the norm, the Gram matrices of the SVD init and
    # the error formula under- or overflow (1e-170 * x looked identically zero, 1e160 * x broke eigh).
    norm_x, x = _normalised(x)

    rng = np.random.default_rng(seed)
    if isinstance(init, str):
        init_name = init
        factors = _svd_init(x, rank, rng) if init == "svd" else _random_init(x, rank, rng)
    else:
        init_name = "given"
        factors = _given_init(x, rank, init)

    if norm_x == 0.0:
        factors = [np.ascontiguousarray(_unit_columns(f.astype(np.float64)), dtype=x.dtype) for f in factors]
        return CPALSResult(
            weights=np.zeros(rank, dtype=x.dtype), factors=factors, rel_error=0.0, n_iter=0, converged=True,
            error_history=[], max_congruence=_congruence_and_ratio(np.zeros(rank), factors, 1.0)[0],
            component_norm_ratio=0.0, init=init_name, seed=seed,
        )

    out = _core.cp_als.cp_als(x, factors, max_iter, tol, bool(line_search), l2_reg, num_threads)
    factors = out["factors"]
    if out["n_iter"] > 0:
        # Weights of the unit-norm tensor: the error and the degeneracy measures are taken on those.
        unit_weights = out["weights"]
        weights = unit_weights * norm_x
    else:
        # max_iter=0: the initial factors as given (weights = product of their column norms).
        weights = out["weights"]
        unit_weights = weights / norm_x
    rel_error = float(_core.cp_als.relative_error(x, np.ascontiguousarray(unit_weights), factors, num_threads))
    if out["n_iter"] > 0:
        order = np.argsort(-weights, kind="stable")
        weights, unit_weights = weights[order], unit_weights[order]
        factors = [np.ascontiguousarray(f[:, order]) for f in factors]
    max_congruence, ratio = _congruence_and_ratio(unit_weights, factors, 1.0)
    return CPALSResult(
        weights=weights.astype(x.dtype),
        factors=factors,
        rel_error=rel_error,
        n_iter=int(out["n_iter"]),
        converged=bool(out["converged"]),
        error_history=[float(e) for e in out["error_history"]],
        max_congruence=max_congruence,
        component_norm_ratio=ratio,
        init=init_name,
        seed=seed,
        line_search_accepted=int(out["line_search_accepted"]),
        regularised_solves=int(out["regularised_solves"]),
    )


class CPALS:
    """CP-ALS as an estimator object (TensorLy style): ``CPALS(rank, **options).fit(tensor)``.

    Parameters
    ----------
    rank
        Number of components (see :func:`cp_als`).
    **options
        Keyword options of :func:`cp_als`: ``init``, ``max_iter``, ``tol``, ``seed``, ``line_search``,
        ``l2_reg``, ``num_threads``.

    Attributes
    ----------
    result_ : CPALSResult or None
        The result of the last :meth:`fit`.

    Raises
    ------
    TypeError
        An unknown option name.
    """

    _OPTIONS = ("init", "max_iter", "tol", "seed", "line_search", "l2_reg", "num_threads")

    def __init__(self, rank: int, **options):
        unknown = sorted(set(options) - set(self._OPTIONS))
        if unknown:
            raise TypeError(f"unknown CPALS option(s) {unknown}; valid: {list(self._OPTIONS)}")
        self.rank = rank
        self.options = dict(options)
        self.result_: Optional[CPALSResult] = None

    def fit(self, tensor) -> CPALSResult:
        """Decompose ``tensor``; returns (and stores in ``result_``) the :class:`CPALSResult`."""
        self.result_ = cp_als(tensor, self.rank, **self.options)
        return self.result_

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"CPALS(rank={self.rank}{opts})"
