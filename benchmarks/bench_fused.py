"""pytest-benchmark: the fused CP convolution vs PyTorch's and ONNX Runtime's four stages.

Run from the repository root (needs the ``bench`` extra)::

    python -m pytest benchmarks/bench_fused.py --benchmark-group-by=param:layer,param:rank,param:threads

Layer shapes come from the package's ``bench_layers.json`` (the same file ``cpconv bench`` reads).
Every benchmark also checks its answer against the torch four-stage path. ``cpconv bench`` is the
interleaved, ratio-oriented version of the same comparison; BENCHMARKS.md records its results.
"""

from __future__ import annotations

import pytest
import torch

from cpconv import CPConv2d
from cpconv.bench import four_stage_sequential, load_layer_set, onnxruntime_session

LAYER_SET = load_layer_set()
LAYERS = {spec["name"]: spec for spec in LAYER_SET["layers"]}
RANKS = [64, 200]
THREADS = [1, 2]
TOLERANCE = 1e-4


def make_layer(spec: dict, rank: int, threads: int):
    torch.manual_seed(0)
    layer = CPConv2d(spec["in_channels"], spec["out_channels"], spec["kernel_size"], rank,
                     padding=spec.get("padding", 0)).eval().requires_grad_(False)
    layer.fused_threads = threads
    hw = spec["input_hw"]
    return layer, torch.randn(1, spec["in_channels"], hw, hw)


def relative_error(actual, expected) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(params=THREADS, ids=lambda t: f"threads={t}")
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("contender", ["fused", "torch4", "torch4_cl", "ort4"])
def test_four_stage_latency(benchmark, layer, rank, contender, threads):
    spec = LAYERS[layer]
    module, x = make_layer(spec, rank, threads)
    stages = four_stage_sequential(module)
    with torch.inference_mode():
        expected = stages(x)
        if contender == "fused":
            out = benchmark(module, x)
        elif contender == "torch4":
            out = benchmark(stages, x)
        elif contender == "torch4_cl":
            stages_cl = four_stage_sequential(module).to(memory_format=torch.channels_last)
            out = benchmark(stages_cl, x.to(memory_format=torch.channels_last))
        else:
            pytest.importorskip("onnxruntime")
            run = onnxruntime_session(stages, x, threads)
            x_np = x.numpy()
            out = torch.from_numpy(benchmark(run, x_np))
    benchmark.extra_info.update(macs=module.flops((spec["input_hw"],) * 2), layer=layer, rank=rank)
    assert relative_error(out, expected) <= TOLERANCE


@pytest.mark.parametrize("layer", ["alexnet.conv3", "vgg16.conv3_1"])
def test_dense_latency(benchmark, layer, threads):
    spec = LAYERS[layer]
    module, x = make_layer(spec, 128, threads)
    dense = module.to_conv().eval()
    with torch.inference_mode():
        out = benchmark(dense, x)
        expected = torch.nn.functional.conv2d(x, module.dense_weight(), module.bias, padding=spec["padding"])
    assert relative_error(out, expected) <= TOLERANCE
