"""Whole-model latency of the demo's MNIST CNN: dense vs compressed, in PyTorch, fused and ONNX Runtime.

Usage: ``cpconv demo --out DIR`` first, then ``python benchmarks/bench_demo_model.py DIR [--reps N]``.
Batch 1, 28x28 input; one and two threads; contenders interleaved (cpconv.bench.interleaved_medians).
"""

import argparse
import os

import torch

from cpconv import CPConv2d
from cpconv.bench import interleaved_medians, onnxruntime_session
from cpconv.fused import fused_disabled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo_dir", help="the --out folder of a finished `cpconv demo` run")
    parser.add_argument("--schedule", default="iterative", help="which compressed model (default: iterative)")
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    load = lambda name: torch.load(os.path.join(args.demo_dir, name), weights_only=False).eval()  # noqa: E731
    dense, compressed = load("model_dense.pt"), load(f"model_{args.schedule}.pt")
    x = torch.randn(1, 1, 28, 28)
    print(f"load average {os.getloadavg()[0]:.2f}; ranks "
          f"{[m.rank for m in compressed.modules() if isinstance(m, CPConv2d)]}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for m in compressed.modules():
            if isinstance(m, CPConv2d):
                m.fused_threads = threads
        dense_ort = onnxruntime_session(dense, x, threads)
        cp_ort = onnxruntime_session(compressed, x, threads)
        # Each contender reads its own copy of the input (see interleaved_medians).
        own = [x.clone() for _ in range(5)]
        x_dense_ort, x_cp_ort = own[3].numpy(), own[4].numpy()

        def cp_torch():
            with fused_disabled():
                return compressed(own[1])

        contenders = {
            "dense torch": lambda: dense(own[0]),
            "compressed torch 4-stage": cp_torch,
            "compressed fused": lambda: compressed(own[2]),
            "dense ORT": lambda: dense_ort(x_dense_ort),
            "compressed ORT": lambda: cp_ort(x_cp_ort),
        }
        with torch.inference_mode():
            medians = interleaved_medians(contenders, args.reps)
        base = medians["dense torch"]
        print(f"\n{threads} thread(s), batch 1, medians of {args.reps} interleaved rounds")
        for name, seconds in medians.items():
            print(f"  {name:26s} {seconds * 1e3:7.3f} ms   {base / seconds:5.2f}x vs dense torch")


if __name__ == "__main__":
    main()
