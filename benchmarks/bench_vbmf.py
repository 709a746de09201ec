"""Time EVBMF on conv-kernel unfoldings: the LAPACK SVD vs the C++ analytic solve.

Run: python benchmarks/bench_vbmf.py   (prints a markdown table; medians of interleaved repeats)
"""

import statistics
import time

import numpy as np
import torch

import cpconv
from cpconv import _core

LAYERS = {  # name: (N, C, kh, kw)
    "AlexNet conv2": (256, 96, 5, 5),
    "AlexNet conv3": (384, 256, 3, 3),
    "VGG-16 conv3_1": (256, 128, 3, 3),
    "VGG-16 conv5_1": (512, 512, 3, 3),
}


def main(repeats: int = 7) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    print("| layer | unfolding | L x M | SVD (ms) | C++ solve (ms) | evbmf() total (ms) | rank |")
    print("|---|---|---|---|---|---|---|")
    for name, (n, c, kh, kw) in LAYERS.items():
        w = rng.standard_normal((n, c, kh, kw)) * 0.01
        # a planted rank-32 structure so that the solve has signal to find
        w += np.einsum("nr,cr,ir,jr->ncij", *(rng.standard_normal((d, 32)) for d in (n, c, kh, kw))) * 0.002
        for mode, mat in (("output", w.reshape(n, -1)), ("input", w.transpose(1, 0, 2, 3).reshape(c, -1))):
            sv = np.linalg.svd(mat, compute_uv=False)
            frob = float(np.sum(mat**2))
            t_svd, t_solve, t_total = [], [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                np.linalg.svd(mat, compute_uv=False)
                t1 = time.perf_counter()
                _core.vbmf.evbmf(sv, min(mat.shape), max(mat.shape), frob)
                t2 = time.perf_counter()
                res = cpconv.evbmf(mat)
                t3 = time.perf_counter()
                t_svd.append(t1 - t0)
                t_solve.append(t2 - t1)
                t_total.append(t3 - t2)
            print(f"| {name} | {mode} | {mat.shape[0]} x {mat.shape[1]} | {statistics.median(t_svd) * 1e3:.1f} | "
                  f"{statistics.median(t_solve) * 1e3:.2f} | {statistics.median(t_total) * 1e3:.1f} | {res.rank} |")


if __name__ == "__main__":
    main()
