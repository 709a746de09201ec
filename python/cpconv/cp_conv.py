"""``CPConv2d``: a drop-in replacement for ``nn.Conv2d`` holding a rank-R CP decomposition of its kernel.

The kernel K (N x C/G x kh x kw) is represented as

    K[n, c, i, j] = sum_r U[n, r] * S[c, r] * Y[i, r] * X[j, r]

and applied as four cheap stages (Lebedev et al. 2015):

1. grouped 1x1 conv C -> R with S (no bias)
2. depthwise kh x 1 conv with Y, carrying the vertical stride, padding and dilation
3. depthwise 1 x kw conv with X, carrying the horizontal stride, padding and dilation
4. grouped 1x1 conv R -> N with U, plus the bias

Factor layouts (``r`` is the global rank index; with ``groups = G`` rank ``r`` belongs to group
``r // (R/G)``):

- ``out_factor``  U: N x R/G     (row n uses the ranks of n's group)
- ``in_factor``   S: C/G x R
- ``vert_factor`` Y: kh x R
- ``horz_factor`` X: kw x R

For ``groups == 1`` these are exactly the mode-0..3 factor matrices of a CP decomposition of K.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.fx
import torch.nn.functional as F
from torch import nn

from .conv_args import ConvGeometry, IntOrPair, pair
from . import _core, fused

__all__ = ["CPConv2d"]

_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}
_FACTOR_NAMES = ("out_factor", "in_factor", "vert_factor", "horz_factor")
# torch.autograd.forward_ad keeps the innermost dual level in a module global (-1: none).
_HAS_FORWARD_AD_LEVEL = hasattr(_forward_ad, "_current_level")
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _forward_ad_active() -> bool:
    """Whether a forward-mode AD dual level is open (tangents must flow: the fused kernel drops them)."""
    return _HAS_FORWARD_AD_LEVEL and _forward_ad._current_level >= 0


def _check_rank(rank, groups: int) -> int:
    if isinstance(rank, bool):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if not isinstance(rank, int):
        try:
            rank = operator.index(rank)
        except TypeError:
            raise TypeError(f"rank must be an int, got {rank!r}") from None
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank % groups:
        raise ValueError(f"rank={rank} must be divisible by groups={groups} (the rank is split evenly over the groups)")
    return int(rank)


def _parameter_state(U, S, Y, X, bias) -> tuple:
    """What identifies the factors' current values for the packed-weights check: the generation of
    :func:`cpconv.fused.clear_packed_weights_cache`, versions (bumped by in-place changes) and
    storage pointers (a swapped ``.data``). Raises RuntimeError for inference-mode tensors."""
    return (fused._generation, U._version, S._version, Y._version, X._version, U.data_ptr(), S.data_ptr(),
            Y.data_ptr(), X.data_ptr(), None if bias is None else (bias._version, bias.data_ptr()))


def _four_stages(x: torch.Tensor, S: torch.Tensor, Y: torch.Tensor, X: torch.Tensor, U: torch.Tensor,
                 bias: Optional[torch.Tensor], groups: int, r: int, kh: int, kw: int, sh: int, sw: int, dh: int,
                 dw: int, ph: int, pw: int) -> torch.Tensor:
    """The four CP stages with torch's convolutions on a batched, already pre-padded input (autograd, any
    device and dtype; TorchScript-compatible: ``torch.jit.script`` compiles it too). The sizes come as
    ints so that tracers (jit.trace, fx, ONNX export) record constants, not size queries."""
    x = F.conv2d(x, S.t().reshape(r, -1, 1, 1), groups=groups)
    x = F.conv2d(x, Y.t().reshape(r, 1, kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=r)
    x = F.conv2d(x, X.t().reshape(r, 1, 1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=r)
    return F.conv2d(x, U.reshape(-1, r // groups, 1, 1), bias, groups=groups)


class CPConv2d(nn.Module):
    """A 2-D convolution whose kernel is a rank-``rank`` CP decomposition, run as four stages.

    The constructor mirrors :class:`torch.nn.Conv2d` (every form of ``kernel_size``, ``stride``,
    ``padding`` — including ``"same"`` and ``"valid"`` —, ``dilation``, ``groups``, ``bias`` and
    ``padding_mode``), plus ``rank``: the total CP rank, split evenly over the groups.

    The output always equals ``F.conv2d`` (with the same geometry and padding mode) applied with the
    reconstructed dense kernel :meth:`dense_weight`, up to floating-point rounding.

    Raises
    ------
    ValueError
        ``rank < 1``, ``rank`` not divisible by ``groups``, a non-positive size, channels not
        divisible by ``groups``, an unknown padding or padding mode.
    TypeError
        Arguments of the wrong type.
    """

    #: Use the fused CPU kernel when applicable (see :meth:`forward`); set False to force the torch path.
    use_fused: bool = True
    # The validated fused_threads (see the property); read directly on the fast path.
    _fused_threads: int = 0
    # The eager fused path's packed weights: (the parameters (U, S, Y, X, bias), their state, packed
    # weights, (pad_h, pad_w) or None when the input is pre-padded, stride, dilation, aliases of the
    # packed storages). An instance
    # attribute once set (never pickled or copied deeply: see __getstate__); checked against the
    # parameters' identity, versions and pointers on every call, dropped by a training forward,
    # train()/eval() and geometry changes (see _drop_packed_weights).
    _fused_plan = None  # (no annotation: torch.jit.script would try to read it as a TorchScript type)
    # torch.jit.script compiles forward's scripted branch only (_forward_scripted, over the attributes
    # __prepare_scriptable__ sets); these Python properties are not part of it.
    __jit_unused_properties__ = ["stride", "padding", "dilation", "padding_mode", "fused_threads", "factors"]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        rank: int,
        stride: IntOrPair = 1,
        padding: Union[str, IntOrPair] = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        geometry = ConvGeometry.create(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode
        )
        self.rank = _check_rank(rank, geometry.groups)
        self.in_channels = geometry.in_channels
        self.out_channels = geometry.out_channels
        self.kernel_size = geometry.kernel_size
        self.groups = geometry.groups
        self._geometry = geometry  # stride, padding, dilation, padding_mode: properties over it
        # Filled by ``from_conv`` (rank selection details, CP error); ``None`` for a layer built by hand.
        # (an Optional[dict]; not annotated here, which torch.jit.script would warn about)
        self.decomposition_info = None

        kw = dict(device=device, dtype=dtype)
        g, r = self.groups, self.rank
        kh, kwid = self.kernel_size
        self.out_factor = nn.Parameter(torch.empty(out_channels, r // g, **kw))
        self.in_factor = nn.Parameter(torch.empty(in_channels // g, r, **kw))
        self.vert_factor = nn.Parameter(torch.empty(kh, r, **kw))
        self.horz_factor = nn.Parameter(torch.empty(kwid, r, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    # ------------------------------------------------------------------ geometry
    # stride, padding, dilation and padding_mode can be changed after construction, as on nn.Conv2d;
    # a new value is validated (same errors as the constructor) and takes effect on the next call.
    def _set_geometry(self, **change) -> None:
        g = self._geometry
        args = dict(stride=g.stride, padding=g.padding, dilation=g.dilation, padding_mode=g.padding_mode)
        args.update(change)
        self._geometry = ConvGeometry.create(self.in_channels, self.out_channels, self.kernel_size,
                                             groups=self.groups, **args)
        self._drop_packed_weights()

    @property
    def stride(self) -> Tuple[int, int]:
        return self._geometry.stride

    @stride.setter
    def stride(self, value: IntOrPair) -> None:
        self._set_geometry(stride=value)

    @property
    def padding(self) -> Union[str, Tuple[int, int]]:
        return self._geometry.padding

    @padding.setter
    def padding(self, value: Union[str, IntOrPair]) -> None:
        self._set_geometry(padding=value)

    @property
    def dilation(self) -> Tuple[int, int]:
        return self._geometry.dilation

    @dilation.setter
    def dilation(self, value: IntOrPair) -> None:
        self._set_geometry(dilation=value)

    @property
    def padding_mode(self) -> str:
        return self._geometry.padding_mode

    @padding_mode.setter
    def padding_mode(self, value: str) -> None:
        self._set_geometry(padding_mode=value)

    @property
    def fused_threads(self) -> int:
        """Threads for the fused kernel: an int in [0, ``cpconv.fused.MAX_THREADS``]; 0 (the default)
        means ``torch.get_num_threads()`` at call time."""
        return self._fused_threads

    @fused_threads.setter
    def fused_threads(self, value: int) -> None:
        self.__dict__["_fused_threads"] = fused.check_threads(value)

    # ------------------------------------------------------------------ construction
    def reset_parameters(self) -> None:
        """Random factors whose reconstructed kernel has the variance of ``nn.Conv2d``'s default init."""
        fan_in = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        # nn.Conv2d draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)): variance 1/(3 fan_in). A sum of R/G products
        # of four independent zero-mean factors has variance (R/G) * prod(var_f): split it evenly.
        target_var = 1.0 / (3.0 * fan_in)
        factor_std = (target_var / (self.rank // self.groups)) ** 0.125
        with torch.no_grad():
            for p in (self.out_factor, self.in_factor, self.vert_factor, self.horz_factor):
                p.normal_(0.0, factor_std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(fan_in)
                self.bias.uniform_(-bound, bound)

    @classmethod
    def from_factors(
        cls,
        factors: Sequence[torch.Tensor],
        bias: Optional[torch.Tensor] = None,
        *,
        weights: Optional[torch.Tensor] = None,
        stride: IntOrPair = 1,
        padding: Union[str, IntOrPair] = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> "CPConv2d":
        """Build a layer from given CP factors ``(U, S, Y, X)`` in the kernel's mode order.

        Parameters
        ----------
        factors
            ``U`` (N x R/G), ``S`` (C/G x R), ``Y`` (kh x R), ``X`` (kw x R); tensors or arrays.
        bias
            Optional (N,) bias.
        weights
            Optional CP weights (R,) (the lambda of a normalised decomposition), folded into ``U``.
        stride, padding, dilation, groups, padding_mode
            As for :class:`torch.nn.Conv2d`.
        """
        if not isinstance(factors, (list, tuple)) or len(factors) != 4:
            raise ValueError(f"factors must be a sequence (U, S, Y, X) of 4 matrices, got {type(factors).__name__}"
                             + (f" of length {len(factors)}" if hasattr(factors, "__len__") else ""))
        U, S, Y, X = (torch.as_tensor(f) for f in factors)
        for name, f in zip("USYX", (U, S, Y, X)):
            if f.dim() != 2:
                raise ValueError(f"factor {name} must be a matrix, got shape {tuple(f.shape)}")
            if not f.is_floating_point():
                raise TypeError(f"factor {name} must be floating point, got {f.dtype}")
        if isinstance(groups, bool) or not hasattr(groups, "__index__") or operator.index(groups) < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        groups = operator.index(groups)
        rank = S.shape[1]
        if Y.shape[1] != rank or X.shape[1] != rank:
            raise ValueError(
                f"S, Y and X must have the same number of columns (the rank); got {S.shape[1]}, {Y.shape[1]}, {X.shape[1]}"
            )
        if rank % groups or U.shape[1] * groups != rank:
            raise ValueError(
                f"U must have rank/groups = {rank}/{groups} columns, got shape {tuple(U.shape)}"
            )
        layer = cls(
            S.shape[0] * groups, U.shape[0], (Y.shape[0], X.shape[0]), rank,
            stride=stride, padding=padding, dilation=dilation, groups=groups,
            bias=bias is not None, padding_mode=padding_mode, device=S.device, dtype=S.dtype,
        )
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=U.dtype, device=U.device)
            if weights.shape != (rank,):
                raise ValueError(f"weights must have shape ({rank},), got {tuple(weights.shape)}")
            U = U * weights.reshape(groups, rank // groups)[torch.arange(U.shape[0]) // (U.shape[0] // groups)]
        with torch.no_grad():
            layer.out_factor.copy_(U)
            layer.in_factor.copy_(S)
            layer.vert_factor.copy_(Y)
            layer.horz_factor.copy_(X)
            if bias is not None:
                bias = torch.as_tensor(bias)
                if bias.shape != (U.shape[0],):
                    raise ValueError(f"bias must have shape ({U.shape[0]},), got {tuple(bias.shape)}")
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_conv(cls, conv: nn.Module, rank="evbmf", **options) -> "CPConv2d":
        """Decompose a trained ``nn.Conv2d`` (rank from :func:`cpconv.select_rank`, factors by CP-ALS,
        a 1x1 kernel by truncated SVD); see :func:`cpconv.decompose.decompose_conv` for the options,
        ``decomposition_info`` and what raises (e.g. ``ValueError`` when the selected rank is 0)."""
        from .decompose import decompose_conv  # decompose imports this module

        return decompose_conv(conv, rank, **options)

    # ------------------------------------------------------------------ dense view
    @property
    def factors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The factors ``(U, S, Y, X)`` in the kernel's mode order (see the module docstring)."""
        return self.out_factor, self.in_factor, self.vert_factor, self.horz_factor

    def dense_weight(self) -> torch.Tensor:
        """The reconstructed kernel, shape (N, C/G, kh, kw), differentiable in the factors."""
        g, rg = self.groups, self.rank // self.groups
        n_g = self.out_channels // g
        c_g = self.in_channels // g
        kh, kw = self.kernel_size
        U = self.out_factor.reshape(g, n_g, rg)
        S = self.in_factor.reshape(c_g, g, rg)
        Y = self.vert_factor.reshape(kh, g, rg)
        X = self.horz_factor.reshape(kw, g, rg)
        return torch.einsum("gnr,cgr,igr,jgr->gncij", U, S, Y, X).reshape(self.out_channels, c_g, kh, kw)

    def to_conv(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with the same geometry whose kernel is :meth:`dense_weight`."""
        p = self.out_factor
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, bias=self.bias is not None,
            device=p.device, dtype=p.dtype, **self._geometry.conv_kwargs(),
        )
        with torch.no_grad():
            conv.weight.copy_(self.dense_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def fold_batchnorm(self, bn: nn.Module) -> "CPConv2d":
        """A new CPConv2d computing ``bn(self(x))`` for an ``nn.BatchNorm2d`` in eval mode (its running
        statistics folded into the output factor and the bias), as ``fuse_conv_bn_eval`` does for an
        ``nn.Conv2d``. The layer keeps its rank and geometry and always has a bias; ``self`` and ``bn``
        are left unchanged. With ``torch.ao.quantization.fuse_modules(model, [["conv", "bn"]],
        fuse_custom_config_dict={"additional_fuser_method_mapping": {(CPConv2d, nn.BatchNorm2d):
        lambda is_qat, conv, bn: conv.fold_batchnorm(bn)}})`` whole models are folded by name.

        Raises
        ------
        TypeError
            ``bn`` is not an ``nn.BatchNorm2d`` or ``nn.SyncBatchNorm``.
        ValueError
            ``bn`` is in training mode (it would normalise with batch statistics), keeps no running
            statistics, or has a number of features other than ``out_channels``.
        """
        if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            raise TypeError(f"bn must be an nn.BatchNorm2d (or an nn.SyncBatchNorm), got {type(bn).__name__}")
        if bn.training:
            raise ValueError("bn is in training mode (it normalises with batch statistics); fold it in eval mode "
                             "(model.eval())")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("bn keeps no running statistics (track_running_stats=False): there is nothing to fold")
        if bn.num_features != self.out_channels:
            raise ValueError(f"bn has {bn.num_features} features but the layer has {self.out_channels} output channels")
        U = self.out_factor
        with torch.no_grad():
            var, mean = bn.running_var.to(torch.float64), bn.running_mean.to(torch.float64)
            scale = torch.rsqrt(var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.to(torch.float64)
            shift = -mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias.to(torch.float64)
            bias = shift if self.bias is None else shift + self.bias.to(torch.float64) * scale
            factors = [(U.to(torch.float64) * scale[:, None]).to(U.dtype), self.in_factor.detach(),
                       self.vert_factor.detach(), self.horz_factor.detach()]  # (from_factors copies)
        g = self._geometry
        layer = CPConv2d.from_factors(factors, bias.to(U.dtype), stride=g.stride, padding=g.padding,
                                      dilation=g.dilation, groups=self.groups, padding_mode=g.padding_mode)
        layer.train(self.training)
        layer.use_fused, layer.fused_threads = self.use_fused, self._fused_threads
        layer.decomposition_info = None if self.decomposition_info is None else dict(self.decomposition_info)
        for new, old in zip(layer.factors, self.factors):
            new.requires_grad_(old.requires_grad)
        layer.bias.requires_grad_(U.requires_grad if self.bias is None else self.bias.requires_grad)
        return layer

    # ------------------------------------------------------------------ costs
    def output_size(self, input_hw: IntOrPair) -> Tuple[int, int]:
        """Output (H', W') for an input of spatial size ``input_hw``."""
        return self._geometry.output_size(pair(input_hw, "input_hw", 1))

    def flops(self, input_hw: IntOrPair) -> int:
        """Multiply-adds of the four stages for one image of spatial size ``input_hw`` (H, W)."""
        h, w = pair(input_hw, "input_hw", 1)
        oh, ow = self.output_size((h, w))
        r, g = self.rank, self.groups
        kh, kw = self.kernel_size
        return (r * (self.in_channels // g) * h * w + r * kh * oh * w + r * kw * oh * ow
                + (self.out_channels // g) * r * oh * ow)

    def dense_flops(self, input_hw: IntOrPair) -> int:
        """Multiply-adds of the equivalent dense convolution for one image of spatial size ``input_hw``."""
        oh, ow = self.output_size(input_hw)
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.groups) * kh * kw * oh * ow

    def parameter_count(self) -> int:
        """Number of parameters (four factors and the bias)."""
        return sum(p.numel() for p in self.parameters())

    def dense_parameter_count(self) -> int:
        """Number of parameters of the equivalent ``nn.Conv2d`` (kernel and bias)."""
        kh, kw = self.kernel_size
        n_bias = self.out_channels if self.bias is not None else 0
        return self.out_channels * (self.in_channels // self.groups) * kh * kw + n_bias

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CPConv2d expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4):
            raise ValueError(
                f"CPConv2d expects a 4-D (N, C, H, W) or 3-D (C, H, W) input, got shape {tuple(x.shape)}"
            )
        channels = x.shape[-3]
        if channels != self.in_channels:
            raise ValueError(
                f"CPConv2d expects {self.in_channels} input channels, got input of shape {tuple(x.shape)}"
            )
        if not x.is_floating_point() and not x.is_complex():
            raise TypeError(f"CPConv2d expects a floating-point input, got {x.dtype}")
        if not torch.compiler.is_compiling():  # (would specialise symbolic sizes under torch.compile)
            self._geometry.output_size(tuple(x.shape[-2:]))  # raises when the kernel does not fit

    def _stage_padding(self) -> Tuple[Optional[Tuple[int, int, int, int]], Tuple[int, int]]:
        """(explicit pre-padding for F.pad or None, symmetric zero padding for the depthwise stages)."""
        top, bottom, left, right = self._geometry.explicit_padding()
        if self.padding_mode == "zeros" and top == bottom and left == right:
            return None, (top, left)
        return (left, right, top, bottom), (0, 0)

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """The four stages with torch's own convolutions (autograd, any device and dtype)."""
        pre_pad, (ph, pw) = self._stage_padding()
        if pre_pad is not None:
            x = F.pad(x, pre_pad, mode=_PAD_MODE[self.padding_mode])
        (sh, sw), (dh, dw) = self.stride, self.dilation
        return _four_stages(x, self.in_factor, self.vert_factor, self.horz_factor, self.out_factor, self.bias,
                            self.groups, self.rank, *self.kernel_size, sh, sw, dh, dw, ph, pw)

    def _fused_applicable(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward` runs the fused CPU kernel: CPU float32 and no gradient needed."""
        if not (self.use_fused and fused.fused_enabled()):
            return False
        # TorchScript tracing and ONNX export need ops they know: keep the torch stages for them. An
        # exported program must stay differentiable when captured with grad mode on (the custom op
        # has no autograd formula; torch.compile instead guards on requires_grad and recompiles).
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or (_is_exporting() and torch.is_grad_enabled()):
            return False
        if x.dtype != torch.float32 or not x.is_cpu or x.shape[0] == 0:  # an empty batch: torch's path
            return False
        # CPU autocast (torch's convs then run in its dtype), forward-mode AD (tangents) and functorch
        # transforms (vmap, grad, ...: wrapped tensors) need torch's ops.
        if (torch.is_autocast_enabled("cpu") or _forward_ad_active()
                or torch._C._are_functorch_transforms_active()):
            return False
        need_grad = torch.is_grad_enabled() and x.requires_grad
        for name in _FACTOR_NAMES + ("bias",):
            p = getattr(self, name)  # parametrized or pruned factors are computed tensors
            if p is None:
                continue
            if p.dtype != torch.float32 or not p.is_cpu:
                return False
            need_grad = need_grad or (p.requires_grad and torch.is_grad_enabled())
        return not need_grad

    def _drop_packed_weights(self) -> None:
        """Forget this layer's packed weights (its own and the shared cache's): the next fused call repacks.

        Called by ``train()`` / ``eval()`` and when the geometry changes. (Optimizer steps empty every
        layer's packed weights: :func:`cpconv.fused.clear_packed_weights_cache`.)
        """
        self.__dict__["_fused_plan"] = None
        params = self._parameters
        fused._PACKED_CACHE.discard(tuple(params.get(name) for name in _FACTOR_NAMES + ("bias",)))

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The fused kernel; other padding modes and asymmetric padding are applied first by F.pad.

        Under graph capture (torch.compile, torch.export) it is the custom op
        ``torch.ops.cpconv.cp_conv2d``, so graphs show one op; in eager mode the same kernel is
        called directly, which skips the op dispatcher's per-call cost.
        """
        pre_pad, (ph, pw) = self._stage_padding()
        if pre_pad is not None:
            x = F.pad(x, pre_pad, mode=_PAD_MODE[self.padding_mode])
        U, S, Y, X, bias = (getattr(self, name) for name in _FACTOR_NAMES + ("bias",))
        if type(x) is not torch.Tensor or torch.compiler.is_compiling():
            return torch.ops.cpconv.cp_conv2d(
                x, S, Y, X, U, bias, list(self.stride), [ph, pw], list(self.dilation), self.groups,
                self._fused_threads, "auto",
            )
        # Eager: packed weights cached per layer and weight version (in-place updates bump _version,
        # a swapped .data changes the pointer), for factors that are this layer's own parameters
        # (parametrized or pruned ones are recomputed every call, so they are packed every call).
        params = self._parameters
        tensors = (U, S, Y, X, bias)
        state = None
        if all(params.get(name) is t for name, t in zip(_FACTOR_NAMES + ("bias",), tensors)):
            try:
                state = _parameter_state(U, S, Y, X, bias)
            except RuntimeError:  # inference-mode parameters have no version counter: pack every call
                state = None
        plan = self._fused_plan
        if plan is None or state is None or plan[1] != state:
            # plan[6]: aliases of the packed storages, so their addresses are not reused while the
            # plan lives (a .data swapped twice cannot bring the packed data_ptr back).
            plan = (tensors, state, fused.pack_weights((U, S, Y, X), bias, groups=self.groups),
                    (ph, pw) if pre_pad is None else None, self.stride, self.dilation,
                    tuple(None if t is None else t.detach() for t in tensors))
            self.__dict__["_fused_plan"] = plan if state is not None else None
        b, c, h, w = x.shape
        (sh, sw), (dh, dw) = self.stride, self.dilation
        kh, kw = self.kernel_size
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if oh < 1 or ow < 1:
            self._geometry.output_size((h, w))  # raises the descriptive error
        # The output is a new array made by the extension (cheaper per call than torch.empty +
        # .numpy()); torch.from_numpy shares its memory.
        return torch.from_numpy(_core.fused.forward(
            x.detach().numpy(), plan[2], self.stride, (ph, pw), self.dilation,
            self._fused_threads or torch.get_num_threads()))

    def _forward_planned(self, x: torch.Tensor, plan: tuple) -> Optional[torch.Tensor]:
        """The eager fused call for a layer whose weights are packed; None when it does not apply.

        The common inference call, kept to the few checks that can change between calls without
        changing the parameters (the input, grad mode, autocast, forward AD, the switches): in a
        network this Python runs with cold caches, so every torch call here costs (microseconds
        cold). The input's device, dtype, rank, channels and size are checked by ``x.numpy()`` and
        the extension (``x.numpy()`` also fails on functorch's wrapped tensors); on a mismatch this
        returns None and :meth:`forward` takes the general path, which handles or reports it.
        """
        if (plan[3] is None or not (self.use_fused and fused.fused_enabled()) or torch.is_autocast_enabled("cpu")
                or (_HAS_FORWARD_AD_LEVEL and _forward_ad._current_level >= 0)):  # _forward_ad_active(), inlined
            return None
        params = self._parameters
        U, S, Y, X, bias = plan[0]
        if (params.get("out_factor") is not U or params.get("in_factor") is not S or params.get("vert_factor") is not Y
                or params.get("horz_factor") is not X or params.get("bias") is not bias):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or U.requires_grad or S.requires_grad or Y.requires_grad
                                        or X.requires_grad or (bias is not None and bias.requires_grad)):
            return None
        try:
            if plan[1] != _parameter_state(U, S, Y, X, bias):
                return None
            # x.numpy() fails off the CPU (TypeError) and on dtypes numpy lacks; the extension rejects
            # any dtype but float32 (TypeError) and any shape the packed weights do not fit (ValueError).
            y = _core.fused.forward((x.detach() if x.requires_grad else x).numpy(), plan[2], plan[4], plan[3],
                                    plan[5], self._fused_threads or torch.get_num_threads())
        except (RuntimeError, TypeError, ValueError):
            return None
        return torch.from_numpy(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer to a (B, C, H, W) or (C, H, W) input.

        On CPU float32 when no gradient is needed (``torch.no_grad()``/``inference_mode()``, or no
        parameter and no input requiring grad) this runs the fused kernel; otherwise the four torch
        stages (:meth:`_forward_stages`), as also under CPU autocast, forward-mode AD and functorch
        transforms. ``layer.use_fused = False`` or :func:`cpconv.fused.fused_disabled` force the
        torch path; ``layer.fused_threads`` (0 = torch's thread count) sets the fused kernel's threads.

        The fused kernel runs on weights packed once per weight version. In-place changes to the
        factors (``load_state_dict``, in-place ops), every ``torch.optim`` optimizer step (also those
        with ``fused=True``, which do not bump version counters) and ``train()``/``eval()`` make the
        next call repack; after changing a factor in place through ``.data`` (which torch does not
        record) call :func:`cpconv.fused.clear_packed_weights_cache`.
        """
        if torch.jit.is_scripting():  # (a compile-time constant: TorchScript compiles only this branch)
            return self._forward_scripted(x)
        plan = self._fused_plan
        if (plan is not None and type(x) is torch.Tensor and not torch.compiler.is_compiling()
                and not torch.jit.is_tracing()):
            y = self._forward_planned(x, plan)
            if y is not None:
                return y
        if isinstance(x, torch.fx.Proxy):  # torch.fx.symbolic_trace: record the four torch stages
            return self._forward_stages(x)
        if torch.jit.is_tracing():
            # Traced sizes compare as tensors (a TracerWarning each, e.g. in ONNX export with dynamic
            # axes); these checks only raise, they do not shape the recorded graph.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self._check_input(x)
        else:
            self._check_input(x)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if self._fused_applicable(x):
            y = self._forward_fused(x)
        else:
            y = self._forward_stages(x)
        return y.squeeze(0) if unbatched else y

    def __prepare_scriptable__(self) -> "CPConv2d":
        """Called by ``torch.jit.script``: record the geometry as TorchScript-typed attributes for
        :meth:`_forward_scripted` (the scripted module runs the four PyTorch stages)."""
        for name in _FACTOR_NAMES + ("bias",):
            if getattr(self, name) is not self._parameters.get(name):
                raise RuntimeError(f"torch.jit.script cannot compile a CPConv2d whose {name} is parametrized or "
                                   f"pruned ({self!r}); remove the parametrization (e.g. "
                                   "torch.nn.utils.prune.remove) first, or use torch.jit.trace, torch.compile or "
                                   "torch.export")
        pre_pad, (ph, pw) = self._stage_padding()
        (sh, sw), (dh, dw) = self.stride, self.dilation
        self._jit_geometry = (sh, sw, dh, dw, ph, pw)
        self._jit_pre_pad = list(pre_pad) if pre_pad is not None else [0, 0, 0, 0]
        self._jit_pad_mode = "" if pre_pad is None else _PAD_MODE[self.padding_mode]
        return self

    def _forward_scripted(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` as TorchScript compiles it: the four PyTorch stages (what ``torch.jit.trace``
        records), with the input checks."""
        if x.dim() != 3 and x.dim() != 4:
            raise ValueError("CPConv2d expects a 4-D (N, C, H, W) or 3-D (C, H, W) input, got {} dimensions"
                             .format(x.dim()))
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.size(1) != self.in_channels:
            raise ValueError("CPConv2d expects {} input channels, got {}".format(self.in_channels, x.size(1)))
        sh, sw, dh, dw, ph, pw = self._jit_geometry
        if self._jit_pad_mode != "":
            x = F.pad(x, self._jit_pre_pad, mode=self._jit_pad_mode)
        kh, kw = self.kernel_size
        y = _four_stages(x, self.in_factor, self.vert_factor, self.horz_factor, self.out_factor, self.bias,
                         self.groups, self.rank, kh, kw, sh, sw, dh, dw, ph, pw)
        return y.squeeze(0) if unbatched else y

    def train(self, mode: bool = True) -> "CPConv2d":
        """As :meth:`torch.nn.Module.train`; also makes the next fused call repack the weights."""
        result = super().train(mode)
        self._drop_packed_weights()
        return result

    def __getstate__(self) -> dict:
        # The packed weights are a cache (and not picklable): pickles and deep copies repack on use.
        state = super().__getstate__()
        state.pop("_fused_plan", None)
        return state

    def __setstate__(self, state: dict) -> None:
        # Pickles of earlier versions held these as plain attributes; now properties (over _geometry
        # and _fused_threads).
        state = dict(state)
        if "fused_threads" in state:
            state["_fused_threads"] = state.pop("fused_threads")
        for name in ("stride", "padding", "dilation", "padding_mode"):
            state.pop(name, None)
        super().__setstate__(state)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
             f"stride={self.stride}")
        if self.padding != (0, 0):
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s
