"""``inspect_model``: what compression would do to each conv of a saved model (``cpconv inspect``)."""

from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .cp_conv import CPConv2d

__all__ = ["ConvInspection", "ModelInspection", "inspect_model", "load_model_file"]


@dataclasses.dataclass
class ConvInspection:
    """One convolution: its shape, the rank selection's result and the saving a CP layer of that rank gives.

    ``rank`` is 0 when the selection found no signal above noise (the layer would stay dense);
    ``params_cp``/``flops_cp`` then equal the dense figures. For a layer that already is a
    ``CPConv2d``, ``rank`` is its rank and ``mode_ranks`` is empty. An ``nn.Conv2d`` subclass with its
    own ``forward``/``_conv_forward``, which :func:`cpconv.compress` never compresses, gets no rank
    selection: ``rank`` 0, empty ``mode_ranks``, and ``note`` says why. ``flops_*`` count every call
    of the conv in one forward pass; ``input_hw`` is its input size at the first call.
    """

    name: str
    kind: str  # "Conv2d" or "CPConv2d"
    kernel_shape: Tuple[int, int, int, int]
    groups: int
    input_hw: Optional[Tuple[int, int]]
    mode_ranks: Dict[str, int]
    rank: int
    params_dense: int
    params_cp: int
    flops_dense: Optional[int]
    flops_cp: Optional[int]
    note: str


@dataclasses.dataclass
class ModelInspection:
    source: str
    layers: List[ConvInspection]
    settings: Dict[str, Any]

    def to_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "settings": self.settings, "layers": [dataclasses.asdict(c) for c in self.layers]}

    def to_table(self) -> str:
        header = ["layer", "type", "kernel", "input", "ranks out/in", "CP rank", "params", "param saving",
                  "MFLOPs", "FLOP saving"]
        rows = []
        for c in self.layers:
            n, cg, kh, kw = c.kernel_shape
            kernel = f"{n}x{cg}x{kh}x{kw}" + (f" g{c.groups}" if c.groups > 1 else "")
            modes = f"{c.mode_ranks['output']}/{c.mode_ranks['input']}" if c.mode_ranks else "-"
            rank = str(c.rank) if c.rank else "0 (dense)"
            flops = "-" if c.flops_dense is None else f"{c.flops_dense / 1e6:.2f}->{c.flops_cp / 1e6:.2f}"
            flop_saving = "-" if c.flops_dense is None else f"{c.flops_dense / c.flops_cp:.2f}x"
            rows.append([c.name, c.kind, kernel, "-" if c.input_hw is None else f"{c.input_hw[0]}x{c.input_hw[1]}",
                         modes, rank, f"{c.params_dense}->{c.params_cp}", f"{c.params_dense / c.params_cp:.2f}x",
                         flops, flop_saving])
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        fmt = lambda cells: "  ".join(x.ljust(w) for x, w in zip(cells, widths)).rstrip()  # noqa: E731
        s = self.settings
        options = "".join(f", {k}={v}" for k, v in s.get("options", {}).items())
        lines = [f"{self.source}: {len(self.layers)} conv layers; rank selection {s['method']}{options}, "
                 f"combine={s['combine']}, weakening={s['weakening']}", fmt(header), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in rows]
        notes = [f"note: {c.name}: {c.note}" for c in self.layers if c.note]
        return "\n".join(lines + notes)

    def __str__(self) -> str:
        return self.to_table()


def load_model_file(path: "os.PathLike | str") -> nn.Module:
    """Load a whole model saved with ``torch.save(model)``.

    This unpickles the file (``weights_only=False``), which can execute arbitrary code: only load
    files you trust.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file is not a torch file, is a TorchScript or ``torch.export`` archive, or holds a
        ``state_dict`` or another object instead of a model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such model file: {path!r}")
    wanted = "inspect reads an eager model saved with torch.save(model)"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/archive_format") or n == "archive_format" for n in names):
            raise ValueError(f"{path!r} is a torch.export archive (torch.export.save), not a pickled model; {wanted}")
    try:
        with warnings.catch_warnings():  # torch.load's note that it hands a TorchScript archive to torch.jit.load
            warnings.filterwarnings("ignore", message="'torch.load' received a zip file that looks like a TorchScript",
                                    category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure is reported the same way
        raise ValueError(f"{path!r} could not be loaded with torch.load: {exc}") from None
    if isinstance(obj, torch.jit.ScriptModule):
        raise ValueError(f"{path!r} is a TorchScript archive (torch.jit.save of a traced or scripted model), whose "
                         f"layers are compiled code, not nn.Conv2d modules; {wanted}")
    if isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a dict (a state_dict?), not a model; save the whole model with "
                         "torch.save(model) to inspect it")
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


def inspect_model(
    model: Union[nn.Module, str, "os.PathLike"],
    *,
    input_shape: Optional[Sequence[int]] = None,
    method: str = "evbmf",
    combine: str = "max",
    weakening: float = 1.0,
    **method_options,
) -> ModelInspection:
    """Per conv of ``model`` (a module, or a path for :func:`load_model_file`): per-mode ranks, CP rank, savings.

    Parameters
    ----------
    input_shape
        ``(C, H, W)``: FLOPs per layer from each conv's input size in one forward pass over zeros.
    method, combine, weakening, **method_options
        As for :func:`cpconv.select_rank` (e.g. ``method="vbmf", prior=1.0``).

    Raises
    ------
    ValueError
        Besides :func:`load_model_file`'s and :func:`cpconv.select_rank`'s: a forward pass on zeros of
        ``input_shape`` fails (e.g. the wrong number of channels, or an image too small).
    """
    from . import select_rank
    from .compress import _calls_flops, _check_input_shape, _own_forward, _trace_conv_calls, ineligible_reason

    source = "model"
    if not isinstance(model, nn.Module):
        source = os.fspath(model)
        model = load_model_file(model)
    sizes = None
    order = None
    if input_shape is not None:
        shape = _check_input_shape(input_shape)
        try:
            order, sizes = _trace_conv_calls(model, shape)
        except Exception as exc:  # noqa: BLE001 -- the model's own forward pass: any failure means a misfit
            first = next(((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, CPConv2d))), None)
            expects = ""
            if first is not None and first[1].in_channels != shape[1]:
                expects = f"; its first conv {first[0]} takes {first[1].in_channels} input channels, not {shape[1]}"
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"input shape {tuple(input_shape)} does not fit the model (a forward pass on zeros "
                             f"failed: {message}{expects})") from exc
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, CPConv2d))]
    if order is not None:
        pos = {n: i for i, n in enumerate(order)}
        convs.sort(key=lambda nm: pos.get(nm[0], len(pos)))
    layers = []
    for name, m in convs:
        calls = sizes.get(name) if sizes is not None else None  # input sizes of all its calls
        input_hw = calls[0] if calls else None
        if isinstance(m, CPConv2d):
            kernel = (m.out_channels, m.in_channels // m.groups) + tuple(m.kernel_size)
            layers.append(ConvInspection(
                name, "CPConv2d", kernel, m.groups, input_hw, {}, m.rank, m.dense_parameter_count(),
                m.parameter_count(), None if calls is None else sum(m.dense_flops(hw) for hw in calls),
                _calls_flops(m, calls), "already CP-decomposed"))
            continue
        params_dense = sum(p.numel() for p in m.parameters())
        flops_dense = _calls_flops(m, calls)
        if _own_forward(m):
            layers.append(ConvInspection(
                name, "Conv2d", tuple(m.weight.shape), m.groups, input_hw, {}, 0, params_dense, params_dense,
                flops_dense, flops_dense, f"not eligible: {ineligible_reason(m)}"))
            continue
        note = ""
        if m.in_channels // m.groups == 1:
            note = "one input channel per group: compress() skips it unless named"
        with warnings.catch_warnings(record=True) as caught:  # e.g. a ratio not met: shown as the layer's note
            warnings.simplefilter("always")
            selection = select_rank(m, method=method, combine=combine, weakening=weakening, **method_options)
        for w in caught:
            note = (note + "; " if note else "") + str(w.message)
        rank = int(selection.rank)
        if rank == 0:
            params_cp, flops_cp = params_dense, flops_dense
            note = (note + "; " if note else "") + "rank 0: no signal above noise, would stay dense"
        else:
            cp = CPConv2d(m.in_channels, m.out_channels, m.kernel_size, rank, stride=m.stride, padding=m.padding,
                          dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                          padding_mode=m.padding_mode, device="meta")
            params_cp = cp.parameter_count()
            flops_cp = _calls_flops(cp, calls)
        layers.append(ConvInspection(
            name, "Conv2d", tuple(m.weight.shape), m.groups, input_hw,
            {k: int(v) for k, v in selection.mode_ranks.items()}, rank, params_dense, params_cp,
            flops_dense, flops_cp, note))
    if not layers:
        raise ValueError(f"{source} has no nn.Conv2d or CPConv2d layer")
    return ModelInspection(source, layers, {"method": method, "combine": combine, "weakening": weakening,
                                            "options": dict(method_options),
                                            "input_shape": None if input_shape is None else list(input_shape)})
