"""The plain C++ reference CP convolution, callable on CPU float32 tensors.

It runs the four stages literally with double accumulators; optimised kernels are tested against it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import _core
from .conv_args import pair

__all__ = ["cp_conv2d_reference"]


def as_cpu_float32_array(name: str, t) -> np.ndarray:
    """``t`` (tensor or array) as a C-contiguous float32 CPU NumPy array; TypeError/ValueError otherwise."""
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")
    return t.detach().contiguous().numpy()


def cp_conv2d_reference(
    x: torch.Tensor,
    factors,
    bias: Optional[torch.Tensor] = None,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """CP convolution forward by the C++ reference kernel (zero padding).

    Parameters
    ----------
    x
        (B, C, H, W) float32 CPU input; any strides (a contiguous copy is made if needed).
    factors
        ``(U, S, Y, X)`` with the layouts of :class:`cpconv.CPConv2d`: U (N x R/G), S (C/G x R),
        Y (kh x R), X (kw x R).
    bias
        Optional (N,) bias.
    stride, padding, dilation
        Ints or pairs; padding is symmetric zero padding.
    groups
        Number of groups.

    Returns
    -------
    torch.Tensor
        (B, N, H', W') float32.

    Raises
    ------
    TypeError
        A non-float32 tensor.
    ValueError
        Inconsistent shapes, an input smaller than the dilated kernel, non-positive sizes.
    """
    if not isinstance(x, (torch.Tensor, np.ndarray)) or x.ndim != 4:
        raise ValueError(f"x must be a 4-D (B, C, H, W) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if len(factors) != 4:
        raise ValueError(f"factors must be (U, S, Y, X), got {len(factors)} items")
    U, S, Y, X = (as_cpu_float32_array(n, f) for n, f in zip("USYX", factors))
    xa = as_cpu_float32_array("x", x)
    ba = None if bias is None else as_cpu_float32_array("bias", bias)
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    if S.ndim != 2 or S.shape[0] * groups != xa.shape[1]:
        raise ValueError(
            f"x has {xa.shape[1]} channels but S has shape {S.shape} with groups={groups} (expected (C/G, R))"
        )
    if Y.ndim != 2 or X.ndim != 2 or U.ndim != 2:
        raise ValueError("factors U, Y and X must be matrices")
    b, _, h, w = xa.shape
    kh, kw = Y.shape[0], X.shape[0]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"input {h}x{w} with padding {padding} is smaller than the dilated kernel {kh}x{kw}")
    out = np.empty((b, U.shape[0], oh, ow), dtype=np.float32)
    _core.reference.cp_conv2d(xa, S, Y, X, U, ba, out, stride, padding, dilation, groups)
    return torch.from_numpy(out)
