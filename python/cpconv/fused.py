"""The fused CPU kernel for CP convolutions, and the torch custom op ``torch.ops.cpconv.cp_conv2d``.

The C++ kernel (``csrc/fused``) runs all four CP stages in one pass over bands of output rows, keeping
the R-channel intermediates in a per-thread buffer, on float32 NCHW tensors with zero padding. Its
weights are *packed* once per weight version; :func:`packed_weights` keeps a cache keyed on the
factor tensors' identity and version counters, so a parameter changed in place (optimizer step,
``load_state_dict``) is repacked on the next call.

The instruction set is chosen at run time from the CPU's features (``avx512``, ``avx2`` or
``generic``); :func:`best_isa` tells which, :func:`supported_isas` lists the ones this CPU can run,
and every entry point takes ``isa=`` to force one (tests run each in turn). The choice is logged once
at DEBUG level on the ``cpconv.fused`` logger.

:class:`cpconv.CPConv2d` uses the fused kernel on CPU float32 when no gradient is needed: under
graph capture (torch.compile, torch.export) through the custom op, so graphs show one op, and in
eager mode by a direct call with its own per-layer packed weights (the op dispatcher's Python cost
is skipped). Inside :func:`fused_disabled` (or with ``layer.use_fused = False``) it keeps the torch
path. The thread count is an argument everywhere (``threads``; the layer's ``fused_threads``);
``None``/0 means ``torch.get_num_threads()``.

Not thread-global: :func:`fused_disabled` is per Python thread; the packed-weights cache is shared
and safe to use from several threads.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import operator
import os
import threading
import weakref
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _core
from .reference import as_cpu_float32_array
from .conv_args import pair

__all__ = [
    "best_isa",
    "supported_isas",
    "pack_weights",
    "packed_weights",
    "clear_packed_weights_cache",
    "cp_conv2d_fused",
    "run_packed",
    "fused_stage_seconds",
    "fused_disabled",
    "fused_enabled",
]

_log = logging.getLogger("cpconv.fused")
_ISAS = ("avx512", "avx2", "generic")


def supported_isas() -> List[str]:
    """The instruction sets the fused kernel can use on this CPU, best first (always ends with ``"generic"``)."""
    return list(_core.fused.supported_isas())


def best_isa() -> str:
    """The instruction set ``isa="auto"`` selects on this CPU."""
    return _core.fused.best_isa()


_logged_isa = False


def _resolve_isa(isa: Optional[str]) -> str:
    global _logged_isa
    if isa is None or isa == "auto":  # (the kernel resolves "auto" itself)
        if not _logged_isa:
            _logged_isa = True
            _log.debug("cpconv fused kernel: using %s (supported: %s)", best_isa(), ", ".join(supported_isas()))
        return "auto"
    if not isinstance(isa, str) or isa not in _ISAS:
        raise ValueError(f"isa must be None, 'auto' or one of {_ISAS}, got {isa!r}")
    if isa not in supported_isas():
        raise ValueError(f"isa={isa!r} is not supported by this CPU; supported: {supported_isas()}")
    return isa


#: The most OpenMP threads one fused call may ask for.
MAX_THREADS = 1024


def check_threads(threads) -> int:
    """``threads`` as an int in [0, MAX_THREADS] (0: ``torch.get_num_threads()`` at call time), or
    ValueError naming the value."""
    if isinstance(threads, bool) or not hasattr(threads, "__index__") or not 0 <= operator.index(threads) <= MAX_THREADS:
        raise ValueError(f"threads must be None, 0 (= torch.get_num_threads()) or an int in [1, {MAX_THREADS}], "
                         f"got {threads!r}")
    return operator.index(threads)


def _resolve_threads(threads: Optional[int]) -> int:
    threads = 0 if threads is None else check_threads(threads)
    return threads or torch.get_num_threads()


def _check_factors(x_channels: Optional[int], U, S, Y, X, bias, groups: int) -> None:
    for name, f in zip(("out_factor", "in_factor", "vert_factor", "horz_factor"), (U, S, Y, X)):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
        if f.dim() != 2:
            raise ValueError(f"{name} must be a matrix, got shape {tuple(f.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    rank = S.shape[1]
    if rank < 1 or rank % groups:
        raise ValueError(f"the rank (columns of in_factor) must be a positive multiple of groups={groups}, got {rank}")
    if Y.shape[1] != rank or X.shape[1] != rank:
        raise ValueError(
            f"in_factor, vert_factor and horz_factor must have the same number of columns (the rank); got "
            f"{S.shape[1]}, {Y.shape[1]}, {X.shape[1]}"
        )
    if U.shape[1] * groups != rank or U.shape[0] % groups:
        raise ValueError(
            f"out_factor must have shape (N, rank/groups) = (N, {rank // groups}) with N divisible by groups={groups}, "
            f"got {tuple(U.shape)}"
        )
    if x_channels is not None and S.shape[0] * groups != x_channels:
        raise ValueError(
            f"the input has {x_channels} channels but in_factor has shape {tuple(S.shape)} with groups={groups} "
            f"(expected ({x_channels // groups if x_channels % groups == 0 else '?'}, R))"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (U.shape[0],):
            raise ValueError(f"bias must have shape ({U.shape[0]},), got {tuple(bias.shape)}")


def pack_weights(factors: Sequence[torch.Tensor], bias: Optional[torch.Tensor] = None, *, groups: int = 1):
    """Pack CP factors for the fused kernel (no caching; see :func:`packed_weights`).

    Parameters
    ----------
    factors
        ``(U, S, Y, X)``: U (N x R/G), S (C/G x R), Y (kh x R), X (kw x R), float32 CPU tensors.
    bias
        Optional (N,) float32 bias.
    groups
        Number of groups G.

    Returns
    -------
    cpconv._core.fused.PackedWeights
        An opaque object for :func:`cp_conv2d_fused` (``packed=``); ``.nbytes`` is its size.

    Raises
    ------
    TypeError
        A factor that is not a float32 tensor.
    ValueError
        Inconsistent shapes, a tensor not on the CPU.
    """
    if not isinstance(factors, (list, tuple)) or len(factors) != 4:
        raise ValueError("factors must be a sequence (U, S, Y, X) of 4 matrices")
    U, S, Y, X = factors
    _check_factors(None, U, S, Y, X, bias, groups)
    arrays = [as_cpu_float32_array(n, t) for n, t in zip(("in_factor", "vert_factor", "horz_factor", "out_factor"), (S, Y, X, U))]
    return _core.fused.pack(*arrays, None if bias is None else as_cpu_float32_array("bias", bias), groups)


class _PackedWeightsCache:
    """Packed weights keyed on the factor tensors' identity, checked against their ``_version`` and storage pointer.

    An entry goes when any of its tensors is freed (a weakref callback), so packed weights never
    outlive their factors; at most ``max_entries`` live ones are kept (least recently made dropped).
    """

    def __init__(self, max_entries: int = 256) -> None:
        self._entries: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._max_entries = max_entries

    @staticmethod
    def _state(tensors) -> Optional[tuple]:
        # In-place changes bump _version; a swapped .data changes the storage pointer.
        try:
            return tuple(None if t is None else (t._version, t.data_ptr()) for t in tensors)
        except RuntimeError:  # inference tensors have no version counter: never cached
            return None

    def get(self, tensors: tuple, groups: int):
        key = tuple(map(id, tensors)) + (groups,)
        state = self._state(tensors)
        if state is not None:
            entry = self._entries.get(key)  # a dict read is atomic under the GIL
            if entry is not None:
                refs, old_state, packed, _ = entry
                if old_state == state and all(
                    (r is None and t is None) or (r is not None and r() is t) for r, t in zip(refs, tensors)
                ):
                    return packed
        U, S, Y, X, bias = tensors
        packed = pack_weights((U, S, Y, X), bias, groups=groups)
        if state is not None:
            entries = self._entries

            def forget(_ref, key=key):
                # Runs wherever the tensor is freed, possibly with the lock held in this thread: no
                # lock, a single pop (atomic under the GIL). A newer entry under a reused id only
                # costs a repack.
                entries.pop(key, None)

            refs = tuple(None if t is None else weakref.ref(t, forget) for t in tensors)
            # Aliases of the packed storages: while the entry lives their addresses cannot be reused,
            # so a swapped .data always shows as a new data_ptr (not the old one come back).
            storages = tuple(None if t is None else t.detach() for t in tensors)
            with self._lock:
                self._entries[key] = (refs, state, packed, storages)
                self._entries.move_to_end(key)
                while len(self._entries) > self._max_entries:
                    self._entries.popitem(last=False)
        return packed

    def discard(self, tensors: tuple) -> None:
        """Drop the entries made for these exact tensors (U, S, Y, X, bias), for any groups."""
        if not self._entries:
            return
        ids = tuple(map(id, tensors))
        with self._lock:
            for key in list(self._entries):  # (a snapshot: entries may go while this runs)
                if key[:5] == ids:
                    self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_PACKED_CACHE = _PackedWeightsCache()


def packed_weights(factors: Sequence[torch.Tensor], bias: Optional[torch.Tensor] = None, *, groups: int = 1):
    """Like :func:`pack_weights`, but cached per weight version.

    The cache is keyed on the tensors' identity and checked against their version counters, storage
    pointers and shapes, so in-place changes (``load_state_dict``) or a swapped ``.data`` cause a
    repack; every ``torch.optim`` optimizer step empties it (see :func:`clear_packed_weights_cache`).
    Inference-mode tensors (no version counter) are packed on every call.
    """
    U, S, Y, X = factors
    return _PACKED_CACHE.get((U, S, Y, X, bias), groups)


# Bumped by clear_packed_weights_cache (and so after every optimizer step): CPConv2d layers compare it
# with the generation their own packed weights were made in.
_generation = 0


def clear_packed_weights_cache() -> None:
    """Drop every packed-weights object: the cache's, and every :class:`cpconv.CPConv2d`'s own (each
    repacks on its next fused call).

    Runs by itself after every ``torch.optim`` optimizer step (a global step hook: the optimizers
    with ``fused=True`` update parameters without bumping their version counters). Call it yourself
    only after changing a factor in a way torch does not record: in place through ``.data`` (e.g.
    ``layer.out_factor.data.mul_(2)``) or with an update outside ``torch.optim``'s optimizers that
    bypasses version counters. In-place ops, ``load_state_dict``, ``train()``/``eval()`` and
    swapped parameters are seen without it.
    """
    global _generation
    with _PACKED_CACHE._lock:
        _generation += 1
    _PACKED_CACHE.clear()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    # Any step may have changed any layer's factors, possibly without a version bump (fused=True).
    clear_packed_weights_cache()


register_optimizer_step_post_hook(_after_optimizer_step)


def _after_fork_in_child() -> None:
    # GNU OpenMP cannot start a multi-threaded region in a child forked after the parent ran one: the
    # kernel itself then runs single-threaded (in C++), and PyTorch's own ops would hang (the fused path
    # calls some, e.g. F.pad for non-zero padding modes). Once this process's kernel has run with several
    # threads, a forked child therefore runs PyTorch on one thread, as DataLoader workers do.
    if _core.fused.ran_multithreaded():
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_after_fork_in_child)


def _output_hw(h: int, w: int, kh: int, kw: int, stride, padding, dilation) -> Tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"the input {h}x{w} with padding {tuple(padding)} is smaller than the dilated kernel "
            f"{(kh - 1) * dilation[0] + 1}x{(kw - 1) * dilation[1] + 1}"
        )
    return oh, ow


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor, got shape {tuple(x.shape)}")


def _run(x, U, S, Y, X, bias, stride, padding, dilation, groups, threads, isa, packed, profile=False):
    _check_input(x)
    if packed is None:
        # Factors are validated when (re)packed; a cache hit means they were valid and unchanged.
        packed = packed_weights((U, S, Y, X), bias, groups=groups)
    return run_packed(x, packed, stride=stride, padding=padding, dilation=dilation, threads=threads, isa=isa,
                      profile=profile)


def run_packed(x: torch.Tensor, packed, *, stride=1, padding=0, dilation=1, threads: Optional[int] = None,
               isa: Optional[str] = None, profile: bool = False):
    """The fused kernel on packed weights (from :func:`pack_weights` / :func:`packed_weights`).

    The thinnest entry point: checks ``x`` against ``packed`` and calls the kernel. Arguments and
    errors as for :func:`cp_conv2d_fused`; with ``profile=True`` returns ``(y, stage_seconds)``.
    """
    _check_input(x)
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32 for the fused kernel, got {x.dtype}")
    if not x.is_cpu:
        raise ValueError(f"x must be on the CPU for the fused kernel, got device {x.device}")
    b, c, h, w = x.shape
    if c != packed.in_channels:
        raise ValueError(
            f"x has {c} channels but the factors expect {packed.in_channels} (in_factor rows x groups)"
        )
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    isa = _resolve_isa(isa)
    if threads is None or threads == 0:
        threads = torch.get_num_threads()
    else:
        threads = _resolve_threads(threads)
    oh, ow = _output_hw(h, w, packed.kernel_h, packed.kernel_w, stride, padding, dilation)
    y = torch.empty((b, packed.out_channels, oh, ow), dtype=torch.float32)
    # channels_last (or any strided) input: the kernel reads NCHW, so convert.
    seconds = _core.fused.cp_conv2d(x.detach().contiguous().numpy(), packed, y.numpy(), stride, padding, dilation,
                                    threads, isa, profile)
    return (y, seconds) if profile else y


def cp_conv2d_fused(
    x: torch.Tensor,
    factors: Sequence[torch.Tensor],
    bias: Optional[torch.Tensor] = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    threads: Optional[int] = None,
    isa: Optional[str] = None,
    packed=None,
) -> torch.Tensor:
    """CP convolution forward by the fused kernel (float32, CPU, symmetric zero padding, no autograd).

    Parameters
    ----------
    x
        (B, C, H, W) float32 CPU input, any memory format (channels_last is converted).
    factors
        ``(U, S, Y, X)`` with the layouts of :class:`cpconv.CPConv2d`: U (N x R/G), S (C/G x R),
        Y (kh x R), X (kw x R).
    bias
        Optional (N,) bias.
    stride, padding, dilation
        Ints or pairs; ``padding`` is symmetric zero padding per axis.
    groups
        Number of groups G.
    threads
        OpenMP threads for this call; ``None`` or 0 means ``torch.get_num_threads()``.
    isa
        ``None``/``"auto"`` (best for this CPU), or ``"avx512"``, ``"avx2"``, ``"generic"`` to force one.
    packed
        Optional result of :func:`pack_weights` for these factors (else the per-version cache is used).

    Returns
    -------
    torch.Tensor
        (B, N, H', W') float32, contiguous NCHW.

    Raises
    ------
    TypeError
        A tensor that is not float32.
    ValueError
        Inconsistent shapes, an input smaller than the dilated kernel, a non-CPU tensor, an unknown or
        unsupported ``isa``, bad ``threads``.
    """
    if not isinstance(factors, (list, tuple)) or len(factors) != 4:
        raise ValueError("factors must be a sequence (U, S, Y, X) of 4 matrices")
    U, S, Y, X = factors
    return _run(x, U, S, Y, X, bias, stride, padding, dilation, groups, threads, isa, packed)


def fused_stage_seconds(x, factors, bias=None, *, stride=1, padding=0, dilation=1, groups=1, threads=None, isa=None):
    """Run the fused kernel with its debug timers on and return ``(y, seconds)``.

    ``seconds`` is a tuple of 3 floats: the thread CPU time spent in stage 1, in stages 2 and 3
    (run plane by plane, so timed together) and in stage 4, summed over threads; measured inside the
    kernel around each stage of each band. For profiling, not for production.
    """
    U, S, Y, X = factors
    return _run(x, U, S, Y, X, bias, stride, padding, dilation, groups, threads, isa, None, profile=True)


# ---------------------------------------------------------------------------------------- custom op
@torch.library.custom_op("cpconv::cp_conv2d", mutates_args=())
def _cp_conv2d_op(
    x: torch.Tensor,
    in_factor: torch.Tensor,
    vert_factor: torch.Tensor,
    horz_factor: torch.Tensor,
    out_factor: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    threads: int = 0,
    isa: str = "auto",
) -> torch.Tensor:
    """``torch.ops.cpconv.cp_conv2d``: the fused CP convolution (see :func:`cp_conv2d_fused`).

    Factor layouts as in :class:`cpconv.CPConv2d`; ``threads=0`` means ``torch.get_num_threads()``.
    """
    return _run(x, out_factor, in_factor, vert_factor, horz_factor, bias, tuple(stride), tuple(padding),
                tuple(dilation), groups, threads, isa, None)


@_cp_conv2d_op.register_fake
def _cp_conv2d_fake(x, in_factor, vert_factor, horz_factor, out_factor, bias, stride, padding, dilation, groups,
                    threads=0, isa="auto"):
    _check_input(x)
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32 for the fused kernel, got {x.dtype}")
    _check_factors(x.shape[1], out_factor, in_factor, vert_factor, horz_factor, bias, groups)
    oh, ow = _output_hw(x.shape[2], x.shape[3], vert_factor.shape[0], horz_factor.shape[0],
                        tuple(stride), tuple(padding), tuple(dilation))
    return x.new_empty((x.shape[0], out_factor.shape[0], oh, ow))  # contiguous NCHW, like the kernel


# ------------------------------------------------------------------------------------ on/off switch
_switch = threading.local()


def fused_enabled() -> bool:
    """Whether :class:`cpconv.CPConv2d` may use the fused kernel in this thread (see :func:`fused_disabled`)."""
    return getattr(_switch, "enabled", True)


@contextlib.contextmanager
def fused_disabled() -> Iterator[None]:
    """Within this context (in the current thread) :class:`cpconv.CPConv2d` always runs the torch stages."""
    previous = fused_enabled()
    _switch.enabled = False
    try:
        yield
    finally:
        _switch.enabled = previous
