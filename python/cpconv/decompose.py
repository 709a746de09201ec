"""Decomposing a trained ``nn.Conv2d`` into a :class:`cpconv.CPConv2d` (``CPConv2d.from_conv``).

The rank comes from :func:`cpconv.select_rank` (EVBMF by default). Each group's kernel
(N/G x C/G x kh x kw) is CP-decomposed by :func:`cpconv.cp_als` at rank R/G (in float64, whatever the conv's dtype: float32 ALS
stops near 1e-4..1e-3 relative error, where its error formula runs out of resolution); a 1x1 kernel is a matrix,
decomposed exactly by a truncated SVD instead. The four factors of each rank-one component are balanced
(equal column norms, the sign carried by the output factor) so that fine-tuning starts well conditioned.
"""

from __future__ import annotations

import math
import time
from typing import Union

import numpy as np
import torch
from torch import nn

from .cp_als import check_cp_als_options, cp_als
from .rank_selection import RankSelection, _kernel_and_groups, select_rank

__all__ = ["decompose_conv", "check_als_options", "SELECT_RANK_OPTIONS", "CP_ALS_OPTIONS", "STABILIZING_L2_REG",
           "POLISH_ROUND", "MAX_DEGENERACY"]

SELECT_RANK_OPTIONS = ("combine", "weakening", "min_rank", "max_rank", "multiple_of", "prior", "sigma2",
                       "energy", "ratio")
CP_ALS_OPTIONS = ("init", "max_iter", "tol", "seed", "line_search", "l2_reg")

#: ``l2_reg="auto"`` (the default of ``from_conv`` and ``compress``): plain CP-ALS, kept when it ends
#: healthy (``component_norm_ratio`` at most ``MAX_DEGENERACY``). Otherwise CP-ALS again from the same
#: start with the ridge ``STABILIZING_L2_REG`` (relative, see :func:`cpconv.cp_als`) until it converges,
#: then plain iterations from there in rounds of ``POLISH_ROUND``, for as long as a round lowers the error
#: and the decomposition stays healthy. On trained kernels plain CP-ALS often creeps into degenerate,
#: mutually cancelling components (component norms 10-100x the kernel's) for a negligible gain in CP
#: error, which costs the layer digits in float32 and makes it useless in bfloat16/float16; the ridge
#: keeps the components apart (CP error within ~0.003 of the degenerate one) and the guarded polish stops
#: before they drift together again. (The ridge is not applied from the start: on an exactly low-rank
#: kernel it can lead plain CP-ALS to another, inexact stationary point.)
STABILIZING_L2_REG = 1e-3
POLISH_ROUND = 25
MAX_DEGENERACY = 3.0


def check_als_options(**options):
    """Validate ``from_conv``/``compress``'s CP-ALS options (:func:`cpconv.cp_als`'s, with
    ``l2_reg="auto"`` allowed, the default) without a tensor: the errors ``cp_als`` raises."""
    reg = options.get("l2_reg", "auto")
    if isinstance(reg, str):
        if reg != "auto":
            raise ValueError(f"l2_reg must be 'auto' or a number >= 0, got {reg!r}")
        options = dict(options, l2_reg=STABILIZING_L2_REG)
    return check_cp_als_options(**options)


def _cp_als_stabilized(block: np.ndarray, rank: int, options: dict):
    """(result, iterations, converged) of CP-ALS on one group's kernel, with ``l2_reg="auto"`` handled."""
    options = dict(options)
    reg = options.pop("l2_reg", "auto")
    if not isinstance(reg, str):
        result = cp_als(block, rank, l2_reg=reg, **options)
        return result, result.n_iter, result.converged
    plain = cp_als(block, rank, l2_reg=0.0, **options)
    if plain.component_norm_ratio <= MAX_DEGENERACY:
        return plain, plain.n_iter, plain.converged
    options["seed"] = plain.seed  # the same start (seed=None drew one)
    result = cp_als(block, rank, l2_reg=STABILIZING_L2_REG, **options)
    iterations, converged = plain.n_iter + result.n_iter, result.converged
    limit = max(MAX_DEGENERACY, result.component_norm_ratio)
    remaining = options.get("max_iter", 500)
    polish = {k: v for k, v in options.items() if k in ("tol", "line_search")}
    while remaining > 0:
        step = cp_als(block, rank, init=result, max_iter=min(POLISH_ROUND, remaining), seed=result.seed, **polish)
        if step.component_norm_ratio > limit or not step.rel_error <= result.rel_error:
            break  # components start to cancel (or no gain): keep the last healthy factors
        result, iterations, remaining = step, iterations + step.n_iter, remaining - step.n_iter
        if step.converged:
            break
    return result, iterations, converged


def _balanced(weights: np.ndarray, factors):
    """Fold the CP weights into the factors with equal column norms; the sign goes to the first factor."""
    factors = [np.asarray(f, dtype=np.float64) for f in factors]
    norms = [np.linalg.norm(f, axis=0) for f in factors]
    scale = np.asarray(weights, dtype=np.float64) * np.prod(norms, axis=0)
    safe = [np.where(n > 0, n, 1.0) for n in norms]
    root = np.abs(scale) ** (1.0 / len(factors))
    out = [f / s * root for f, s in zip(factors, safe)]
    out[0] = out[0] * np.sign(scale)
    return out, scale


def _json_float(x) -> float:
    x = float(x)
    return x if math.isfinite(x) else None


def decompose_conv(conv: nn.Conv2d, rank: Union[str, int, RankSelection] = "evbmf", **options):
    """CP-decompose a trained ``nn.Conv2d`` into a :class:`cpconv.CPConv2d` approximating it.

    Parameters
    ----------
    conv
        An ``nn.Conv2d`` of any geometry ``CPConv2d`` supports (non-square kernels, stride, padding
        including ``"same"``/``"valid"``, dilation, padding modes, groups); its bias is kept as is.
    rank
        Anything :func:`cpconv.select_rank` accepts as ``method`` (``"evbmf"``, ``"vbmf"``, ``"energy"``,
        ``"ratio"`` or an int rank, 1 <= rank <= :func:`cpconv.max_cp_rank`), or a precomputed
        :class:`cpconv.RankSelection` for this conv's kernel.
    **options
        :func:`cpconv.select_rank` options (``combine``, ``weakening``, ``min_rank``, ``max_rank``,
        ``multiple_of``, ``prior``, ``sigma2``, ``energy``, ``ratio``) and :func:`cpconv.cp_als` options
        (``init``, ``max_iter``, ``tol``, ``seed``, ``line_search``, ``l2_reg``). ``l2_reg`` defaults to
        ``"auto"``: plain CP-ALS, kept when its components do not cancel each other (``degeneracy`` at
        most ``MAX_DEGENERACY`` = 3); otherwise CP-ALS with a ridge of ``STABILIZING_L2_REG`` (1e-3,
        relative) from the same start, then plain iterations for as long as they lower the error and
        keep the degeneracy at most 3. Trained kernels' decompositions then have a ``degeneracy`` of
        about 1-3 instead of 5-100 (so the layer also works in bfloat16/float16) at about the same CP
        error, and exact low-rank kernels are recovered exactly. ``max_iter`` bounds each of these
        CP-ALS runs (``decomposition_info["n_iter"]`` counts them all). A number runs :func:`cpconv.cp_als` with that ridge (0: plain CP-ALS).

    Returns
    -------
    CPConv2d
        On the conv's device and dtype, in the conv's train/eval mode; the four factors have the
        ``requires_grad`` of the conv's weight and the bias that of the conv's bias (a frozen conv
        stays frozen). With ``seed=None`` CP-ALS draws its seed from torch's global RNG, so
        ``torch.manual_seed(s)`` before the call gives the same factors every time. With
        ``decomposition_info`` (a JSON-serialisable dict):
        ``rank_selection`` (:meth:`RankSelection.to_dict`), ``rank``, ``method`` (``"cp_als"`` or
        ``"svd"``), ``rel_error`` (||K - K_cp||_F / ||K||_F measured on the returned factors),
        ``n_iter`` (max over groups), ``converged`` (all groups), ``degeneracy`` (max over groups of
        sqrt(sum_r weight_r^2) / ||K_g||_F, CP-ALS's ``component_norm_ratio``: about 1 or less for a
        healthy decomposition, much larger when diverging components cancel each other),
        ``max_congruence`` (max over groups; near 1 together with a large ``degeneracy`` is the
        degenerate pattern), ``seconds``, ``cp_als_options`` and ``per_group`` (the same per group).

    Raises
    ------
    TypeError
        ``conv`` not an ``nn.Conv2d`` (a ``CPConv2d`` included), a non-floating kernel, unknown options.
    ValueError
        Non-finite or empty weights, a conv on the meta device or uninitialised (lazy), a rank < 1 or
        above the limit, and a selected rank of 0: (E)VBMF found no signal above the noise, the layer
        should stay dense (pass an explicit integer rank to decompose it anyway).
    """
    from .cp_conv import CPConv2d

    if isinstance(conv, CPConv2d):
        raise TypeError("conv is already a CPConv2d; from_conv decomposes a dense nn.Conv2d (see CPConv2d.to_conv)")
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    unknown = sorted(set(options) - set(SELECT_RANK_OPTIONS) - set(CP_ALS_OPTIONS))
    if unknown:
        raise TypeError(
            f"unexpected option(s) {unknown}; from_conv accepts select_rank options {list(SELECT_RANK_OPTIONS)} "
            f"and cp_als options {list(CP_ALS_OPTIONS)}"
        )
    select_options = {k: v for k, v in options.items() if k in SELECT_RANK_OPTIONS}
    als_options = {k: v for k, v in options.items() if k in CP_ALS_OPTIONS}
    check_als_options(**als_options)
    start = time.perf_counter()

    kernel, groups = _kernel_and_groups(conv, None)  # validates: meta, lazy, dtype, finite, shape
    if isinstance(rank, RankSelection):
        if select_options:
            raise TypeError(f"options {sorted(select_options)} cannot be combined with a precomputed RankSelection")
        selection = rank
        if tuple(selection.kernel_shape) != tuple(kernel.shape) or selection.groups != groups:
            raise ValueError(
                f"the RankSelection was made for a kernel {tuple(selection.kernel_shape)} with groups="
                f"{selection.groups}, not this conv's {tuple(kernel.shape)} with groups={groups}"
            )
        if selection.rank > selection.rank_limit or (selection.rank and selection.rank % groups):
            raise ValueError(f"RankSelection.rank={selection.rank} is not a valid rank for this conv")
    elif isinstance(rank, (str, int, np.integer)):
        selection = select_rank(conv, rank, **select_options)
    else:
        raise TypeError(
            f"rank must be a method name, an int or a RankSelection, got {type(rank).__name__}"
        )
    if selection.rank == 0:
        raise ValueError(
            f"rank selection chose rank 0 for this conv ({selection.reason}). The compression driver keeps "
            "such a layer dense; to decompose it anyway call from_conv with an explicit rank, e.g. rank=16"
        )

    total_rank = selection.rank
    group_rank = total_rank // groups
    n, c_g, kh, kw = kernel.shape
    n_g = n // groups
    weight = conv.weight
    U = np.zeros((n, group_rank))
    S = np.zeros((c_g, total_rank))
    Y = np.zeros((kh, total_rank))
    X = np.zeros((kw, total_rank))
    per_group = []
    svd = kh == 1 and kw == 1
    for g in range(groups):
        block = kernel[g * n_g:(g + 1) * n_g]
        cols = slice(g * group_rank, (g + 1) * group_rank)
        norm = float(np.linalg.norm(block))
        if svd:
            left, sv, right_t = np.linalg.svd(block[:, :, 0, 0], full_matrices=False)
            root = np.sqrt(sv[:group_rank])
            factors = [left[:, :group_rank] * root, right_t[:group_rank].T * root,
                       np.ones((1, group_rank)), np.ones((1, group_rank))]
            info = {"n_iter": 0, "converged": True,
                    "rel_error": float(np.sqrt(np.sum(sv[group_rank:] ** 2)) / norm) if norm else 0.0,
                    # singular vectors are orthogonal: no cancelling components
                    "degeneracy": float(np.sqrt(np.sum(sv[:group_rank] ** 2)) / norm) if norm else 0.0,
                    "max_congruence": 0.0}
        elif norm == 0.0:
            factors = [np.zeros((d, group_rank)) for d in (n_g, c_g, kh, kw)]
            info = {"n_iter": 0, "converged": True, "rel_error": 0.0, "degeneracy": 0.0, "max_congruence": 0.0}
        else:
            # float64 whatever the conv's dtype: cp_als stops when its error formula stops resolving
            # changes, near 1e-4..1e-3 relative error in float32; float64 costs about 1.2-2x the time.
            result, n_iter, converged = _cp_als_stabilized(np.ascontiguousarray(block), group_rank, als_options)
            factors, _ = _balanced(result.weights, result.factors)
            info = {"n_iter": int(n_iter), "converged": bool(converged),
                    "rel_error": _json_float(result.rel_error),
                    "degeneracy": _json_float(result.component_norm_ratio),
                    "max_congruence": _json_float(result.max_congruence)}
        per_group.append(info)
        U[g * n_g:(g + 1) * n_g] = factors[0]
        S[:, cols] = factors[1]
        Y[:, cols] = factors[2]
        X[:, cols] = factors[3]

    to_tensor = lambda a: torch.as_tensor(a, dtype=weight.dtype).to(weight.device)  # noqa: E731
    bias = None if conv.bias is None else conv.bias.detach().clone()
    layer = CPConv2d.from_factors(
        [to_tensor(U), to_tensor(S), to_tensor(Y), to_tensor(X)], bias,
        stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=groups,
        padding_mode=conv.padding_mode,
    )
    layer.train(conv.training)
    # A frozen conv gives frozen factors (and a frozen bias keeps frozen): fine-tuning must not train
    # what the user excluded from it.
    for factor in layer.factors:
        factor.requires_grad_(conv.weight.requires_grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(conv.bias.requires_grad)
    # The error of what is actually returned (factors cast to the conv's dtype), in float64.
    with torch.no_grad():
        approx = layer.dense_weight().detach().to(device="cpu", dtype=torch.float64).numpy()
    total_norm = float(np.linalg.norm(kernel))
    rel_error = float(np.linalg.norm(approx - kernel) / total_norm) if total_norm else 0.0
    layer.decomposition_info = {
        "rank_selection": selection.to_dict(),
        "rank": int(total_rank),
        "groups": int(groups),
        "method": "svd" if svd else "cp_als",
        "rel_error": rel_error,
        "n_iter": max(info["n_iter"] for info in per_group),
        "converged": all(info["converged"] for info in per_group),
        "degeneracy": max((info["degeneracy"] for info in per_group if info["degeneracy"] is not None),
                          default=None),
        "max_congruence": max((info["max_congruence"] for info in per_group if info["max_congruence"] is not None),
                              default=None),
        "seconds": time.perf_counter() - start,
        "cp_als_options": {k: (v if isinstance(v, (bool, int, float, str, type(None))) else repr(v))
                           for k, v in als_options.items()},
        "per_group": per_group,
    }
    return layer
