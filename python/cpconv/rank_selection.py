"""Choosing the CP rank of a convolution kernel: VBMF on its unfoldings, energy, ratio, or given.

The default follows Astrid, Lee & Seo (2018): run EVBMF on the kernel's output-channel unfolding
(N x C*kh*kw) and input-channel unfolding (C x N*kh*kw) and combine the two estimated ranks (max by
default). MUSCO's weakened VBMF (Gusak et al., 2019) moves each mode rank from the EVBMF estimate
towards the unfolding's full rank: ``R_w = max(floor(R_full - w * (R_full - R_evbmf)), 0)`` with
``R_full = min(L, M)`` of that unfolding; ``w = 1`` is plain EVBMF and ``w = 0`` the full rank.

Rank-0 policy
-------------
When (E)VBMF finds no singular value above the estimated noise in the unfoldings that the ``combine``
rule looks at (typical of an untrained, random kernel), the selected ``rank`` is 0 and ``reason`` says
"leave this layer dense". ``min_rank`` does not lift a 0 to 1: a compression driver should keep such a
layer as an ``nn.Conv2d``, and :meth:`cpconv.CPConv2d.from_conv` raises a ``ValueError`` that suggests
passing an explicit integer rank. An all-zero kernel also gives rank 0 (with every method but "ratio"
and an explicit rank).

Grouped convolutions
--------------------
A conv with ``groups = G`` is decomposed per group and every group gets the same rank (``CPConv2d``
splits the total rank evenly). Each group's kernel (N/G x C/G x kh x kw) is unfolded separately; per
mode, the largest rank over the groups is kept, and the total rank is G times the combined per-group
rank. The result is always a multiple of ``lcm(multiple_of, G)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from .cp_als import MAX_CP_ALS_RANK
from .vbmf import VBMFResult, _positive_float, evbmf, vbmf

__all__ = ["RankSelection", "RatioNotMetWarning", "select_rank", "check_rank_options", "max_cp_rank",
           "COMBINE_RULES", "RANK_METHODS"]

COMBINE_RULES = ("max", "min", "mean", "output", "input")
RANK_METHODS = ("evbmf", "vbmf", "energy", "ratio")
_MODES = ("output", "input")
_METHOD_OPTIONS = {"evbmf": (), "vbmf": ("prior", "sigma2"), "energy": ("energy",), "ratio": ("ratio",)}


class RatioNotMetWarning(UserWarning):
    """``method="ratio"``: even the smallest allowed rank (1, or what ``min_rank``, ``multiple_of`` and the
    groups require) keeps fewer than ``ratio`` times fewer parameters than the dense kernel; that rank is
    used anyway."""


@dataclass
class RankSelection:
    """The rank chosen for one convolution kernel, and why.

    Attributes
    ----------
    rank
        Total CP rank (a multiple of ``groups``); 0 means "leave this layer dense" (see the module
        docstring's rank-0 policy).
    method
        ``"evbmf"``, ``"vbmf"``, ``"energy"``, ``"ratio"`` or ``"fixed"`` (an integer was given).
    combine
        How the two mode ranks were combined (``"max"``, ``"min"``, ``"mean"``, ``"output"``, ``"input"``).
    mode_ranks
        ``{"output": r_out, "input": r_in}`` after weakening, as total ranks (G times the largest group
        rank); empty for "ratio" and "fixed".
    details
        Per mode, one entry per group: a :class:`cpconv.VBMFResult` for "evbmf"/"vbmf", a dict for
        "energy"; empty otherwise.
    reason
        A human-readable account of the choice.
    weakening
        MUSCO's weakening factor ``w`` (1.0 = plain EVBMF).
    groups
        The conv's groups.
    kernel_shape
        ``(N, C/G, kh, kw)``.
    rank_limit
        Largest rank accepted: G times the largest possible CP rank of one group's kernel
        (min over modes of the product of the other three mode sizes).
    unadjusted_rank
        The rank before ``min_rank``/``max_rank``/``multiple_of`` were applied.
    parameter_ratio
        Dense kernel parameters / CP factor parameters at ``rank`` (None when ``rank`` is 0).
    options
        The method options that were used (e.g. ``{"energy": 0.9}``).
    """

    rank: int
    method: str
    combine: str
    mode_ranks: dict
    details: dict
    reason: str
    weakening: float
    groups: int
    kernel_shape: tuple
    rank_limit: int
    unadjusted_rank: int
    parameter_ratio: Optional[float]
    options: dict = field(default_factory=dict)

    @property
    def leave_dense(self) -> bool:
        """True when the rank is 0: no signal found, keep the layer as a dense convolution."""
        return self.rank == 0

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of everything above (VBMF results via their own ``to_dict``)."""
        details = {
            mode: [d.to_dict() if isinstance(d, VBMFResult) else dict(d) for d in per_group]
            for mode, per_group in self.details.items()
        }
        return {
            "rank": int(self.rank),
            "leave_dense": self.leave_dense,
            "method": self.method,
            "combine": self.combine,
            "mode_ranks": {k: int(v) for k, v in self.mode_ranks.items()},
            "details": details,
            "reason": self.reason,
            "weakening": float(self.weakening),
            "groups": int(self.groups),
            "kernel_shape": [int(s) for s in self.kernel_shape],
            "rank_limit": int(self.rank_limit),
            "unadjusted_rank": int(self.unadjusted_rank),
            "parameter_ratio": None if self.parameter_ratio is None else float(self.parameter_ratio),
            "options": {k: (None if v is None else float(v)) for k, v in self.options.items()},
        }


def max_cp_rank(kernel_shape, groups: int = 1) -> int:
    """Largest total rank :func:`select_rank` and ``from_conv`` accept for a kernel.

    Any tensor of shape (I1, I2, I3, I4) has CP rank at most min_k prod_{j != k} I_j; a rank above that
    only adds parameters. With groups, that bound per group (N/G x C/G x kh x kw) times G. A kernel
    larger than 1x1 is decomposed by :func:`cpconv.cp_als`, whose rank is also capped at
    ``cpconv.cp_als.MAX_CP_ALS_RANK`` (4096) per group; a 1x1 kernel (truncated SVD) is not.

    Parameters
    ----------
    kernel_shape
        ``(N, C/G, kh, kw)`` as stored in ``nn.Conv2d.weight``.
    groups
        The conv's groups (N must be divisible by it).
    """
    n, c_g, kh, kw = (int(s) for s in kernel_shape)
    dims = (n // groups, c_g, kh, kw)
    per_group = math.prod(dims) // max(dims)
    if kh * kw > 1:
        per_group = min(per_group, MAX_CP_ALS_RANK)
    return groups * per_group


def _kernel_and_groups(conv_or_weight, groups):
    from .cp_conv import CPConv2d  # local: cp_conv may import this module lazily too

    if isinstance(conv_or_weight, CPConv2d):
        raise TypeError(
            "select_rank needs a dense kernel, got a CPConv2d (already decomposed); pass "
            "layer.to_conv() to re-select a rank for its reconstructed kernel"
        )
    if isinstance(conv_or_weight, nn.Conv2d):
        if groups is not None and groups != conv_or_weight.groups:
            raise ValueError(f"groups={groups!r} contradicts the conv's groups={conv_or_weight.groups}")
        weight, groups = conv_or_weight.weight, conv_or_weight.groups
    elif isinstance(conv_or_weight, (torch.Tensor, np.ndarray)):
        weight = conv_or_weight
        groups = 1 if groups is None else groups
    else:
        raise TypeError(
            "conv_or_weight must be an nn.Conv2d or its weight (a 4-D tensor/array N x C/G x kh x kw), "
            f"got {type(conv_or_weight).__name__}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if isinstance(weight, torch.Tensor):
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ValueError("the conv's weight is uninitialised (a lazy module): run a forward pass first")
        if weight.device.type == "meta":
            raise ValueError("the kernel is on the meta device and has no values; materialise it first")
        if not weight.is_floating_point():
            raise TypeError(f"the kernel must be floating point, got {weight.dtype}")
        kernel = weight.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        if not np.issubdtype(weight.dtype, np.floating):
            raise TypeError(f"the kernel must be floating point, got {weight.dtype}")
        kernel = weight.astype(np.float64, copy=False)
    if kernel.ndim != 4:
        raise ValueError(f"the kernel must be 4-D (N, C/G, kh, kw), got shape {tuple(kernel.shape)}")
    if kernel.size == 0:
        raise ValueError(f"the kernel must not be empty, got shape {tuple(kernel.shape)}")
    if kernel.shape[0] % groups:
        raise ValueError(f"the kernel's N={kernel.shape[0]} is not divisible by groups={groups}")
    if not np.all(np.isfinite(kernel)):
        raise ValueError("the kernel contains non-finite values (nan or inf)")
    return kernel, groups


def _unfoldings(kernel: np.ndarray, groups: int):
    """Per group: the output-channel (N/G x C/G*kh*kw) and input-channel (C/G x N/G*kh*kw) unfoldings."""
    n_g = kernel.shape[0] // groups
    out = []
    for g in range(groups):
        k = kernel[g * n_g:(g + 1) * n_g]
        out.append({"output": k.reshape(k.shape[0], -1), "input": k.transpose(1, 0, 2, 3).reshape(k.shape[1], -1)})
    return out


def _energy_rank(matrix: np.ndarray, energy: float) -> dict:
    g = np.linalg.svd(matrix, compute_uv=False)
    if g[0] > 0:
        g = g / g[0]  # the squares below underflow for entries near 1e-160 (and overflow near 1e160)
    total = float(np.sum(g**2))
    if total == 0.0:
        return {"rank": 0, "full_rank": len(g), "energy_kept": 0.0}
    cumulative = np.cumsum(g**2) / total
    rank = int(np.searchsorted(cumulative, energy * (1 - 1e-12)) + 1)
    rank = min(rank, len(g))
    return {"rank": rank, "full_rank": len(g), "energy_kept": float(cumulative[rank - 1])}


def _weakened(rank: int, full_rank: int, weakening: float) -> int:
    # The epsilon keeps e.g. 10 - 0.7 * 10 = 2.9999999999999996 from flooring to 2.
    return max(math.floor(full_rank - weakening * (full_rank - rank) + 1e-9), 0)


def _combine(r_out: int, r_in: int, combine: str) -> int:
    return {
        "max": max(r_out, r_in),
        "min": min(r_out, r_in),
        "mean": math.ceil((r_out + r_in) / 2),
        "output": r_out,
        "input": r_in,
    }[combine]


def _positive_int(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def select_rank(
    conv_or_weight,
    method: Union[str, int] = "evbmf",
    combine: str = "max",
    weakening: float = 1.0,
    min_rank: int = 1,
    max_rank: Optional[int] = None,
    multiple_of: int = 1,
    *,
    groups: Optional[int] = None,
    **method_options,
) -> RankSelection:
    """Choose the CP rank of a convolution kernel.

    Parameters
    ----------
    conv_or_weight
        An ``nn.Conv2d``, or its kernel as a 4-D floating tensor/array (N, C/G, kh, kw). A
        :class:`cpconv.CPConv2d` is refused (it is already decomposed).
    method
        - ``"evbmf"``: EVBMF on the output- and input-channel unfoldings (per group).
        - ``"vbmf"``: VBMF with a known prior; options ``prior`` (c_a*c_b > 0, required) and ``sigma2``
          (noise variance > 0; default None = EVBMF's estimate).
        - ``"energy"``: per unfolding, the smallest rank whose singular values keep a fraction of the
          squared Frobenius norm; option ``energy`` in (0, 1] (default 0.9).
        - ``"ratio"``: the largest rank whose factors are at least ``ratio`` times smaller than the dense
          kernel: ``R = floor(N*C/G*kh*kw / (ratio * (N/G + C/G + kh + kw)))`` (bias excluded); option
          ``ratio`` > 0 (required). Rounded down to the required multiple. When even the smallest
          allowed rank (1, or ``min_rank``, or the required multiple) misses the target, that rank is
          used anyway: ``reason`` says so and a :class:`RatioNotMetWarning` (a ``UserWarning``) names
          the kernel, the requested and the achieved ratio.
        - an ``int``: that rank (1 <= rank <= ``rank_limit``).
    combine
        How the two mode ranks become one (VBMF and energy methods): ``"max"`` (default), ``"min"``,
        ``"mean"`` (rounded up), ``"output"`` or ``"input"`` (one mode only).
    weakening
        MUSCO's weakening ``w`` in [0, 1] for "evbmf"/"vbmf": per mode
        ``R_w = max(floor(R_full - w * (R_full - R_vbmf)), 0)``, ``R_full = min(L, M)`` of the unfolding.
        1.0 is plain (E)VBMF; other methods require 1.0.
    min_rank, max_rank
        Clamp a positive rank into ``[min_rank, max_rank]`` (``max_rank=None``: no upper clamp besides
        ``rank_limit``). A rank of 0 (no signal: leave dense) is not lifted by ``min_rank``.
    multiple_of
        The rank is rounded up (down for "ratio", or when rounding up would exceed ``max_rank``) to a
        multiple of ``lcm(multiple_of, groups)``.
    groups
        The groups of a conv whose bare weight is given (default 1); taken from an ``nn.Conv2d``.
    **method_options
        ``prior``, ``sigma2``, ``energy`` or ``ratio`` as listed above.

    Returns
    -------
    RankSelection
        ``rank`` 0 means "leave this layer dense" (see the module docstring's rank-0 policy).

    Raises
    ------
    TypeError
        A CPConv2d, an unsupported object, a non-floating kernel, an unknown option, a missing
        required option (``prior`` for ``"vbmf"``, ``ratio`` for ``"ratio"``), non-int ranks.
    ValueError
        Non-finite/empty/non-4-D kernel, meta device, an unknown method or combine rule, weakening
        outside [0, 1] or given with a method it does not apply to, an integer rank < 1 or above
        ``rank_limit``, ``max_rank < min_rank``, or no multiple of the required step fitting under
        ``max_rank``.
    """
    kernel, groups = _kernel_and_groups(conv_or_weight, groups)
    spec = _check_selection(kernel.shape, groups, method, combine, weakening, min_rank, max_rank, multiple_of,
                            method_options)
    method, weakening, options = spec["method"], spec["weakening"], spec["options"]
    min_rank, max_rank, multiple_of = spec["min_rank"], spec["max_rank"], spec["multiple_of"]
    limit, step, cap = spec["limit"], spec["step"], spec["cap"]
    n, c_g, kh, kw = kernel.shape

    details: dict = {}
    mode_ranks: dict = {}
    leave_dense_note = ""
    if method in ("evbmf", "vbmf", "energy"):
        per_group_ranks = {mode: [] for mode in _MODES}
        full_ranks = {mode: [] for mode in _MODES}
        details = {mode: [] for mode in _MODES}
        for unfolded in _unfoldings(kernel, groups):
            for mode in _MODES:
                matrix = unfolded[mode]
                if method == "evbmf":
                    result = evbmf(matrix)
                elif method == "vbmf":
                    result = vbmf(matrix, options["prior"], options["sigma2"])
                else:
                    result = _energy_rank(matrix, options["energy"])
                details[mode].append(result)
                r = result.rank if isinstance(result, VBMFResult) else result["rank"]
                full = min(matrix.shape)
                if method != "energy":
                    r = _weakened(r, full, weakening)
                per_group_ranks[mode].append(r)
                full_ranks[mode].append(full)
        group_mode_rank = {mode: max(per_group_ranks[mode]) for mode in _MODES}
        mode_ranks = {mode: groups * r for mode, r in group_mode_rank.items()}
        raw = groups * _combine(group_mode_rank["output"], group_mode_rank["input"], combine)
        label = {"evbmf": "EVBMF", "vbmf": "VBMF", "energy": f"energy {options.get('energy')}"}[method]
        account = ", ".join(
            f"{mode} unfolding rank {mode_ranks[mode]} of {groups * max(full_ranks[mode])}" for mode in _MODES
        )
        if weakening != 1.0:
            account += f" (weakened, w={weakening:g})"
        reason = f"{label}: {account}; combine={combine} -> {raw}"
        if raw == 0:
            leave_dense_note = (
                f"{label} found no singular value above the estimated noise in the "
                f"{'unfoldings' if combine in ('max', 'min', 'mean') else combine + ' unfolding'} "
                f"(combine={combine}): leave this layer dense (an untrained or unstructured kernel); "
                "pass an explicit integer rank to decompose it anyway"
            )
            if method == "energy":
                leave_dense_note = "the kernel is all zeros: leave this layer dense"
    elif method == "ratio":
        ratio = options["ratio"]
        raw = math.floor(n * c_g * kh * kw / (ratio * (n // groups + c_g + kh + kw)))
        reason = f"ratio {ratio:g}: largest rank with dense/CP kernel parameters >= {ratio:g} is {raw}"
    else:
        raw = spec["fixed_rank"]
        reason = f"rank {raw} given"

    if leave_dense_note:
        rank = 0
        reason = f"{reason}. {leave_dense_note}"
    else:
        # _check_selection made sure that step <= cap, so the rounded rank stays in [step, cap].
        rank = max(raw, min_rank)
        rank = min(rank, cap)
        if method == "ratio":
            rank = max(rank // step * step, step)
        else:
            rank = -(-rank // step) * step
        if rank > cap:
            rank = cap // step * step
        if rank != raw:
            reason += (f"; adjusted to {rank} (min_rank={min_rank}, max_rank={max_rank}, multiple of {step}, "
                       f"limit {limit})")
    dense_params = n * c_g * kh * kw
    parameter_ratio = dense_params / (rank * (n // groups + c_g + kh + kw)) if rank else None
    selection = RankSelection(
        rank=rank, method=method, combine=combine, mode_ranks=mode_ranks, details=details, reason=reason,
        weakening=weakening, groups=groups, kernel_shape=tuple(int(s) for s in kernel.shape), rank_limit=limit,
        unadjusted_rank=int(raw), parameter_ratio=parameter_ratio, options=options,
    )
    shortfall = ratio_shortfall(selection)
    if shortfall:
        selection.reason += f"; {shortfall}"
        warnings.warn(f"select_rank: {shortfall}", RatioNotMetWarning, stacklevel=2)
    return selection


def ratio_shortfall(selection: RankSelection) -> str:
    """For a ``"ratio"`` selection whose rank misses the requested ratio, a sentence saying so; else ``""``."""
    target = selection.options.get("ratio") if selection.method == "ratio" else None
    if target is None or selection.parameter_ratio is None or selection.parameter_ratio >= target:
        return ""
    return (f"the requested parameter ratio {target:g} is not met for the kernel {tuple(selection.kernel_shape)} "
            f"(groups={selection.groups}): its smallest allowed rank {selection.rank} gives only "
            f"{selection.parameter_ratio:.3g}x fewer parameters")


def check_rank_options(
    conv_or_weight,
    method: Union[str, int] = "evbmf",
    combine: str = "max",
    weakening: float = 1.0,
    min_rank: int = 1,
    max_rank: Optional[int] = None,
    multiple_of: int = 1,
    *,
    groups: Optional[int] = None,
    **method_options,
) -> None:
    """Raise what :func:`select_rank` would raise for these arguments, without computing a rank.

    Everything :func:`select_rank` validates is checked (the kernel's shape, dtype and values, the
    method and its options, an integer rank against ``rank_limit``, ``min_rank``/``max_rank``/
    ``multiple_of`` against the groups and the limit); no SVD or VBMF is run. Used by
    :func:`cpconv.compress` to validate every layer before it touches the first one.
    """
    kernel, groups = _kernel_and_groups(conv_or_weight, groups)
    _check_selection(kernel.shape, groups, method, combine, weakening, min_rank, max_rank, multiple_of,
                     method_options)


def _check_selection(kernel_shape, groups, method, combine, weakening, min_rank, max_rank, multiple_of,
                     method_options) -> dict:
    """Validate :func:`select_rank`'s arguments for a kernel of this shape; the normalised values."""
    limit = max_cp_rank(kernel_shape, groups)
    if isinstance(method, bool):
        raise TypeError(f"method must be one of {RANK_METHODS} or an int rank, got {method!r}")
    fixed_rank = None
    if isinstance(method, (int, np.integer)):
        fixed_rank = int(method)
        method = "fixed"
        if fixed_rank < 1:
            raise ValueError(f"rank must be >= 1, got {fixed_rank}")
        if fixed_rank > limit:
            raise ValueError(
                f"rank {fixed_rank} exceeds the limit {limit} for a kernel of shape {tuple(kernel_shape)} with "
                f"groups={groups} (groups x the largest possible CP rank of one group's kernel)"
            )
    elif method not in RANK_METHODS:
        raise ValueError(f"method must be one of {RANK_METHODS} or an int rank, got {method!r}")
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    try:
        weakening = float(weakening)
    except (TypeError, ValueError):
        raise TypeError(f"weakening must be a float in [0, 1], got {weakening!r}") from None
    if not 0.0 <= weakening <= 1.0:
        raise ValueError(f"weakening must be in [0, 1] (1.0 = plain EVBMF), got {weakening}")
    if weakening != 1.0 and method not in ("evbmf", "vbmf"):
        raise ValueError(f"weakening applies to the 'evbmf' and 'vbmf' methods only, got method={method!r}")
    min_rank = _positive_int(min_rank, "min_rank")
    max_rank = _positive_int(max_rank, "max_rank", allow_none=True)
    multiple_of = _positive_int(multiple_of, "multiple_of")
    if max_rank is not None and max_rank < min_rank:
        raise ValueError(f"max_rank={max_rank} must be >= min_rank={min_rank}")
    allowed = _METHOD_OPTIONS.get(method, ())
    unknown = sorted(set(method_options) - set(allowed))
    if unknown:
        raise TypeError(f"unexpected option(s) {unknown} for method {method!r}; it accepts {list(allowed)}")

    options: dict = {}
    if method == "vbmf":
        if "prior" not in method_options:
            raise TypeError("method='vbmf' needs the option prior=c_a*c_b (> 0)")
        options["prior"] = _positive_float(method_options["prior"], "prior")
        sigma2 = method_options.get("sigma2")
        options["sigma2"] = None if sigma2 is None else _positive_float(sigma2, "sigma2")
    elif method == "energy":
        energy = _positive_float(method_options.get("energy", 0.9), "energy")
        if energy > 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        options["energy"] = energy
    elif method == "ratio":
        if "ratio" not in method_options:
            raise TypeError("method='ratio' needs the option ratio=<target parameter reduction, > 0>")
        options["ratio"] = _positive_float(method_options["ratio"], "ratio")

    step = math.lcm(multiple_of, groups)
    cap = min(limit, max_rank) if max_rank is not None else limit
    if cap < step:
        raise ValueError(
            f"no rank that is a multiple of {step} (lcm of multiple_of={multiple_of} and groups={groups}) "
            f"is <= {cap} (min of max_rank={max_rank} and the limit {limit})"
        )
    return {"method": method, "fixed_rank": fixed_rank, "weakening": weakening, "min_rank": min_rank,
            "max_rank": max_rank, "multiple_of": multiple_of, "options": options, "limit": limit,
            "step": step, "cap": cap}
