"""EVBMF and VBMF: rank and noise level of a noisy low-rank matrix, by the analytic global solution.

For a matrix Y (L x M, transposed internally so that L <= M) observed as signal + i.i.d. Gaussian noise
of variance sigma^2, variational Bayesian matrix factorisation keeps the singular values above a
threshold and shrinks them (Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of
fully-observed variational Bayesian matrix factorization", JMLR 2013; Nakajima et al., "Perfect
dimensionality recovery by variational Bayesian PCA", NIPS 2012).

- :func:`evbmf` (empirical VBMF) estimates both the prior and the noise variance. The noise variance
  minimises the EVB free energy over ``[lower, upper]`` (bounds of Nakajima et al.), searched on
  log(sigma^2) with the matrix divided by its largest magnitude and normalised by its RMS, so the rank
  does not change when Y is scaled (by anything float64 represents, 1e-300 included) and sigma^2 scales
  with the square of the factor. The threshold uses the exact tau_bar (root of
  ``log(tau+1) + alpha*log(tau/alpha+1) - tau = 0``), not the 2.5129*sqrt(alpha) approximation.
- :func:`vbmf` uses a known prior product ``c = c_a * c_b``; sigma^2 is given, or estimated by the
  same EVB noise-variance search (prior-free, then the known-prior threshold is applied).

Rank 0 ("no singular value rises above the noise") is a valid result, not an error: it is what a
random, untrained matrix gives.

The singular values come from LAPACK (numpy, float64); the analytic solver is C++ (``cpconv._core.vbmf``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import _core

__all__ = ["VBMFResult", "evbmf", "vbmf", "evbmf_tau_bar"]


@dataclass(frozen=True)
class VBMFResult:
    """The outcome of :func:`evbmf` or :func:`vbmf` for one matrix.

    Attributes
    ----------
    rank
        Number of singular values strictly above ``threshold`` (0 = no signal above the noise).
    sigma2
        Noise variance (units of the matrix entries squared).
    threshold
        Truncation threshold on the singular values (units of the entries).
    singular_values
        All ``min(L, M)`` singular values, non-increasing, float64.
    shrunk
        The VB estimates of the singular values, same length; 0 beyond ``rank``.
    L, M
        Sizes after transposition (``L <= M``).
    transposed
        True when the input had more rows than columns and was transposed.
    method
        ``"evbmf"`` or ``"vbmf"``.
    prior
        The prior product ``c_a * c_b`` for VBMF, None for EVBMF.
    sigma2_estimated
        Whether ``sigma2`` was estimated (always for EVBMF).
    tau_bar, x_bar
        EVBMF's threshold constants (threshold = sqrt(M * sigma2 * x_bar)); None for VBMF.
    search_bounds
        ``(lower, upper)`` of the noise-variance search, or None when sigma2 was given.
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: np.ndarray
    shrunk: np.ndarray
    L: int
    M: int
    transposed: bool
    method: str
    prior: Optional[float] = None
    sigma2_estimated: bool = True
    tau_bar: Optional[float] = None
    x_bar: Optional[float] = None
    search_bounds: Optional[tuple] = None

    @property
    def full_rank(self) -> int:
        """``min(L, M)``: the largest rank the matrix can have."""
        return self.L

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (arrays become lists of floats)."""
        return {
            "method": self.method,
            "rank": int(self.rank),
            "full_rank": int(self.L),
            "sigma2": float(self.sigma2),
            "threshold": float(self.threshold),
            "L": int(self.L),
            "M": int(self.M),
            "transposed": bool(self.transposed),
            "prior": None if self.prior is None else float(self.prior),
            "sigma2_estimated": bool(self.sigma2_estimated),
            "tau_bar": None if self.tau_bar is None else float(self.tau_bar),
            "x_bar": None if self.x_bar is None else float(self.x_bar),
            "search_bounds": None if self.search_bounds is None else [float(b) for b in self.search_bounds],
            "singular_values": [float(v) for v in self.singular_values],
            "shrunk": [float(v) for v in self.shrunk],
        }


def _as_float64_matrix(matrix, name: str = "matrix") -> np.ndarray:
    """Validate a 2-D floating numpy array / torch tensor and return it as a float64 numpy array."""
    if isinstance(matrix, torch.Tensor):
        if matrix.device.type == "meta":
            raise ValueError(f"{name} is on the meta device and has no values")
        if not matrix.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {matrix.dtype}")
        array = matrix.detach().to(device="cpu", dtype=torch.float64).numpy()
    elif isinstance(matrix, np.ndarray):
        if not np.issubdtype(matrix.dtype, np.floating):
            raise TypeError(f"{name} must have a floating-point dtype, got {matrix.dtype}")
        array = matrix.astype(np.float64, copy=False)
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(matrix).__name__}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (L x M), got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(array.shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")
    return array


def _spectrum(matrix, name: str):
    """Singular values etc. of ``matrix / scale``, with ``scale`` its largest magnitude (1 for an all-zero
    matrix): squares of entries near 1e-160 underflow and near 1e160 overflow, so the solver works on the
    normalised matrix and the caller scales the results back (singular values by ``scale``, variances by
    ``scale**2``)."""
    array = _as_float64_matrix(matrix, name)
    scale = float(np.max(np.abs(array))) or 1.0
    array = array / scale
    transposed = array.shape[0] > array.shape[1]
    L, M = sorted(array.shape)
    singular_values = np.ascontiguousarray(np.linalg.svd(array, compute_uv=False), dtype=np.float64)
    frobenius_sq = float(np.sum(array * array))
    # LAPACK's singular values can exceed ||Y||_F^2 by rounding; the solver only uses the difference.
    frobenius_sq = max(frobenius_sq, float(np.sum(singular_values**2)))
    return singular_values, L, M, transposed, frobenius_sq, scale


def _result(out: dict, singular_values, L, M, transposed, scale, **fields) -> VBMFResult:
    """A :class:`VBMFResult` from the solver's output on the normalised matrix, scaled back by ``scale``
    (a variance by ``scale`` twice rather than ``scale**2``, which over/underflows sooner)."""
    variance = lambda v: float(v) * scale * scale  # noqa: E731
    bounds = None
    if fields["sigma2_estimated"]:
        bounds = (variance(out["search_lower"]), variance(out["search_upper"]))
    return VBMFResult(
        rank=int(out["rank"]), sigma2=variance(out["sigma2"]), threshold=float(out["threshold"]) * scale,
        singular_values=singular_values * scale, shrunk=np.asarray(out["shrunk"]) * scale, L=L, M=M,
        transposed=transposed, search_bounds=bounds, **fields,
    )


def _positive_float(value, name: str) -> float:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive float, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive float, got {value!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return value


def evbmf_tau_bar(alpha: float) -> float:
    """EVBMF's tau_bar: the root tau > sqrt(alpha) of ``log(tau+1) + alpha*log(tau/alpha+1) - tau = 0``.

    Parameters
    ----------
    alpha
        Aspect ratio L/M of the matrix, in (0, 1].

    Raises
    ------
    ValueError
        ``alpha`` outside (0, 1].
    """
    alpha = _positive_float(alpha, "alpha")
    if alpha > 1:
        raise ValueError(f"alpha = L/M must be in (0, 1], got {alpha}")
    return float(_core.vbmf.tau_bar(alpha))


def evbmf(matrix) -> VBMFResult:
    """Empirical VBMF of a matrix: rank, noise variance, threshold and shrunk singular values.

    Parameters
    ----------
    matrix
        Any L x M floating-point numpy array or torch tensor (any device except meta; computed in
        float64 on the CPU). Transposed internally when L > M.

    Returns
    -------
    VBMFResult
        ``rank`` may be 0: no singular value above the estimated noise. An all-zero matrix gives
        rank 0 with ``sigma2 = threshold = 0``. Scale invariant: the matrix is divided by its largest
        magnitude before the solve, so ``c * Y`` gives the same rank for any ``c > 0`` that float64
        represents (1e-300 included) and ``sigma2`` scaled by ``c**2`` (which underflows to 0 below
        about 1e-150).

    Raises
    ------
    TypeError
        Not an array/tensor, or a non-floating dtype.
    ValueError
        Not 2-D, empty, non-finite values, or on the meta device.
    """
    singular_values, L, M, transposed, frobenius_sq, scale = _spectrum(matrix, "matrix")
    out = _core.vbmf.evbmf(singular_values, L, M, frobenius_sq)
    return _result(out, singular_values, L, M, transposed, scale, method="evbmf", prior=None,
                   sigma2_estimated=True, tau_bar=float(out["tau_bar"]), x_bar=float(out["x_bar"]))


def vbmf(matrix, prior: float, sigma2: Optional[float] = None) -> VBMFResult:
    """VBMF with a known prior product ``c = c_a * c_b``.

    The threshold is ``sqrt(sigma2 * (t + sqrt(t^2 - L*M)))`` with ``t = (L + M + sigma2/c^2) / 2``;
    a kept value g is shrunk to ``g * (1 - sigma2/(2 g^2) * (L + M + sqrt((M-L)^2 + 4 g^2/c^2)))``.

    Parameters
    ----------
    matrix
        Any L x M floating-point numpy array or torch tensor (transposed internally when L > M).
    prior
        ``c_a * c_b`` > 0, the product of the prior standard deviations of the two factors
        (units of the matrix entries).
    sigma2
        Noise variance > 0, or None to estimate it by EVBMF's noise-variance search (the
        empirical-Bayes estimate, independent of ``prior``).

    Returns
    -------
    VBMFResult
        ``rank`` may be 0.

    Raises
    ------
    TypeError
        Not an array/tensor, a non-floating dtype, or a non-numeric ``prior``/``sigma2``.
    ValueError
        Not 2-D, empty, non-finite values, ``prior <= 0`` or ``sigma2 <= 0``.
    """
    prior = _positive_float(prior, "prior")
    if sigma2 is not None:
        sigma2 = _positive_float(sigma2, "sigma2")
    singular_values, L, M, transposed, frobenius_sq, scale = _spectrum(matrix, "matrix")
    # The solver sees the matrix divided by scale: the prior (units of the entries) and sigma2 (squared
    # units) go with it.
    out = _core.vbmf.vbmf(singular_values, L, M, frobenius_sq, prior / scale,
                          -1.0 if sigma2 is None else sigma2 / scale / scale)
    return _result(out, singular_values, L, M, transposed, scale, method="vbmf", prior=prior,
                   sigma2_estimated=sigma2 is None)
