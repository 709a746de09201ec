"""Where the fused layer's time goes beyond the kernel: call overhead and cold caches (1 thread).

Usage: ``python benchmarks/fused_overhead.py [C N k H R]`` (default: AlexNet conv3, R=64).

Times, as thread CPU time (immune to other processes on a shared machine), medians of 40 rounds:

1. The call. ``kernel`` = the C++ kernel called directly on packed weights into a preallocated
   output; ``kernel+alloc`` = the eager layer's extension call (``_core.fused.forward``: a new
   output array per call) and ``torch.from_numpy``; ``layer`` = ``CPConv2d.__call__`` in inference
   mode (the eager fused path); ``ort`` = ONNX Runtime's 4-stage session (reference point). Each hot
   (calls back to back) and cold (16 MiB of other data read before each call, as between layers
   of a network).
2. The kernel's own counters (stage 1, stages 2+3, stage 4), hot and cold.
3. Which data makes a cold call slow: the kernel after the 16 MiB read, then with parts warmed
   again before the call: its input and output (numpy reads), the packed weights (a call on a 1x1
   input), or everything it touches except x and y (a call of the same shape on other arrays).
4. The machine's read bandwidth after the same 16 MiB read (numpy sum over an array of the size of
   the layer's input + weights + output): the floor on moving that data once from memory.
5. The Python side of a cold call, piece by piece, each after the 16 MiB read: a bare lambda, the
   torch calls the eager path makes, ``nn.Module.__call__`` of a module whose forward is only
   ``torch.from_numpy(extension(x.numpy()))`` (the least an eager torch-free layer can do), and
   ``layer(x)``.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from cpconv import CPConv2d, _core, fused
from cpconv.bench import four_stage_sequential, onnxruntime_session

ROUNDS = 40


def median_us(times) -> float:
    return statistics.median(times) * 1e6


def main(argv) -> None:
    C, N, k, H, R = (int(v) for v in argv) if argv else (256, 384, 3, 13, 64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = CPConv2d(C, N, k, R, padding=k // 2).eval().requires_grad_(False)
    layer.fused_threads = 1
    x = torch.randn(1, C, H, H)
    xn = x.numpy()
    packed = fused.pack_weights(layer.factors, layer.bias)
    y = np.empty((1, N, H, H), dtype=np.float32)
    pad = (k // 2, k // 2)
    ort = onnxruntime_session(four_stage_sequential(layer), x, 1)
    junk = np.ones(16 << 20, dtype=np.uint8)

    def kernel(inp=xn, out=y, profile=False):
        return _core.fused.cp_conv2d(inp, packed, out, (1, 1), pad, (1, 1), 1, "auto", profile)

    contenders = {
        "kernel": kernel,
        "kernel+alloc": lambda: torch.from_numpy(_core.fused.forward(xn, packed, (1, 1), pad, (1, 1), 1)),
        "layer": lambda: layer(x),
        "ort": lambda: ort(xn),
    }
    print(f"C={C} N={N} k={k} H=W={H} R={R}, 1 thread, thread CPU time, median of {ROUNDS} rounds")
    with torch.inference_mode():
        for f in contenders.values():
            f()
        for mode in ("hot", "cold"):
            times = {n: [] for n in contenders}
            for _ in range(ROUNDS):
                for name, f in contenders.items():
                    if mode == "cold":
                        junk.sum()
                    else:
                        f()
                    t0 = time.thread_time()
                    f()
                    times[name].append(time.thread_time() - t0)
            print(f"{mode:5s} " + "  ".join(f"{n} {median_us(t):7.0f} us" for n, t in times.items()))

    for mode in ("hot", "cold"):
        split = []
        for _ in range(ROUNDS):
            junk.sum() if mode == "cold" else kernel()
            split.append(kernel(profile=True))
        print(f"kernel stages ({mode}, us): stage 1 %.0f, stages 2+3 %.0f, stage 4 %.0f"
              % tuple(np.median(np.array(split), axis=0) * 1e6))

    tiny_x = np.random.default_rng(0).random((1, C, 1, 1), dtype=np.float32)
    tiny_y = np.empty((1, N, 1, 1), dtype=np.float32)
    other_x, other_y = np.random.default_rng(1).random(xn.shape, dtype=np.float32), np.empty_like(y)
    conditions = {
        "hot": kernel,
        "cold": lambda: None,
        "cold, x and y warm": lambda: (xn.sum(), y.sum()),
        "cold, weights warm": lambda: kernel(tiny_x, tiny_y),
        "cold, x, y, weights warm": lambda: (kernel(tiny_x, tiny_y), xn.sum(), y.sum()),
        "cold, all but x and y warm": lambda: kernel(other_x, other_y),
        "cold, all warm": lambda: (kernel(other_x, other_y), xn.sum(), y.sum()),
    }
    times = {n: [] for n in conditions}
    for _ in range(ROUNDS):
        for name, warm in conditions.items():
            if name != "hot":
                junk.sum()
            warm()
            t0 = time.thread_time()
            kernel()
            times[name].append(time.thread_time() - t0)
    print("kernel after a 16 MiB read, parts warmed again (us): "
          + ", ".join(f"{n} {median_us(t):.0f}" for n, t in times.items()))

    data_bytes = xn.nbytes + packed.nbytes + y.nbytes
    block = np.ones(data_bytes // 4, dtype=np.float32)
    reads = []
    for _ in range(ROUNDS):
        junk.sum()
        t0 = time.perf_counter()
        block.sum()
        reads.append(time.perf_counter() - t0)
    seconds = statistics.median(reads)
    print(f"reading {data_bytes >> 10} KiB (x + packed weights + y) after the 16 MiB read: {seconds * 1e6:.0f} us "
          f"= {data_bytes / seconds / 1e9:.1f} GB/s")

    class Minimal(torch.nn.Module):
        def forward(self, inp):
            return torch.from_numpy(_core.fused.forward(inp.numpy(), packed, (1, 1), pad, (1, 1), 1))

    minimal, U = Minimal(), layer.out_factor
    y_array = _core.fused.forward(xn, packed, (1, 1), pad, (1, 1), 1)
    pieces = {
        "lambda: None": lambda: None,
        "x.numpy()": lambda: x.numpy(),
        "torch.from_numpy": lambda: torch.from_numpy(y_array),
        "torch.empty": lambda: torch.empty(y_array.shape),
        "torch.compiler.is_compiling()": torch.compiler.is_compiling,
        "torch.jit.is_tracing()": torch.jit.is_tracing,
        "4 x (_version, data_ptr())": lambda: (U._version, U.data_ptr(), U._version, U.data_ptr(), U._version,
                                               U.data_ptr(), U._version, U.data_ptr()),
        "extension call": lambda: _core.fused.forward(xn, packed, (1, 1), pad, (1, 1), 1),
        "minimal module": lambda: minimal(x),
        "layer(x)": lambda: layer(x),
    }
    times = {n: [] for n in pieces}
    with torch.inference_mode():
        for _ in range(ROUNDS):
            for name, f in pieces.items():
                junk.sum()
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
    print("cold Python pieces, wall time (us): " + ", ".join(f"{n} {median_us(t):.1f}" for n, t in times.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
