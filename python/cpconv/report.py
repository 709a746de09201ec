"""``CompressionReport``: what :func:`cpconv.compress` did to each layer, as a table and as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["LayerReport", "CompressionReport"]

REPORT_FORMAT = "cpconv-compression-report"
REPORT_VERSION = 1
#: How :meth:`CompressionReport.to_dict` (and so the saved JSON) writes non-finite floats, which strict
#: JSON (RFC 8259) has no numbers for; :meth:`CompressionReport.from_dict` reads the metrics and CP
#: errors back as floats.
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


@dataclasses.dataclass
class LayerReport:
    """One compressed (or deliberately left dense) convolution.

    Attributes
    ----------
    name
        Module name in the model (``model.get_submodule(name)``).
    kernel_shape
        ``(N, C/G, kh, kw)`` of the original kernel.
    groups
        The convolution's ``groups``.
    input_hw
        Spatial size ``(H, W)`` of the layer's input seen in the traced forward pass, or ``None`` when
        :func:`~cpconv.compress` was given no ``input_shape`` (then FLOPs are ``None`` too).
    mode_ranks
        Per-mode ranks estimated by the rank selection, ``{"output": r_out, "input": r_in}``
        (empty for a fixed rank).
    rank
        The CP rank used; ``0`` means the layer was left dense (see ``status`` and ``reason``).
    status
        ``"compressed"`` or ``"dense"``.
    reason
        Why this rank (from the rank selection) or why the layer stayed dense.
    selected_from
        ``"current weights"`` (iterative schedule: the weights after the previous step's fine-tuning),
        ``"original weights"`` (static schedule: before anything was compressed) or ``"ratio"``
        (uniform schedule, or a fixed rank: no weights involved).
    selection
        ``RankSelection.to_dict()``: method and per-mode details (singular values, noise variance,
        EVBMF threshold).
    params_before, params_after
        Parameters of the layer (kernel/factors and bias).
    flops_before, flops_after
        Multiply-adds for one image, over all the layer's calls in one forward pass (a conv applied
        twice counts twice), or ``None`` when the input size is unknown. ``input_hw`` is the input
        size at the first call.
    rel_error
        ``||K - K_cp||_F / ||K||_F`` of the CP decomposition, ``None`` for a dense layer.
    metric_after_decomposition, metric_after_finetune
        ``evaluate(model)`` just after the replacement and after ``fine_tune`` (``None`` when the
        callable was not given or the layer stayed dense). May be NaN or +-inf (what ``evaluate``
        returned); :meth:`to_dict` writes those as ``"NaN"``, ``"Infinity"``, ``"-Infinity"``.
    seconds
        Wall time spent on this layer (selection, decomposition, fine-tuning, evaluation).
    """

    name: str
    kernel_shape: Tuple[int, int, int, int]
    groups: int
    input_hw: Optional[Tuple[int, int]]
    mode_ranks: Dict[str, int]
    rank: int
    status: str
    reason: str
    selected_from: str
    selection: Dict[str, Any]
    params_before: int
    params_after: int
    flops_before: Optional[int]
    flops_after: Optional[int]
    rel_error: Optional[float]
    metric_after_decomposition: Optional[float]
    metric_after_finetune: Optional[float]
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        """The fields as strict-JSON data (non-finite floats as the strings of :data:`NON_FINITE`)."""
        return _strict(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LayerReport":
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data)
        if missing:
            raise ValueError(f"layer record is missing fields {sorted(missing)}")
        kw = {k: data[k] for k in names}
        kw["kernel_shape"] = tuple(kw["kernel_shape"])
        if kw["input_hw"] is not None:
            kw["input_hw"] = tuple(kw["input_hw"])
        for k in ("rel_error", "metric_after_decomposition", "metric_after_finetune"):
            kw[k] = _float(kw[k])
        return cls(**kw)


@dataclasses.dataclass
class CompressionReport:
    """The result of :func:`cpconv.compress`: settings, one :class:`LayerReport` per layer, totals.

    ``str(report)`` (or :meth:`to_table`) renders a table; :meth:`save` / :meth:`load` write and read
    strict JSON (RFC 8259): a NaN or infinite metric is written as the string ``"NaN"``,
    ``"Infinity"`` or ``"-Infinity"`` and read back as that float.

    Attributes
    ----------
    settings
        The arguments of the run (schedule, rank method, combine, weakening, ALS options, ...).
    layers
        Finished layers, in the order they were processed.
    planned_layers
        Names of every layer the run was asked to process, in order.
    skipped
        ``{name: why}`` for the model's other ``nn.Conv2d`` layers, which the run leaves as they are
        (one input channel per group, a subclass with its own forward, not named in ``layers=``).
    metric_before
        ``evaluate(model)`` on the dense model, or ``None``.
    model_params_before, model_params_after
        Parameters of the whole model before the run and now.
    conv_flops_before, conv_flops_after
        Multiply-adds of every convolution in the model (dense or CP) for one image, or ``None``
        when no ``input_shape`` was given.
    """

    settings: Dict[str, Any]
    layers: List[LayerReport] = dataclasses.field(default_factory=list)
    planned_layers: List[str] = dataclasses.field(default_factory=list)
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)
    metric_before: Optional[float] = None
    model_params_before: int = 0
    model_params_after: int = 0
    conv_flops_before: Optional[int] = None
    conv_flops_after: Optional[int] = None

    # ------------------------------------------------------------------ totals
    @property
    def finished(self) -> bool:
        """True when every planned layer has been processed."""
        return len(self.layers) == len(self.planned_layers)

    @property
    def ranks(self) -> Dict[str, int]:
        """``{layer name: chosen rank}`` (0 = left dense)."""
        return {layer.name: layer.rank for layer in self.layers}

    @property
    def params_before(self) -> int:
        """Parameters of the processed layers before compression."""
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        """Parameters of the processed layers after compression."""
        return sum(layer.params_after for layer in self.layers)

    @property
    def flops_before(self) -> Optional[int]:
        """Multiply-adds of the processed layers before compression (``None`` if unknown)."""
        if any(layer.flops_before is None for layer in self.layers):
            return None
        return sum(layer.flops_before for layer in self.layers)

    @property
    def flops_after(self) -> Optional[int]:
        """Multiply-adds of the processed layers after compression (``None`` if unknown)."""
        if any(layer.flops_after is None for layer in self.layers):
            return None
        return sum(layer.flops_after for layer in self.layers)

    @property
    def metric_after(self) -> Optional[float]:
        """The last metric measured (after the last layer's fine-tuning, or its decomposition)."""
        for layer in reversed(self.layers):
            for value in (layer.metric_after_finetune, layer.metric_after_decomposition):
                if value is not None:
                    return value
        return self.metric_before

    @property
    def seconds(self) -> float:
        """Total wall time spent on the layers."""
        return sum(layer.seconds for layer in self.layers)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        """The report as strict-JSON data (non-finite floats as the strings of :data:`NON_FINITE`)."""
        return _strict({
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "settings": self.settings,
            "planned_layers": list(self.planned_layers),
            "skipped": dict(self.skipped),
            "layers": [layer.to_dict() for layer in self.layers],
            "metric_before": self.metric_before,
            "model_params_before": self.model_params_before,
            "model_params_after": self.model_params_after,
            "conv_flops_before": self.conv_flops_before,
            "conv_flops_after": self.conv_flops_after,
            "totals": {
                "params_before": self.params_before,
                "params_after": self.params_after,
                "flops_before": self.flops_before,
                "flops_after": self.flops_after,
                "metric_after": self.metric_after,
                "seconds": self.seconds,
            },
        })

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "CompressionReport":
        """Rebuild a report from :meth:`to_dict`'s output; raises ``ValueError`` on anything else."""
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a cpconv compression report (expected format {REPORT_FORMAT!r})")
        if data.get("version") != REPORT_VERSION:
            raise ValueError(f"unsupported report version {data.get('version')!r}, expected {REPORT_VERSION}")
        try:
            return cls(
                settings=dict(data["settings"]),
                layers=[LayerReport.from_dict(d) for d in data["layers"]],
                planned_layers=list(data["planned_layers"]),
                skipped=_name_map(data.get("skipped", {}), "skipped"),  # (absent from earlier versions)
                metric_before=_float(data["metric_before"]),
                model_params_before=int(data["model_params_before"]),
                model_params_after=int(data["model_params_after"]),
                conv_flops_before=data["conv_flops_before"],
                conv_flops_after=data["conv_flops_after"],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed compression report: {exc!r}") from None

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def save(self, path: "os.PathLike | str") -> None:
        """Write the report as strict JSON to ``path`` (a NaN/inf metric as ``"NaN"``, ``"Infinity"``...)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.write("\n")

    @classmethod
    def load(cls, path: "os.PathLike | str") -> "CompressionReport":
        """Read a report written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{os.fspath(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    # ------------------------------------------------------------------ table
    def to_table(self) -> str:
        """A fixed-width text table: one row per layer, then the totals."""
        header = ["layer", "kernel", "ranks out/in", "rank", "params", "MFLOPs", "CP err",
                  "metric decomp", "metric tuned", "s"]
        rows = []
        for layer in self.layers:
            n, c, kh, kw = layer.kernel_shape
            kernel = f"{n}x{c}x{kh}x{kw}" + (f" g{layer.groups}" if layer.groups > 1 else "")
            mode = "-" if not layer.mode_ranks else (
                f"{layer.mode_ranks.get('output', '-')}/{layer.mode_ranks.get('input', '-')}")
            rank = str(layer.rank) if layer.status == "compressed" else "dense"
            rows.append([
                layer.name, kernel, mode, rank,
                f"{_count(layer.params_before)}->{_count(layer.params_after)}",
                _flops_pair(layer.flops_before, layer.flops_after),
                "-" if layer.rel_error is None else f"{layer.rel_error:.3f}",
                _metric(layer.metric_after_decomposition), _metric(layer.metric_after_finetune),
                f"{layer.seconds:.1f}",
            ])
        total_params = f"{_count(self.params_before)}->{_count(self.params_after)}"
        if self.params_after:
            total_params += f" ({self.params_before / self.params_after:.2f}x)"
        flops = _flops_pair(self.flops_before, self.flops_after)
        if self.flops_before and self.flops_after:
            flops += f" ({self.flops_before / self.flops_after:.2f}x)"
        rows.append(["total", "", "", "", total_params, flops, "",
                     f"before {_metric(self.metric_before)}", _metric(self.metric_after),
                     f"{self.seconds:.1f}"])
        widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

        def line(cells):
            return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

        st = self.settings
        how = (f"ratio={st.get('ratio'):.3g}" if st.get("schedule") == "uniform" or st.get("rank") == "ratio"
               else f"rank={st.get('rank')}, combine={st.get('combine')}, weakening={st.get('weakening')}")
        title = (f"cpconv compression report: schedule={st.get('schedule')}, {how}"
                 + ("" if self.finished else f"  [{len(self.layers)}/{len(self.planned_layers)} layers done]"))
        sep = "  ".join("-" * w for w in widths)
        out = [title, line(header), sep] + [line(r) for r in rows[:-1]] + [sep, line(rows[-1])]
        dense = [layer for layer in self.layers if layer.status != "compressed"]
        for layer in dense:
            out.append(f"note: {layer.name} left dense: {layer.reason}")
        for name, why in self.skipped.items():
            out.append(f"note: {name} not processed: {why}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_table()


def _name_map(value, what: str) -> Dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError(f"{what} must map layer names to reasons (str to str), got {value!r}")
    return dict(value)


def _strict(data):
    """``data`` with every non-finite float replaced by its string in :data:`NON_FINITE`."""
    if isinstance(data, float) and not math.isfinite(data):
        return "NaN" if math.isnan(data) else ("Infinity" if data > 0 else "-Infinity")
    if isinstance(data, dict):
        return {k: _strict(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_strict(v) for v in data]
    if isinstance(data, tuple):
        return tuple(_strict(v) for v in data)
    return data


def _float(value):
    """A metric read from JSON: the strings of :data:`NON_FINITE` back to floats."""
    return NON_FINITE[value] if isinstance(value, str) and value in NON_FINITE else value


def _count(n: int) -> str:
    if n >= 10_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _flops_pair(before: Optional[int], after: Optional[int]) -> str:
    if before is None or after is None:
        return "-"
    return f"{before / 1e6:.2f}->{after / 1e6:.2f}"


def _metric(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"
