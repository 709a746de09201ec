"""Normalisation and validation of ``nn.Conv2d``-style arguments, shared by every layer and kernel."""

from __future__ import annotations

import operator

from dataclasses import dataclass
from typing import Tuple, Union

IntOrPair = Union[int, Tuple[int, int]]
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def pair(value, name: str, minimum: int) -> Tuple[int, int]:
    """Return ``value`` as a pair of Python ints >= ``minimum``; raise ``ValueError``/``TypeError`` otherwise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int) or hasattr(value, "__index__"):
        items = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        items = tuple(value)
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    out = []
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
        try:
            item = operator.index(item)  # accepts numpy and torch integer scalars too
        except TypeError:
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if item < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
        out.append(item)
    return out[0], out[1]


@dataclass(frozen=True)
class ConvGeometry:
    """The validated geometry of a 2-D convolution, as ``nn.Conv2d`` would interpret its arguments.

    ``padding`` is either a pair of ints or the string ``"same"`` / ``"valid"`` as given;
    :meth:`explicit_padding` resolves it to (top, bottom, left, right).
    """

    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Union[str, Tuple[int, int]]
    dilation: Tuple[int, int]
    groups: int
    padding_mode: str

    @classmethod
    def create(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Union[str, IntOrPair] = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> "ConvGeometry":
        counts = []
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if isinstance(value, bool) or not hasattr(value, "__index__"):
                raise TypeError(f"{name} must be an int, got {value!r}")
            value = operator.index(value)  # numpy and torch integer scalars too
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
            counts.append(value)
        in_channels, out_channels, groups = counts
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels={in_channels} and out_channels={out_channels} must both be divisible by groups={groups}"
            )
        kernel = pair(kernel_size, "kernel_size", 1)
        stride_ = pair(stride, "stride", 1)
        dilation_ = pair(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
            if padding == "same" and stride_ != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions (stride={stride_})")
            padding_ = padding
        else:
            padding_ = pair(padding, "padding", 0)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        return cls(in_channels, out_channels, kernel, stride_, padding_, dilation_, groups, padding_mode)

    def explicit_padding(self) -> Tuple[int, int, int, int]:
        """(top, bottom, left, right) zero/edge padding; 'same' splits odd totals like ``nn.Conv2d``."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            out = []
            for d, k in zip(self.dilation, self.kernel_size):
                total = d * (k - 1)
                out += [total // 2, total - total // 2]
            return tuple(out)
        ph, pw = self.padding
        return (ph, ph, pw, pw)

    def output_size(self, input_hw: Tuple[int, int]) -> Tuple[int, int]:
        """Output (H', W') for an input of spatial size ``input_hw``; raises if the kernel does not fit."""
        h, w = pair(input_hw, "input_hw", 1)
        top, bottom, left, right = self.explicit_padding()
        sizes = []
        for size, before, after, d, k, s in zip(
            (h, w), (top, left), (bottom, right), self.dilation, self.kernel_size, self.stride
        ):
            out = (size + before + after - d * (k - 1) - 1) // s + 1
            if out < 1:
                raise ValueError(
                    f"input of size {tuple(input_hw)} (padded {size + before + after}) is smaller than the "
                    f"dilated kernel {self.kernel_size} with dilation {self.dilation}"
                )
            sizes.append(out)
        return sizes[0], sizes[1]

    def conv_kwargs(self) -> dict:
        """Keyword arguments that rebuild an equivalent ``nn.Conv2d`` (minus channel counts)."""
        return dict(
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )
