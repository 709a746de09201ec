"""PNG figures of the demo (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
import re
from typing import Dict, List, Sequence, Tuple

__all__ = ["plot_spectra", "plot_accuracy_vs_compression"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_spectra(report, out_dir: str) -> List[str]:
    """Per layer one PNG: the singular values of each unfolding, the EVBMF threshold marked.

    ``report`` is a :class:`~cpconv.CompressionReport` whose layers carry rank-selection details
    (``selection["details"][mode]`` with ``singular_values`` and ``threshold``). Returns the paths written.
    """
    plt = _pyplot()
    paths = []
    for layer in report.layers:
        details = (layer.selection or {}).get("details") or {}
        modes = [m for m in ("output", "input") if details.get(m)]
        if not modes:
            continue
        fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 3.6), squeeze=False)
        n, c, kh, kw = layer.kernel_shape
        g = layer.groups
        shapes = {"output": f"{n // g} x {c * kh * kw}", "input": f"{c} x {n // g * kh * kw}"}
        for ax, mode in zip(axes[0], modes):
            per_group = details[mode] if isinstance(details[mode], list) else [details[mode]]
            for gi, d in enumerate(per_group):
                sv = d.get("singular_values") or []
                label = "singular values" + (f" (group {gi})" if len(per_group) > 1 else "")
                ax.semilogy(range(1, len(sv) + 1), sv, "o-", ms=3, lw=1, color=f"C{gi}", label=label)
                threshold = d.get("threshold")
                if threshold is not None and threshold > 0:
                    ax.axhline(threshold, color="C3" if len(per_group) == 1 else f"C{gi}", ls="--", lw=1,
                               label=f"EVBMF threshold {threshold:.3g} (rank {d.get('rank', '?')})")
            ax.set_title(f"{layer.name}: {mode}-channel unfolding ({shapes[mode]})\n"
                         f"{mode} rank {layer.mode_ranks.get(mode, '?')}", fontsize=9)
            ax.set_xlabel("index")
            ax.set_ylabel("singular value")
            ax.legend(fontsize=7)
        fig.suptitle(f"{layer.name} ({layer.selected_from}): CP rank {layer.rank}", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"spectrum_{re.sub(r'[^A-Za-z0-9_]+', '_', layer.name)}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_accuracy_vs_compression(curves: Dict[str, Sequence[Tuple[float, float]]], dense_accuracy: float,
                                 out_dir: str) -> str:
    """One PNG: test accuracy against conv-parameter compression, one trajectory per schedule.

    ``curves[schedule]`` is the list of ``(compression factor, accuracy)`` after each layer.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (schedule, points) in enumerate(curves.items()):
        xs = [1.0] + [p[0] for p in points]
        ys = [dense_accuracy] + [p[1] for p in points]
        ax.plot(xs, [100 * y for y in ys], "o-", color=f"C{i}", label=schedule, ms=4)
        ax.annotate(f"{100 * ys[-1]:.1f}%", (xs[-1], 100 * ys[-1]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8, color=f"C{i}")
    ax.axhline(100 * dense_accuracy, color="grey", lw=0.8, ls=":", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("conv parameter compression (x, after each layer)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST digits, AlexNet-style CNN: accuracy vs compression")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy_vs_compression.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
