"""Time per CP-ALS iteration: cpconv.cp_als (C++) vs tensorly.decomposition.parafac (numpy backend).

Not a test. Both run on ONE thread (OMP/OPENBLAS/MKL thread variables set to 1 before numpy is imported,
threadpoolctl limits, cpconv num_threads=1) on a 256x96x5x5 float32 tensor shaped like a trained
AlexNet conv2 kernel, at R = 64 and R = 200, from the same initial factors. Measurements are
interleaved (cpconv, tensorly, cpconv, ... per rank) and the medians reported.

Per-iteration time = (time of a run with n iterations - time of a run with 0 iterations) / n for
cpconv, so its fixed costs (validation, final exact error) are excluded; TensorLy's fixed costs are
tiny next to its iterations and are simply divided in. TensorLy runs with tol=1e-12 so that, like
cpconv, it computes the error every iteration (with tol=0 it would skip it).

Usage::

    python benchmarks/bench_cp_als.py [--repeats 5] [--ranks 64 200] [--threads 1 2]
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorly as tl  # noqa: E402
import torch  # noqa: E402
from tensorly.cp_tensor import CPTensor  # noqa: E402
from tensorly.decomposition import parafac  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

import cpconv  # noqa: E402

SHAPE = (256, 96, 5, 5)


def trained_like_kernel(seed: int = 0) -> np.ndarray:
    """A 256x96x5x5 float32 kernel with the spectrum of a trained layer: 400 rank-one terms with
    power-law decaying weights (smooth-ish spatial profiles), plus 10% dense noise."""
    rng = np.random.default_rng(seed)
    terms = 400
    weights = (1.0 + np.arange(terms)) ** -0.8
    out_f = rng.standard_normal((SHAPE[0], terms))
    in_f = rng.standard_normal((SHAPE[1], terms))
    grid = np.linspace(-1, 1, 5)[:, None]
    vert = np.exp(-((grid - rng.uniform(-1, 1, terms)) ** 2) / rng.uniform(0.2, 1.5, terms))
    horz = np.exp(-((grid - rng.uniform(-1, 1, terms)) ** 2) / rng.uniform(0.2, 1.5, terms))
    kernel = np.einsum("r,ar,br,cr,dr->abcd", weights, out_f, in_f, vert, horz)
    noise = rng.standard_normal(SHAPE)
    kernel += 0.1 * np.linalg.norm(kernel) / np.linalg.norm(noise) * noise
    return (kernel / np.abs(kernel).max() * 0.05).astype(np.float32)


def time_cpconv(x, start, n_iter, threads):
    t0 = time.perf_counter()
    base = cpconv.cp_als(x, start.rank, init=start, max_iter=0, num_threads=threads)
    t1 = time.perf_counter()
    result = cpconv.cp_als(x, start.rank, init=start, max_iter=n_iter, tol=0.0, num_threads=threads)
    t2 = time.perf_counter()
    del base
    return ((t2 - t1) - (t1 - t0)) / n_iter, result.rel_error


def time_tensorly(x, start, n_iter):
    init = CPTensor((np.ones(start.rank, dtype=x.dtype), [f.copy() for f in start.factors]))
    t0 = time.perf_counter()
    cp = parafac(x, start.rank, n_iter_max=n_iter, init=init, tol=1e-12)
    t1 = time.perf_counter()
    x64 = x.astype(np.float64)
    err = np.linalg.norm(x64 - tl.cp_to_tensor(cp).astype(np.float64)) / np.linalg.norm(x64)
    return (t1 - t0) / n_iter, float(err)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 200])
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="cpconv thread counts, timed interleaved (TensorLy always 1)")
    parser.add_argument("--cpconv-iters", type=int, default=30)
    parser.add_argument("--tensorly-iters", type=int, default=4)
    args = parser.parse_args()

    tl.set_backend("numpy")
    torch.set_num_threads(1)
    x = trained_like_kernel()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
          f"torch {torch.__version__}, numpy {np.__version__}, tensorly {tl.__version__}")
    print(f"load average before: {os.getloadavg()}")
    print(f"tensor {SHAPE} float32; cpconv threads={args.threads}, tensorly threads=1")
    with threadpool_limits(limits=1):
        for rank in args.ranks:
            start = cpconv.cp_als(x, rank, init="svd", seed=0, max_iter=0)
            ours = {nt: [] for nt in args.threads}
            theirs = []
            for _ in range(args.repeats):
                for nt in args.threads:
                    ours[nt].append(time_cpconv(x, start, args.cpconv_iters, nt)[0])
                theirs.append(time_tensorly(x, start, args.tensorly_iters)[0])
            # Quality at the same number of iterations from the same start.
            same = cpconv.cp_als(x, rank, init=start, max_iter=args.tensorly_iters, tol=0.0)
            _, err_theirs = time_tensorly(x, start, args.tensorly_iters)
            t = statistics.median(theirs)
            print(f"R={rank:4d}: tensorly {t * 1e3:8.1f} ms/iter (min {min(theirs) * 1e3:.1f}); rel. error after "
                  f"{args.tensorly_iters} iters from the same init: cpconv {same.rel_error:.6f}, tensorly {err_theirs:.6f}")
            for nt, times in ours.items():
                o = statistics.median(times)
                print(f"        cpconv {nt} thread(s) {o * 1e3:8.2f} ms/iter (min {min(times) * 1e3:.2f}), "
                      f"speed-up x{t / o:.1f} (ratio of medians)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
