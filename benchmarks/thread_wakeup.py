"""What waking the second OpenMP thread costs a small fused layer (AlexNet conv3, R=64, batch 1).

Usage: ``python benchmarks/thread_wakeup.py``. Wall time of ``layer(x)``, medians of 200 calls: back to
back (the worker thread still spinning from the previous call), and after the caller slept for 0.2, 2
and 20 ms (the idle gap a layer sees when other work runs between its calls: libgomp's workers spin
for a while after a parallel region, then sleep in the kernel and must be woken).
"""

from __future__ import annotations

import statistics
import time

import torch

from cpconv import CPConv2d


def main() -> None:
    torch.manual_seed(0)
    layer = CPConv2d(256, 384, 3, 64, padding=1).eval().requires_grad_(False)
    x = torch.randn(1, 256, 13, 13)
    with torch.inference_mode():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layer.fused_threads = threads
            row = {}
            for gap in (0.0, 0.0002, 0.002, 0.02):
                for _ in range(20):
                    layer(x)
                times = []
                for _ in range(200 if gap < 0.02 else 60):
                    if gap:
                        time.sleep(gap)
                    t0 = time.perf_counter()
                    layer(x)
                    times.append(time.perf_counter() - t0)
                row["back to back" if not gap else f"after {gap * 1e3:g} ms idle"] = statistics.median(times) * 1e6
            print(f"{threads} thread(s): " + ", ".join(f"{k} {v:.0f} us" for k, v in row.items()))


if __name__ == "__main__":
    main()
