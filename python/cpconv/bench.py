"""``cpconv bench``: latency of CP convolutions on this CPU, fused kernel vs its peers.

For each layer of ``bench_layers.json`` (package data), rank and thread count it times, interleaved
in rounds (a shuffled order every round, each contender on its own copy of the input) so that load
changes hit every contender alike, the median latency of:

- ``dense``          ``nn.Conv2d`` with the reconstructed kernel, NCHW
- ``dense_cl``       the same, channels_last input and weights
- ``torch4``         the four CP stages as an ``nn.Sequential`` of ``nn.Conv2d``, NCHW
- ``torch4_cl``      the same, channels_last
- ``ort4``           those four stages exported to ONNX and run by ONNX Runtime's CPU provider with
                     the same thread count (needs the ``bench`` extra: onnx, onnxruntime)
- ``fused``          :class:`cpconv.CPConv2d` in inference mode, i.e. the fused kernel by its eager
                     path (torch tensor in and out; the whole per-call cost of ``layer(x)`` included)

and the machine's ceiling: the GFLOP/s of a 2048 x 2048 single-precision matmul at the same thread
count, the faster of ``torch.mm`` and numpy's (see :func:`numpy_sgemm_gflops`). GFLOP/s count 2 FLOPs
per multiply-add of the CP stages (the dense rows: of the dense conv).
With ``--model`` it also times a whole AlexNet at 224x224: dense vs conv2-conv5 compressed (fixed
ranks), in PyTorch, ONNX Runtime and with the fused kernel.

Run ``cpconv bench --help``; the library's ``BENCHMARKS.md`` records results and commands.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from importlib import resources
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .cp_conv import CPConv2d
from .fused import best_isa, fused_disabled, fused_stage_seconds

__all__ = ["add_arguments", "run", "load_layer_set", "four_stage_sequential", "alexnet_imagenet"]

CONTENDERS = ("dense", "dense_cl", "torch4", "torch4_cl", "ort4", "fused")


def load_layer_set() -> dict:
    """The layer shapes and ranks of the benchmark (``cpconv/bench_layers.json``)."""
    return json.loads(resources.files("cpconv").joinpath("bench_layers.json").read_text())


def four_stage_sequential(layer: CPConv2d) -> nn.Sequential:
    """The four CP stages of ``layer`` (zero padding) as plain ``nn.Conv2d`` modules, for peers.

    Raises
    ------
    ValueError
        A layer with a non-zero padding mode or asymmetric padding (not needed by the benchmark).
    """
    pre_pad, (ph, pw) = layer._stage_padding()
    if pre_pad is not None:
        raise ValueError("four_stage_sequential supports symmetric zero padding only")
    r, g = layer.rank, layer.groups
    kh, kw = layer.kernel_size
    (sh, sw), (dh, dw) = layer.stride, layer.dilation
    stages = nn.Sequential(
        nn.Conv2d(layer.in_channels, r, 1, groups=g, bias=False),
        nn.Conv2d(r, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=r, bias=False),
        nn.Conv2d(r, r, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=r, bias=False),
        nn.Conv2d(r, layer.out_channels, 1, groups=g, bias=layer.bias is not None),
    )
    with torch.no_grad():
        stages[0].weight.copy_(layer.in_factor.t().reshape(r, layer.in_channels // g, 1, 1))
        stages[1].weight.copy_(layer.vert_factor.t().reshape(r, 1, kh, 1))
        stages[2].weight.copy_(layer.horz_factor.t().reshape(r, 1, 1, kw))
        stages[3].weight.copy_(layer.out_factor.reshape(layer.out_channels, r // g, 1, 1))
        if layer.bias is not None:
            stages[3].bias.copy_(layer.bias)
    return stages.eval()


def alexnet_imagenet(ranks: Optional[Dict[str, int]] = None) -> nn.Sequential:
    """AlexNet (96-256-384-384-256 channels, 224x224 input, random weights) for latency only.

    With ``ranks`` (e.g. ``{"conv2": 128, ...}``) those convolutions are :class:`CPConv2d` layers.
    """
    ranks = ranks or {}

    def conv(name, cin, cout, k, stride=1, padding=0):
        if name in ranks:
            return CPConv2d(cin, cout, k, ranks[name], stride=stride, padding=padding)
        return nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

    torch.manual_seed(0)
    return nn.Sequential(
        conv("conv1", 3, 96, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        conv("conv2", 96, 256, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        conv("conv3", 256, 384, 3, padding=1), nn.ReLU(),
        conv("conv4", 384, 384, 3, padding=1), nn.ReLU(),
        conv("conv5", 384, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 1000),
    ).eval().requires_grad_(False)


def onnxruntime_session(module: nn.Module, example: torch.Tensor, threads: int):
    """Export ``module`` to ONNX (in memory) and open an ONNX Runtime CPU session with ``threads`` threads.

    Returns a callable ``f(x_numpy) -> numpy``. Raises ImportError without onnxruntime.
    """
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings(), fused_disabled(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # The TorchScript exporter: seconds faster than the dynamo one and needs no onnxscript.
        torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                          opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def sgemm_gflops(threads: int, size: int = 2048, reps: int = 5) -> float:
    """GFLOP/s (2 per multiply-add) of a size x size float32 matmul with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


_NUMPY_SGEMM = """
import statistics, sys, time
import numpy as np
size, reps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a, b = rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)
a @ b
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t0)
print(2 * size**3 / statistics.median(times) / 1e9)
"""


def numpy_sgemm_gflops(threads: int, size: int = 2048, reps: int = 9) -> Optional[float]:
    """GFLOP/s of a size x size float32 ``numpy`` matmul (its BLAS, OpenBLAS in numpy's wheels) with
    ``threads`` threads, in a fresh process; None if that fails.

    OpenBLAS picks its kernels from the CPU model when it loads, and on CPUs it does not know (AMD
    Zen 5 in numpy 2.4's OpenBLAS 0.3.31) falls back to AVX2 kernels; MKL (torch's BLAS) does not
    use AVX-512 on AMD CPUs either. So on a CPU with AVX-512 the process is started with
    ``OPENBLAS_CORETYPE=SkylakeX`` (OpenBLAS's AVX-512 kernels), and the machine's ceiling is the
    faster of this and :func:`sgemm_gflops`.
    """
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    isa = best_isa()
    if isa == "avx512":
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif isa == "avx2":
        env["OPENBLAS_CORETYPE"] = "Haswell"
    try:
        out = subprocess.run([sys.executable, "-c", _NUMPY_SGEMM, str(size), str(reps)], env=env,
                             capture_output=True, text=True, timeout=300, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def interleaved_medians(contenders: Dict[str, Callable[[], object]], reps: int, burst: int = 1) -> Dict[str, float]:
    """Median seconds per call of each contender, timed in rounds (a new random order every round).

    With ``burst == 1`` each round times one call of each contender, right after the others ran
    (caches hold the other contenders' data: the latency of a layer inside a network). With
    ``burst > 1`` each round makes ``burst`` consecutive calls and times the last ``burst - 1``
    (warm caches: the latency of the same layer called repeatedly). The order is shuffled (seeded,
    so runs repeat) rather than rotated: a rotation keeps each contender's predecessor, and a
    contender that shares data with its predecessor (the same input tensor) would always find that
    data warm. Callers give each contender its own input for the same reason.
    """
    names = list(contenders)
    for name in names:  # warm-up (first-call allocations, ORT arena, packing)
        contenders[name]()
        contenders[name]()
    times: Dict[str, List[float]] = {n: [] for n in names}
    shuffler = random.Random(0)
    for _ in range(reps):
        order = shuffler.sample(names, len(names))
        for name in order:
            f = contenders[name]
            for call in range(burst):
                t0 = time.perf_counter()
                f()
                elapsed = time.perf_counter() - t0
                if burst == 1 or call > 0:
                    times[name].append(elapsed)
    return {n: statistics.median(t) for n, t in times.items()}


def _geomean(values: List[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def _max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def benchmark_layer(spec: dict, rank: int, threads: int, reps: int, use_onnx: bool, burst: int = 1) -> dict:
    """Time every contender on one layer at one rank and thread count; check they agree."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = CPConv2d(spec["in_channels"], spec["out_channels"], spec["kernel_size"], rank,
                     padding=spec.get("padding", 0), stride=spec.get("stride", 1)).eval().requires_grad_(False)
    layer.fused_threads = threads
    hw = spec["input_hw"]
    x = torch.randn(1, spec["in_channels"], hw, hw)
    x_cl = x.to(memory_format=torch.channels_last)
    dense = layer.to_conv().eval()
    dense_cl = layer.to_conv().eval().to(memory_format=torch.channels_last)
    stages = four_stage_sequential(layer)
    stages_cl = four_stage_sequential(layer).to(memory_format=torch.channels_last)
    # Each contender reads its own copy of the input (see interleaved_medians).
    own = {name: (x_cl if name.endswith("_cl") else x).clone()
           for name in ("dense", "dense_cl", "torch4", "torch4_cl", "fused", "ort4")}
    x_np = own["ort4"].numpy()
    contenders: Dict[str, Callable[[], object]] = {
        "dense": lambda: dense(own["dense"]),
        "dense_cl": lambda: dense_cl(own["dense_cl"]),
        "torch4": lambda: stages(own["torch4"]),
        "torch4_cl": lambda: stages_cl(own["torch4_cl"]),
        "fused": lambda: layer(own["fused"]),
    }
    ort_run = None
    if use_onnx:
        ort_run = onnxruntime_session(stages, x, threads)
        contenders["ort4"] = lambda: ort_run(x_np)
    with torch.inference_mode():
        expected = stages(x)
        errors = {"fused": _max_relative_error(layer(x), expected)}
        if ort_run is not None:
            errors["ort4"] = _max_relative_error(torch.from_numpy(ort_run(x_np)), expected)
        medians = interleaved_medians(contenders, reps, burst)
        # The fused kernel's own split of its time (thread CPU time, summed over threads).
        stage_seconds = [0.0, 0.0, 0.0]
        for _ in range(5):
            _, seconds = fused_stage_seconds(x, layer.factors, layer.bias, padding=spec.get("padding", 0),
                                             stride=spec.get("stride", 1), threads=threads)
            stage_seconds = [a + b for a, b in zip(stage_seconds, seconds)]
    cp_macs = layer.flops((hw, hw))
    dense_macs = layer.dense_flops((hw, hw))
    gflops = {n: 2 * (dense_macs if n.startswith("dense") else cp_macs) / t / 1e9 for n, t in medians.items()}
    total = sum(stage_seconds)
    # The kernel alone, from its own CPU-time counters (5 calls, threads' times summed): immune to
    # other processes and free of the Python call; at 1 thread, the kernel's throughput.
    kernel_gflops = 2 * cp_macs * 5 * threads / total / 1e9
    return dict(layer=spec["name"], rank=rank, threads=threads, seconds=medians, gflops=gflops,
                max_relative_error=errors, cp_macs=cp_macs, dense_macs=dense_macs,
                fused_stage_share=[s / total for s in stage_seconds], fused_kernel_cpu_gflops=kernel_gflops)


def benchmark_alexnet(threads: int, reps: int, use_onnx: bool, ranks: Dict[str, int]) -> dict:
    """Whole-model latency of AlexNet at 224x224, batch 1: dense vs compressed."""
    torch.set_num_threads(threads)
    dense = alexnet_imagenet()
    compressed = alexnet_imagenet(ranks)
    for m in compressed.modules():
        if isinstance(m, CPConv2d):
            m.fused_threads = threads
    x = torch.randn(1, 3, 224, 224)

    def torch_path(model, inp):
        def call():
            with fused_disabled():
                return model(inp)
        return call

    # Each contender reads its own copy of the input (see interleaved_medians).
    own = {name: x.clone() for name in ("dense", "dense_cl", "cp_torch", "cp_fused", "dense_ort", "cp_ort")}
    contenders = {
        "dense": lambda: dense(own["dense"]),
        "dense_cl": lambda: dense(own["dense_cl"].to(memory_format=torch.channels_last)),
        "cp_torch": torch_path(compressed, own["cp_torch"]),
        "cp_fused": lambda: compressed(own["cp_fused"]),
    }
    if use_onnx:
        dense_ort = onnxruntime_session(dense, x, threads)
        cp_ort = onnxruntime_session(compressed, x, threads)
        contenders["dense_ort"] = lambda: dense_ort(own["dense_ort"].numpy())
        contenders["cp_ort"] = lambda: cp_ort(own["cp_ort"].numpy())
    with torch.inference_mode():
        err = _max_relative_error(compressed(x), torch_path(compressed, x)())
        medians = interleaved_medians(contenders, reps)
    return dict(model="alexnet224", threads=threads, ranks=ranks, seconds=medians, fused_vs_torch_error=err)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``cpconv bench``'s options to ``parser``."""
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: 1,2)")
    parser.add_argument("--layers", default="", help="comma-separated layer names or name prefixes (default: all)")
    parser.add_argument("--ranks", default="", help="comma-separated ranks (default: from the layer file)")
    parser.add_argument("--reps", type=int, default=40, help="timed rounds per contender (default: 40)")
    parser.add_argument("--burst", type=int, default=1,
                        help="calls per contender per round; >1 times the warm calls after the first (default: 1)")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime (no onnxruntime installed)")
    parser.add_argument("--model", action="store_true", help="also time a whole AlexNet at 224x224")
    parser.add_argument("--json", default="", metavar="FILE",
                        help="also write the raw results to this JSON file (its directory must exist)")


def _parse_ints(text: str, name: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--{name} must list integers >= 1, got {text!r}")
    return values


def machine_description() -> str:
    """CPU model, logical CPUs, torch version and the fused kernel's instruction set."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.2f %.2f %.2f" % os.getloadavg()
    return (f"{model}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"fused isa {best_isa()}{load}")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`), print a report; returns 0."""
    layer_set = load_layer_set()
    threads_list = _parse_ints(args.threads, "threads")
    if args.reps < 1 or args.burst < 1:
        raise ValueError(f"--reps and --burst must be >= 1, got {args.reps} and {args.burst}")
    ranks = _parse_ints(args.ranks, "ranks") if args.ranks else layer_set["ranks"]
    wanted = [w for w in args.layers.split(",") if w]
    layers = [s for s in layer_set["layers"] if not wanted or any(s["name"].startswith(w) for w in wanted)]
    if not layers:
        raise ValueError(f"--layers {args.layers!r} matches none of {[s['name'] for s in layer_set['layers']]}")
    if args.json:  # checked now, not after the whole benchmark
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"--json {args.json!r}: cannot write that file (it must be a file path in an existing, "
                             "writable directory)")
    use_onnx = not args.no_onnx
    if use_onnx:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise SystemExit("onnxruntime is not installed: pip install 'cpconv[bench]' or pass --no-onnx")
    print(f"# machine: {machine_description()}")
    results = {"machine": machine_description(), "layers": [], "ceiling_gflops": {}, "models": []}
    names = [c for c in CONTENDERS if use_onnx or c != "ort4"]
    for threads in threads_list:
        ceiling = [sgemm_gflops(threads)]
        numpy_ceiling = [numpy_sgemm_gflops(threads)]
        print(f"\n## threads={threads}")
        print(f"{'layer':18s} {'R':>4s} " + " ".join(f"{n + ' ms':>12s}" for n in names)
              + f" {'fused GF/s':>10s} {'x ort4':>7s} {'x torch4':>8s} {'x ceil':>7s}")
        rows = []
        for spec in layers:
            for rank in ranks:
                row = benchmark_layer(spec, rank, threads, args.reps, use_onnx, args.burst)
                ceiling.append(sgemm_gflops(threads, reps=3))
                rows.append(row)
                sec = row["seconds"]
                best_torch = min(sec["torch4"], sec["torch4_cl"])
                vs_ort = sec["ort4"] / sec["fused"] if use_onnx else float("nan")
                print(f"{spec['name']:18s} {rank:4d} " + " ".join(f"{sec[n] * 1e3:12.3f}" for n in names)
                      + f" {row['gflops']['fused']:10.1f} {vs_ort:7.2f} {best_torch / sec['fused']:8.2f}"
                      + f" {row['gflops']['fused'] / max(statistics.median(ceiling), numpy_ceiling[0] or 0.0):7.2f}"
                      + f"  kernel {row['fused_kernel_cpu_gflops']:5.1f} GF/s CPU"
                      + "  stages 1/2+3/4: " + "/".join(f"{100 * s:.0f}%" for s in row["fused_stage_share"]), flush=True)
        numpy_ceiling.append(numpy_sgemm_gflops(threads))
        torch_ceil = statistics.median(ceiling)
        numpy_samples = [c for c in numpy_ceiling if c is not None]
        numpy_ceil = statistics.median(numpy_samples) if numpy_samples else None
        ceil = max(torch_ceil, numpy_ceil or 0.0)
        results["ceiling_gflops"][threads] = ceil
        results.setdefault("ceiling_sources", {})[threads] = {"torch_mm": torch_ceil, "numpy_matmul": numpy_ceil}
        for row in rows:
            row["fused_vs_ceiling"] = row["gflops"]["fused"] / ceil
        results["layers"] += rows
        numpy_text = f"{numpy_ceil:.1f} (median of {len(numpy_samples)})" if numpy_ceil else "unavailable"
        print(f"ceiling (2048^2 sgemm, {threads} thread(s)): {ceil:.1f} GFLOP/s, the faster of torch.mm "
              f"{torch_ceil:.1f} (median of {len(ceiling)}) and numpy matmul {numpy_text}")
        print("geomean over layers and ranks:")
        if use_onnx:
            print(f"  fused vs ONNX Runtime 4-stage: {_geomean([r['seconds']['ort4'] / r['seconds']['fused'] for r in rows]):.2f}x")
        print(f"  fused vs faster PyTorch 4-stage: "
              f"{_geomean([min(r['seconds']['torch4'], r['seconds']['torch4_cl']) / r['seconds']['fused'] for r in rows]):.2f}x")
        print(f"  fused vs dense nn.Conv2d (faster layout): "
              f"{_geomean([min(r['seconds']['dense'], r['seconds']['dense_cl']) / r['seconds']['fused'] for r in rows]):.2f}x")
        print(f"  fused GFLOP/s / ceiling: {_geomean([r['fused_vs_ceiling'] for r in rows]):.2f}")
        print(f"  fused kernel alone (from its CPU-time counters, threads assumed fully busy) / ceiling: "
              f"{_geomean([r['fused_kernel_cpu_gflops'] / ceil for r in rows]):.2f}")
        print(f"  max relative error fused vs torch 4-stage: {max(r['max_relative_error']['fused'] for r in rows):.2e}")
        if args.model:
            model = benchmark_alexnet(threads, max(10, args.reps // 4), use_onnx, layer_set["alexnet_imagenet"]["ranks"])
            results["models"].append(model)
            print(f"AlexNet 224x224 (conv2-5 ranks {model['ranks']}), median ms: "
                  + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in model["seconds"].items())
                  + f"  (fused vs torch max rel. error {model['fused_vs_torch_error']:.1e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point for ``python -m cpconv.bench`` (the ``cpconv`` CLI registers ``bench`` too)."""
    parser = argparse.ArgumentParser(prog="cpconv bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ValueError as exc:  # a bad argument: one line and exit status 2, as the cpconv CLI does
        parser.error(str(exc))


if __name__ == "__main__":
    raise SystemExit(main())
