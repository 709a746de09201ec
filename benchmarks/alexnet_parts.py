"""Where the compressed AlexNet's time goes in PyTorch: its modules timed one by one (batch 1, 224x224).

Usage: ``python benchmarks/alexnet_parts.py [threads]`` (default 1). The model is ``cpconv bench
--model``'s (``cpconv.bench.alexnet_imagenet``: random weights, conv2-conv5 as CPConv2d at the layer
set's fixed ranks, run by the fused kernel); each module is timed on its real input, medians of 30
passes, summed by kind. Shows how much of the whole-model latency the CP layers are.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn

from cpconv import CPConv2d, bench


def main(argv) -> None:
    threads = int(argv[0]) if argv else 1
    torch.set_num_threads(threads)
    ranks = bench.load_layer_set()["alexnet_imagenet"]["ranks"]
    for name, model in (("dense", bench.alexnet_imagenet()), ("compressed", bench.alexnet_imagenet(ranks))):
        for m in model.modules():
            if isinstance(m, CPConv2d):
                m.fused_threads = threads
        x = torch.randn(1, 3, 224, 224)
        times = [[] for _ in model]
        with torch.inference_mode():
            for _ in range(30):
                h = x
                for i, module in enumerate(model):
                    t0 = time.perf_counter()
                    h = module(h)
                    times[i].append(time.perf_counter() - t0)
        parts = {"conv1": 0.0, "conv2-conv5": 0.0, "Linear": 0.0, "ReLU/pool/flatten": 0.0}
        convs = 0
        for module, t in zip(model, times):
            ms = statistics.median(t) * 1e3
            if isinstance(module, (nn.Conv2d, CPConv2d)):
                parts["conv1" if convs == 0 else "conv2-conv5"] += ms
                convs += 1
            elif isinstance(module, nn.Linear):
                parts["Linear"] += ms
            else:
                parts["ReLU/pool/flatten"] += ms
        print(f"{name:10s} {threads} thread(s): sum {sum(parts.values()):6.2f} ms = "
              + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
