"""``compress``: replace a trained model's convolutions by CP layers, one at a time, with fine-tuning.

The method (Astrid, Lee & Seo 2018, on Lebedev et al. 2015): for each layer in turn, choose its CP
rank with VBMF on the layer's *current* weights (after the fine-tuning that followed the previous
layer), CP-decompose it, put a :class:`~cpconv.CPConv2d` in its place, fine-tune, evaluate, go on.
"""

from __future__ import annotations

import json
import math
import numbers
import time
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoint import CheckpointState, CompressionCheckpoint, CheckpointError, capture_rng_state, restore_rng_state
from .conv_args import ConvGeometry
from .cp_conv import _FACTOR_NAMES, CPConv2d
from .decompose import CP_ALS_OPTIONS, check_als_options
from .rank_selection import COMBINE_RULES, RatioNotMetWarning, check_rank_options, ratio_shortfall, select_rank
from .report import CompressionReport, LayerReport

__all__ = ["compress", "load_compressed_state_dict", "eligible_convs", "ineligible_reason", "trace_convs", "SCHEDULES", "ALS_OPTIONS"]

SCHEDULES = ("iterative", "static", "uniform")
#: Keyword arguments of ``compress`` passed to the CP-ALS solver (``CPConv2d.from_conv``); every other
#: extra keyword goes to the rank selection (``cpconv.select_rank``).
ALS_OPTIONS = tuple(CP_ALS_OPTIONS)

_DENSE_REASON = ("rank selection found no singular value above the noise threshold (rank 0): the layer "
                 "carries no low-rank signal it can tell from noise, so it is left dense")


# ---------------------------------------------------------------------- layer discovery
def trace_convs(model: nn.Module, input_shape: Sequence[int]) -> Tuple[List[str], Dict[str, Tuple[int, int]]]:
    """Run one forward pass on zeros and record the convolutions in call order with their input sizes.

    Parameters
    ----------
    model
        The model; run in eval mode under ``torch.no_grad`` (its training flag is restored).
    input_shape
        ``(C, H, W)`` or ``(B, C, H, W)`` of one input.

    Returns
    -------
    (names, input_hw)
        Names of the ``nn.Conv2d`` and ``CPConv2d`` modules in the order of their first call, and each
        one's input spatial size ``(H, W)`` at its first call.
    """
    order, calls = _trace_conv_calls(model, input_shape)
    return order, {name: hws[0] for name, hws in calls.items()}


def _trace_conv_calls(model: nn.Module, input_shape: Sequence[int]) -> Tuple[List[str], Dict[str, List[Tuple[int, int]]]]:
    """As :func:`trace_convs`, with the input size of every call of each conv (a module called twice, or
    shared under several names, is listed under each of its names with all its calls)."""
    shape = _check_input_shape(input_shape)
    names: Dict[nn.Module, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, (nn.Conv2d, CPConv2d)):
            names.setdefault(m, []).append(name)
    order: List[str] = []
    calls: Dict[str, List[Tuple[int, int]]] = {}

    def hook(module, args):
        hw = (int(args[0].shape[-2]), int(args[0].shape[-1]))
        if names[module][0] not in calls:
            order.append(names[module][0])
        for name in names[module]:
            calls.setdefault(name, []).append(hw)

    handles = [m.register_forward_pre_hook(hook) for m in names]
    param = next(model.parameters(), None)
    x = torch.zeros(shape, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None and param.is_floating_point() else None)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return order, calls


def _check_input_shape(input_shape) -> Tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a sequence of ints (C, H, W) or (B, C, H, W), got {input_shape!r}") from None
    if len(shape) not in (3, 4) or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) or (B, C, H, W) with positive sizes, got {input_shape!r}")
    return shape if len(shape) == 4 else (1,) + shape


def _own_forward(module: nn.Module) -> bool:
    """True for an ``nn.Conv2d`` subclass with its own ``forward`` or ``_conv_forward``."""
    cls = type(module)
    return cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward


def ineligible_reason(module: nn.Module) -> Optional[str]:
    """Why :func:`compress` skips the ``nn.Conv2d`` ``module`` by default, or ``None`` when it is eligible."""
    if _own_forward(module):
        return (f"a {type(module).__name__}, an nn.Conv2d subclass whose forward is not nn.Conv2d's (it overrides "
                "forward or _conv_forward): a CP layer of its weight would not compute the same function, so "
                "it is never compressed")
    if module.in_channels // module.groups == 1:
        return "one input channel per group: skipped unless named in layers="
    return None


def eligible_convs(model: nn.Module, order: Optional[Sequence[str]] = None) -> List[str]:
    """The convolutions :func:`compress` processes by default, in forward order if ``order`` is given.

    Eligible: every ``nn.Conv2d`` with more than one input channel per group, except subclasses
    with their own ``forward`` or ``_conv_forward`` (see :func:`ineligible_reason`). A conv with one
    input channel per group (a first layer on grey-scale images, or a depthwise conv) is skipped: its
    kernel has no input-channel mode to factor, and its CP form would expand the input to ``R``
    channels at full resolution, usually costing more than the dense layer. Name it in ``layers``
    to compress it anyway. A subclass that computes something else than ``nn.Conv2d`` from its
    weight (e.g. a weight-standardised conv) is never compressed: a ``CPConv2d`` approximating its
    raw weight would change the model's function. Subclasses that keep ``nn.Conv2d``'s forward are
    eligible.
    """
    convs = [name for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and ineligible_reason(m) is None]
    if order is None:
        return convs
    rank = {name: i for i, name in enumerate(order)}
    # Convs the traced forward pass never reached go last, in registration order.
    return sorted(convs, key=lambda n: (rank.get(n, len(rank)), convs.index(n)))


def _resolve_layers(model: nn.Module, layers, order) -> List[str]:
    if layers is None:
        names = eligible_convs(model, order)
        if not names:
            skipped = [f"{n}: {ineligible_reason(m)}" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise ValueError("model has no eligible nn.Conv2d to compress"
                             + (f" ({'; '.join(skipped)})" if skipped else " (it contains no nn.Conv2d)"))
        return names
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)):
        raise TypeError(f"layers must be a list of module names, got {layers!r}")
    if not layers:
        raise ValueError("layers must name at least one nn.Conv2d (or be None for every eligible conv)")
    # Every name, shared modules under each of their names (remove_duplicate=False).
    modules = dict(model.named_modules(remove_duplicate=False))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    seen: Dict[int, str] = {}
    for name in layers:
        if not isinstance(name, str):
            raise TypeError(f"layers must hold module names (str), got {name!r}")
        if name not in modules or name == "":
            raise ValueError(f"layer {name!r} does not exist in the model; its nn.Conv2d layers are {convs}")
        module = modules[name]
        if id(module) in seen:
            first = seen[id(module)]
            raise ValueError(f"layer {name!r} is listed twice in layers" if first == name else
                             f"layers {first!r} and {name!r} are the same (shared) module; list it once: it is "
                             "replaced under every name that refers to it")
        seen[id(module)] = name
        if isinstance(module, CPConv2d):
            raise ValueError(f"layer {name!r} is already a CPConv2d (compressed)")
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, not an nn.Conv2d; "
                             f"the model's nn.Conv2d layers are {convs}")
        if _own_forward(module):
            raise ValueError(f"layer {name!r} is {ineligible_reason(module)}")
    return list(layers)


def _aliases(model: nn.Module, module: nn.Module) -> List[str]:
    """Every name under which ``module`` is reachable in ``model`` (several when it is shared)."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if m is module]


# ---------------------------------------------------------------------- costs
def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # a shared parameter counts once


def _layer_flops(module: nn.Module, input_hw: Optional[Tuple[int, int]]) -> Optional[int]:
    if input_hw is None:
        return None
    if isinstance(module, CPConv2d):
        return module.flops(input_hw)
    geometry = ConvGeometry.create(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                   module.padding, module.dilation, module.groups, module.padding_mode)
    oh, ow = geometry.output_size(input_hw)
    kh, kw = module.kernel_size
    return module.out_channels * (module.in_channels // module.groups) * kh * kw * oh * ow


def _calls_flops(module: nn.Module, calls: Optional[Sequence[Tuple[int, int]]]) -> Optional[int]:
    """Multiply-adds of all of a conv's calls in one forward pass (None when not traced)."""
    if calls is None:
        return None
    return sum(_layer_flops(module, hw) for hw in calls)


def _model_conv_flops(model: nn.Module, calls: Optional[Dict[str, List[Tuple[int, int]]]]) -> Optional[int]:
    if calls is None:
        return None
    total = 0
    for name, m in model.named_modules():  # (a shared conv once, with all its calls)
        if isinstance(m, (nn.Conv2d, CPConv2d)) and name in calls:
            total += _calls_flops(m, calls[name])
    return total


# ---------------------------------------------------------------------- settings
def _jsonable(value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _metric(value, what: str) -> float:
    """``evaluate``'s result as a float (NaN and +-inf included); ``TypeError`` for anything else."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (does it lack a `return`?)" if value is None else ""
        raise TypeError(f"evaluate(model) must return a number, got {'None' if value is None else type(value).__name__}{hint} {what}")
    return float(value)


# ---------------------------------------------------------------------- the driver
def compress(
    model: nn.Module,
    *,
    layers: Optional[Sequence[str]] = None,
    rank="evbmf",
    combine: str = "max",
    weakening: float = 1.0,
    schedule: str = "iterative",
    fine_tune: Optional[Callable[[nn.Module, int], Any]] = None,
    evaluate: Optional[Callable[[nn.Module], float]] = None,
    checkpoint_dir=None,
    resume: bool = True,
    progress: bool = True,
    input_shape: Optional[Sequence[int]] = None,
    ratio: Optional[float] = None,
    **als_options,
) -> CompressionReport:
    """Replace convolutions of ``model`` by CP layers, in place, one layer at a time.

    For each layer (in order): choose its rank, CP-decompose it (``CPConv2d.from_conv``), put the
    :class:`~cpconv.CPConv2d` in its place, call ``fine_tune(model, step)``, call ``evaluate(model)``,
    and (with ``checkpoint_dir``) write a checkpoint.

    Parameters
    ----------
    model
        A trained model. Modified in place: the processed ``nn.Conv2d`` modules are replaced. A conv
        module reachable under several names (weight tying, ``m.b = m.a``) is compressed once and the
        same ``CPConv2d`` is put under every name (the tie holds; its parameters count once). A
        layer's ``CPConv2d`` inherits the conv's ``requires_grad`` (a frozen conv stays frozen).
    layers
        Names of the ``nn.Conv2d`` modules to compress, in the order to compress them (a shared module
        under any one of its names, once). Default: every
        eligible conv (see :func:`eligible_convs`: a conv with a single input channel per group, such
        as a first layer on grey-scale images, is skipped unless named; an ``nn.Conv2d`` subclass with
        its own ``forward``/``_conv_forward``, such as a weight-standardised conv, is never compressed
        and naming it raises ``ValueError``), in *forward order* when
        ``input_shape`` is given (found with forward hooks on one pass over zeros), otherwise in module
        registration order.
    rank
        How ranks are chosen: ``"evbmf"`` (default), ``"vbmf"``, ``"energy"``, ``"ratio"`` (uses
        ``ratio``) or an int (that rank for every layer); see :func:`cpconv.select_rank`.
    combine, weakening
        How the two per-mode VBMF ranks combine into one CP rank (``"max"``, ``"min"``, ``"mean"``,
        ``"output"``, ``"input"``) and the MUSCO weakening ``w`` in [0, 1] (1 = plain EVBMF).
    schedule
        ``"iterative"`` (the method): each layer's rank is selected from its current weights, just
        before it is compressed, i.e. after the fine-tuning of the previous steps.
        ``"static"`` (the baseline): all ranks are selected from the original weights before anything
        is compressed, then the same compress/fine-tune loop runs.
        ``"uniform"``: every layer gets the same parameter reduction factor ``ratio`` (ranks from
        ``select_rank(method="ratio")``, chosen up front); for comparison at matched compression.
    fine_tune
        ``fine_tune(model, step)``, called after layer number ``step`` (0-based position in
        ``layers``) was replaced. Any training loop fits (:func:`cpconv.finetune`, your own, ...).
    evaluate
        ``evaluate(model) -> float``, called once on the dense model and after each decomposition and
        each fine-tuning; recorded in the report. It must return a real number (or a one-element
        tensor): anything else, ``None`` included (a forgotten ``return``), raises ``TypeError`` -- on
        a fresh run already at the first call, on the dense model, before any layer is replaced. NaN
        and +-inf are numbers: they are recorded as they are (e.g. a diverged fine-tuning shows up in
        the report) and :meth:`CompressionReport.save` writes them as the strings ``"NaN"``,
        ``"Infinity"``, ``"-Infinity"`` (strict JSON has no such numbers).
    checkpoint_dir
        Folder for a checkpoint written atomically after every finished layer (model state, report,
        global RNG states of torch/NumPy/random). See :mod:`cpconv.checkpoint`. Nothing else is
        saved: a ``fine_tune`` that carries its own state from one step to the next (an optimizer, a
        ``DataLoader`` with its own ``torch.Generator``) must rebuild it from ``step`` (e.g. seed a
        generator with ``step``) for a resumed run to equal an uninterrupted one.
    resume
        With ``checkpoint_dir`` holding a checkpoint of a run with the same arguments, restore it
        (the model's state, its replaced layers, the report, the RNG states) and continue after the
        last finished layer: the result equals that of an uninterrupted run. ``False`` starts afresh
        and replaces that checkpoint. The model passed in must be the same dense model as in the
        first run.
    progress
        Show a progress bar over the layers (tqdm); ``False`` for none.
    input_shape
        ``(C, H, W)`` (or ``(B, C, H, W)``) of one input. Needed for forward order and for FLOPs in
        the report; without it the report's FLOPs are ``None``.
    ratio
        Target parameter reduction factor of every layer (dense kernel parameters / CP factor
        parameters, e.g. ``4.0``): required by ``schedule="uniform"`` and ``rank="ratio"``. Each layer
        gets the largest rank that meets it; a layer where even the smallest allowed rank (1) misses
        it gets that rank and a ``RatioNotMetWarning`` (a ``UserWarning``) naming the layer, the
        requested and the achieved ratio.
    **als_options
        ``init``, ``max_iter``, ``tol``, ``seed``, ``line_search``, ``l2_reg`` go to CP-ALS (as in
        :meth:`CPConv2d.from_conv`: ``l2_reg="auto"`` by default, which replaces a degenerate plain
        CP-ALS result by a ridge-stabilised one); any other keyword (``min_rank``, ``max_rank``, ``multiple_of``,
        method options) to ``select_rank``.
        ``seed=None`` (default) draws each layer's CP-ALS seed from torch's global RNG: seed torch
        (``torch.manual_seed``) for a reproducible run; a resumed run restores that RNG's state.

    Returns
    -------
    CompressionReport
        Per layer: name, kernel shape, per-mode ranks, chosen rank, parameters and FLOPs before/after,
        CP relative error, metric after decomposition and after fine-tuning, seconds; totals.

    Notes
    -----
    Rank-0 policy: when the rank selection finds no signal above its noise estimate (EVBMF rank 0,
    typical of an untrained or noise-like kernel) the layer is **left dense**; its report row says so
    and ``fine_tune``/``evaluate`` are not called for that step.

    Raises
    ------
    ValueError
        No eligible conv; a name in ``layers`` that does not exist, is not an ``nn.Conv2d``, is an
        ``nn.Conv2d`` subclass with its own ``forward``/``_conv_forward`` or is listed twice (also
        under two names of one shared module); an unknown ``schedule``;
        ``uniform``/``ratio`` without a valid ``ratio``; rank-selection or CP-ALS options that are
        invalid for some layer (e.g. an int ``rank`` above a layer's limit: the message names the
        layer and the limit) -- all of these before the model is touched or ``evaluate`` called; a
        checkpoint from a run with other arguments or another model.
    CheckpointError
        (a ``ValueError``) a corrupt checkpoint folder; nothing in it is overwritten.
    TypeError
        Non-callable ``fine_tune``/``evaluate``, an unknown or mistyped option (before the model is
        touched); ``evaluate`` not returning a number (``None`` included), naming when: on the dense
        model (before anything is replaced) or after decomposing/fine-tuning which layer.
    Exception
        Whatever ``fine_tune`` or ``evaluate`` raises propagates; the checkpoint keeps the last
        finished layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    for fn, what in ((fine_tune, "fine_tune"), (evaluate, "evaluate")):
        if fn is not None and not callable(fn):
            raise TypeError(f"{what} must be a callable or None, got {type(fn).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, (str, numbers.Integral)):
        raise TypeError(f"rank must be a method name or an int, got {rank!r}")
    # Checked here too (select_rank checks them again) so that a typo fails before evaluate(model).
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    if isinstance(weakening, bool) or not isinstance(weakening, numbers.Real) or not 0 <= weakening <= 1:
        raise ValueError(f"weakening must be a number in [0, 1] (1 = plain EVBMF), got {weakening!r}")
    if schedule == "uniform" or rank == "ratio":
        if ratio is None:
            raise ValueError(f"schedule={schedule!r} with rank={rank!r} needs ratio= (the parameter reduction "
                             "factor every layer gets, e.g. 4.0 for 4x fewer kernel parameters)")
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"ratio must be a positive number (the parameter reduction factor), got {ratio!r}")
    elif ratio is not None:
        raise ValueError(f"ratio={ratio!r} is only used by schedule='uniform' or rank='ratio'")
    if schedule == "uniform" and rank not in ("evbmf", "ratio"):
        raise ValueError(f"schedule='uniform' sets every rank from ratio; rank={rank!r} cannot be combined with it")
    als_kwargs = {k: v for k, v in als_options.items() if k in ALS_OPTIONS}
    selection_kwargs = {k: v for k, v in als_options.items() if k not in ALS_OPTIONS}

    order, sizes = (None, None)  # sizes: each conv's input size at every call
    if input_shape is not None:
        order, sizes = _trace_conv_calls(model, input_shape)
    names = _resolve_layers(model, layers, order)
    modules = dict(model.named_modules(remove_duplicate=False))
    planned = {id(modules[n]) for n in names}
    skipped = {n: ineligible_reason(m) or "not named in layers=" for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and id(m) not in planned}
    # Everything that can fail for a layer without looking at its fine-tuned weights is checked for every
    # layer now, before the first one is touched (not after earlier layers were replaced and fine-tuned).
    check_als_options(**als_kwargs)
    for n in names:
        method, kwargs = _selection_args(rank, combine, weakening, schedule, ratio, selection_kwargs)
        try:
            check_rank_options(modules[n], method, **kwargs)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"layer {n!r}: {exc}") from None

    settings = _jsonable({
        "layers": names, "rank": rank if isinstance(rank, str) else int(rank), "combine": combine,
        "weakening": weakening, "schedule": schedule, "ratio": ratio, "input_shape": input_shape,
        "als_options": als_kwargs, "selection_options": selection_kwargs,
        "kernel_shapes": {n: list(modules[n].weight.shape) for n in names},
    })

    checkpoint = CompressionCheckpoint(checkpoint_dir) if checkpoint_dir is not None else None
    state = checkpoint.load() if (checkpoint is not None and resume) else None

    if state is not None:
        report = _restore(model, state, settings, checkpoint.directory)
        report.skipped = skipped
    else:
        report = CompressionReport(settings=dict(settings), planned_layers=list(names), skipped=skipped,
                                   model_params_before=_param_count(model),
                                   conv_flops_before=_model_conv_flops(model, sizes))
        if evaluate is not None:
            report.metric_before = _metric(evaluate(model), "on the dense model, before any layer was replaced")
        report.settings["plan"] = None
        if schedule in ("static", "uniform"):
            # Selected up front, from the original weights (and kept in the checkpoint, so a resumed
            # run does not select again from weights that were fine-tuned meanwhile).
            report.settings["plan"] = {
                n: _jsonable(_choose_rank(modules[n], n, rank, combine, weakening, schedule, ratio,
                                          selection_kwargs).to_dict())
                for n in names}

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(names), initial=len(report.layers), desc="compress", unit="layer")
    try:
        for step in range(len(report.layers), len(names)):
            name = names[step]
            if bar is not None:
                bar.set_postfix_str(name)
            record = _compress_layer(model, name, step, rank, combine, weakening, schedule, ratio,
                                     selection_kwargs, als_kwargs, report.settings["plan"],
                                     sizes, fine_tune, evaluate)
            report.layers.append(record)
            report.model_params_after = _param_count(model)
            report.conv_flops_after = _model_conv_flops(model, sizes)
            if checkpoint is not None:
                checkpoint.save(CheckpointState(
                    finished_layers=len(report.layers), settings=settings,
                    model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
                    report=report.to_dict(), rng_state=capture_rng_state()))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report.model_params_after = _param_count(model)
    report.conv_flops_after = _model_conv_flops(model, sizes)
    return report


class _PlannedSelection:
    """A rank selection restored from the report's plan (static/uniform schedules)."""

    def __init__(self, data: Dict[str, Any]) -> None:
        self.data = data
        self.rank = int(data["rank"])
        self.mode_ranks = dict(data.get("mode_ranks") or {})
        self.reason = str(data.get("reason", ""))

    def to_dict(self) -> Dict[str, Any]:
        return self.data


def _selection_args(rank, combine, weakening, schedule, ratio, selection_kwargs):
    """``(method, keyword arguments)`` of the ``select_rank`` call for every layer."""
    if schedule == "uniform" or rank == "ratio":
        return "ratio", dict(selection_kwargs, ratio=ratio)
    return (rank if isinstance(rank, str) else int(rank),
            dict(selection_kwargs, combine=combine, weakening=weakening))


def _choose_rank(conv, name, rank, combine, weakening, schedule, ratio, selection_kwargs):
    method, kwargs = _selection_args(rank, combine, weakening, schedule, ratio, selection_kwargs)
    with warnings.catch_warnings():
        # Said below with the layer's name instead.
        warnings.simplefilter("ignore", RatioNotMetWarning)
        selection = select_rank(conv, method, **kwargs)
    shortfall = ratio_shortfall(selection)
    if shortfall:
        warnings.warn(f"compress: layer {name!r}: {shortfall}", RatioNotMetWarning, stacklevel=4)
    return selection


def _compress_layer(model, name, step, rank, combine, weakening, schedule, ratio, selection_kwargs,
                    als_kwargs, plan, sizes, fine_tune, evaluate) -> LayerReport:
    start = time.perf_counter()
    conv = model.get_submodule(name)
    if plan is not None:
        selection = _PlannedSelection(plan[name])
    else:
        selection = _choose_rank(conv, name, rank, combine, weakening, schedule, ratio, selection_kwargs)
    if schedule == "uniform" or rank == "ratio":
        selected_from = "ratio"
    elif not isinstance(rank, str):
        selected_from = "fixed rank"
    else:
        selected_from = "original weights" if plan is not None else "current weights"
    calls = sizes.get(name) if sizes is not None else None
    input_hw = calls[0] if calls else None
    params_before = _param_count(conv)
    flops_before = _calls_flops(conv, calls)
    common = dict(
        name=name, kernel_shape=tuple(conv.weight.shape), groups=conv.groups, input_hw=input_hw,
        mode_ranks={k: int(v) for k, v in (selection.mode_ranks or {}).items()},
        selected_from=selected_from, selection=_jsonable(selection.to_dict()), params_before=params_before,
        flops_before=flops_before)
    if int(selection.rank) == 0:
        return LayerReport(**common, rank=0, status="dense", reason=_DENSE_REASON, params_after=params_before,
                           flops_after=flops_before, rel_error=None, metric_after_decomposition=None,
                           metric_after_finetune=None, seconds=time.perf_counter() - start)
    # from_conv keeps the conv's requires_grad: a layer the user froze stays frozen in fine-tuning.
    layer = CPConv2d.from_conv(conv, rank=int(selection.rank), **als_kwargs)
    layer.to(device=conv.weight.device)
    layer.train(conv.training)
    info = dict(layer.decomposition_info or {})
    info["rank_selection"] = selection.to_dict()
    layer.decomposition_info = info
    # A module shared under several names (weight tying) is compressed once and the one CP layer put
    # under every name, so the tie holds and its parameters count once.
    aliases = _aliases(model, conv)
    for alias in aliases:
        model.set_submodule(alias, layer)
    reason = str(selection.reason)
    if len(aliases) > 1:
        reason += f"; a shared module, replaced under all its names {aliases}"
    metric_decomp = _metric(evaluate(model), f"after decomposing layer {name!r}") if evaluate is not None else None
    metric_tuned = None
    if fine_tune is not None:
        fine_tune(model, step)
        if evaluate is not None:
            metric_tuned = _metric(evaluate(model), f"after fine-tuning layer {name!r}")
    rel_error = info.get("rel_error")
    return LayerReport(
        **common, rank=int(selection.rank), status="compressed", reason=reason,
        params_after=_param_count(layer), flops_after=_calls_flops(layer, calls),
        rel_error=None if rel_error is None else float(rel_error),
        metric_after_decomposition=metric_decomp, metric_after_finetune=metric_tuned,
        seconds=time.perf_counter() - start)


def _restore(model: nn.Module, state: CheckpointState, settings: Dict[str, Any], directory: str) -> CompressionReport:
    """Put the checkpoint's finished layers and weights into ``model``; the report so far."""
    saved = dict(state.settings)
    if json.dumps(saved, sort_keys=True) != json.dumps(settings, sort_keys=True):
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise ValueError(
            f"checkpoint folder {directory!r} belongs to a run with other arguments (differ: {diff}); pass "
            "the same arguments and the same dense model to resume, resume=False to start afresh and "
            "replace it, or another checkpoint_dir")
    try:
        report = CompressionReport.from_dict(state.report)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint folder {directory!r} is corrupt: {exc}") from None
    if len(report.layers) != state.finished_layers:
        raise CheckpointError(f"checkpoint folder {directory!r} is corrupt: the report lists "
                              f"{len(report.layers)} layers, the manifest {state.finished_layers}")
    for record in report.layers:
        if record.status != "compressed":
            continue
        conv = model.get_submodule(record.name)
        if not isinstance(conv, nn.Conv2d) or tuple(conv.weight.shape) != tuple(record.kernel_shape):
            raise ValueError(f"the model does not match checkpoint folder {directory!r}: layer {record.name!r} "
                             f"should be an nn.Conv2d with kernel {tuple(record.kernel_shape)}, got {conv!r}")
        layer = _replace_by_empty_cp(model, conv, record.rank)
        layer.decomposition_info = {"rel_error": record.rel_error, "rank_selection": record.selection}
    try:
        model.load_state_dict(state.model_state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the model does not match checkpoint folder {directory!r}: {exc}") from None
    restore_rng_state(state.rng_state)
    return report


def _replace_by_empty_cp(model: nn.Module, conv: nn.Conv2d, rank: int) -> CPConv2d:
    """Put a CPConv2d of ``conv``'s geometry and the given rank (factors to be loaded) under every name
    of ``conv`` in ``model``; it keeps the conv's device, dtype, mode and requires_grad flags."""
    layer = CPConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, rank, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)
    layer.train(conv.training)
    for factor in layer.factors:  # as from_conv: a frozen conv stays frozen
        factor.requires_grad_(conv.weight.requires_grad)
    if layer.bias is not None:
        layer.bias.requires_grad_(conv.bias.requires_grad)
    for alias in _aliases(model, conv):
        model.set_submodule(alias, layer)
    return layer


def load_compressed_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                               strict: bool = True) -> List[str]:
    """Load the ``state_dict`` of a compressed model into a freshly built *dense* model.

    For deployment code that rebuilds the original architecture (``model = MyNet()``) and has only
    the compressed model's ``state_dict()`` (not the pickled module): every ``nn.Conv2d`` of ``model``
    whose name has CP factors in ``state_dict`` (``<name>.in_factor``, ``.out_factor``,
    ``.vert_factor``, ``.horz_factor``) is replaced by a :class:`~cpconv.CPConv2d` of the same geometry
    and of the rank those factors have, then ``model.load_state_dict(state_dict, strict=strict)``
    runs. Layers that were left dense load as they are. A conv shared under several names is replaced
    under all of them. The model is modified in place.

    Parameters
    ----------
    model : nn.Module
        The architecture that was compressed, as built before compression (its convs' weights are
        overwritten). Convs that are already ``CPConv2d`` layers are left in place.
    state_dict : mapping of str to Tensor
        ``compressed_model.state_dict()``, e.g. from ``torch.load(path)`` (weights only).
    strict : bool
        Passed to ``load_state_dict``.

    Returns
    -------
    list of str
        The names of the convs replaced by CP layers (every name of a shared conv), in module order.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module`` or ``state_dict`` is not a mapping.
    ValueError
        A layer's factors are incomplete, or their shapes do not fit the conv of that name (the
        message names the layer, the expected and the found shapes), or a layer's factors were saved
        pruned: raised before the model is touched. Or ``load_state_dict`` fails (its message is
        kept): the model is restored as it was (modules and values).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of parameter names to tensors, got {type(state_dict).__name__}")
    planned = []
    for name, conv in model.named_modules():
        if isinstance(conv, CPConv2d) or not isinstance(conv, nn.Conv2d):
            continue
        prefix = f"{name}." if name else ""
        present = [f for f in _FACTOR_NAMES if prefix + f in state_dict]
        if not present:
            continue
        if len(present) != len(_FACTOR_NAMES):
            missing = [prefix + f for f in _FACTOR_NAMES if f not in present]
            pruned = [m for m in missing if m + "_orig" in state_dict]
            hint = (f" ({pruned[0]}_orig and {pruned[0]}_mask are there: the layer was pruned; apply "
                    "torch.nn.utils.prune.remove to it before saving the state_dict)") if pruned else ""
            raise ValueError(f"layer {name!r}: state_dict has CP factors {[prefix + f for f in present]} but "
                             f"not {missing}{hint}")
        if _own_forward(conv):
            raise ValueError(f"layer {name!r} has CP factors in state_dict but the model's conv is "
                             f"{ineligible_reason(conv)}")
        if not name:
            raise ValueError("model is itself an nn.Conv2d and cannot be replaced in place; build the layer with "
                             "CPConv2d(...) and call its load_state_dict")
        shapes = {f: tuple(getattr(state_dict[prefix + f], "shape", ())) for f in _FACTOR_NAMES}
        rank = shapes["in_factor"][1] if len(shapes["in_factor"]) == 2 else 0
        g = conv.groups
        kh, kw = conv.kernel_size
        expected = {"out_factor": (conv.out_channels, rank // g), "in_factor": (conv.in_channels // g, rank),
                    "vert_factor": (kh, rank), "horz_factor": (kw, rank)}
        if rank < 1 or rank % g or shapes != expected:
            raise ValueError(
                f"layer {name!r}: the CP factors in state_dict {shapes} do not fit the model's conv {conv!r} "
                f"(a rank-R layer needs {{'out_factor': (N, R/groups), 'in_factor': (C/groups, R), "
                f"'vert_factor': (kh, R), 'horz_factor': (kw, R)}}, R a positive multiple of groups={g})")
        planned.append((name, conv, rank))
    # load_state_dict copies every tensor that fits before it reports what did not: keep the current
    # values so that a failed call leaves the model exactly as it was.
    backup = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    replaced = []
    for name, conv, rank in planned:  # (named_modules lists a shared conv once)
        aliases = _aliases(model, conv)
        _replace_by_empty_cp(model, conv, rank)
        replaced += [(alias, conv) for alias in aliases]
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as exc:
        for alias, conv in replaced:  # the model's structure and values as they were
            model.set_submodule(alias, conv)
        model.load_state_dict(backup)
        raise ValueError(f"loading the compressed state_dict failed: {exc}") from None
    return [alias for alias, _ in replaced]
