"""Where the fused layer's time goes beyond the kernel: call overhead and cold caches (1 thread).

Usage: ``python benchmarks/fused_overhead.py [C N k H R]`` (default: AlexNet conv3, R=64).

Times, as thread CPU time (immune to other processes on a shared machine), medians of 40 rounds:

- ``kernel``        the C++ kernel called directly on packed weights into a preallocated output
- ``kernel+alloc``  the same with a fresh ``torch.empty`` output per call
- ``layer``         ``CPConv2d.__call__`` in inference mode (the eager fused path)
- ``ort``           ONNX Runtime's 4-stage session (reference point)

each measured twice: hot (calls back to back) and cold (16 MiB of other data read before each
call, as between layers of a network). The kernel's own counters split its time into stage 1,
stages 2+3 and stage 4.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from cpconv import CPConv2d, _core, fused
from cpconv.bench import four_stage_sequential, onnxruntime_session


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

    def kernel_alloc():
        out = torch.empty((1, N, H, H))
        _core.fused.cp_conv2d(xn, packed, out.numpy(), (1, 1), pad, (1, 1), 1, "auto", False)

    contenders = {
        "kernel": lambda: _core.fused.cp_conv2d(xn, packed, y, (1, 1), pad, (1, 1), 1, "auto", False),
        "kernel+alloc": kernel_alloc,
        "layer": lambda: layer(x),
        "ort": lambda: ort(xn),
    }
    print(f"C={C} N={N} k={k} H=W={H} R={R}, 1 thread, thread CPU time, median of 40 rounds")
    with torch.inference_mode():
        for name, f in contenders.items():
            f()
        for mode in ("hot", "cold"):
            times = {n: [] for n in contenders}
            for _ in range(40):
                for name, f in contenders.items():
                    if mode == "cold":
                        junk.sum()
                    else:
                        f()
                    t0 = time.thread_time()
                    f()
                    times[name].append(time.thread_time() - t0)
            print(f"{mode:5s} " + "  ".join(f"{n} {statistics.median(t) * 1e6:7.0f} us" for n, t in times.items()))
        split = np.zeros(3)
        for _ in range(20):
            split += _core.fused.cp_conv2d(xn, packed, y, (1, 1), pad, (1, 1), 1, "auto", True)
        print("kernel stages (hot, us): stage 1 %.0f, stages 2+3 %.0f, stage 4 %.0f" % tuple(split / 20 * 1e6))


if __name__ == "__main__":
    main(sys.argv[1:])
