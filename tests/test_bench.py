"""``cpconv bench`` (python/cpconv/bench.py): its peers compute the same function, and it runs."""

from __future__ import annotations

import argparse

import pytest
import torch

from cpconv import CPConv2d
from cpconv import bench


def test_four_stage_sequential_matches_layer():
    torch.manual_seed(0)
    layer = CPConv2d(6, 10, (3, 5), 7, padding=(1, 2), stride=(2, 1), dilation=(1, 2)).eval()
    x = torch.randn(2, 6, 11, 12)
    with torch.no_grad():
        expected = layer._forward_stages(x)
        assert torch.allclose(bench.four_stage_sequential(layer)(x), expected, rtol=1e-5, atol=1e-6)


def test_four_stage_sequential_rejects_pre_padding():
    with pytest.raises(ValueError, match="symmetric zero padding"):
        bench.four_stage_sequential(CPConv2d(4, 4, 3, 4, padding=1, padding_mode="reflect"))


def test_layer_set_file_is_complete():
    layer_set = bench.load_layer_set()
    names = {spec["name"] for spec in layer_set["layers"]}
    assert {"alexnet.conv2", "alexnet.conv5", "vgg16.conv3_1", "resnet18.layer3"} <= names
    assert layer_set["ranks"] == [64, 128, 200, 256]


def test_bench_runs_and_reports(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--threads", "1", "--layers", "alexnet.conv3", "--ranks", "8", "--reps", "2",
                              "--no-onnx"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "alexnet.conv3" in out and "fused vs faster PyTorch 4-stage" in out
    with pytest.raises(ValueError, match="--layers"):
        bench.run(parser.parse_args(["--layers", "nosuchlayer", "--no-onnx"]))
    with pytest.raises(ValueError, match="--threads"):
        bench.run(parser.parse_args(["--threads", "0", "--no-onnx"]))


def test_interleaved_medians_times_every_call_in_shuffled_rounds():
    calls = []
    contenders = {name: (lambda n=name: calls.append(n)) for name in "abcd"}
    medians = bench.interleaved_medians(contenders, reps=30, burst=3)
    assert set(medians) == set("abcd") and all(m >= 0 for m in medians.values())
    timed = calls[8:]  # after two warm-up calls each
    assert sorted(calls[:8]) == sorted("abcd" * 2) and len(timed) == 30 * 4 * 3
    rounds = ["".join(timed[i:i + 12:3]) for i in range(0, len(timed), 12)]
    assert all(sorted(r) == list("abcd") for r in rounds)  # each contender once per round, burst kept together
    # Shuffled, not rotated: a contender does not always follow the same one.
    predecessors = {(r[i - 1], r[i]) for r in rounds for i in range(1, 4)}
    assert len({p for p, n in predecessors if n == "a"}) > 1


def test_numpy_sgemm_ceiling_is_measured():
    gflops = bench.numpy_sgemm_gflops(1, size=256, reps=3)
    assert gflops is not None and gflops > 0


def test_bench_checks_json_path_before_benchmarking(tmp_path, monkeypatch, capsys):
    def benchmark_layer(*args, **kwargs):
        raise AssertionError("benchmarked before checking --json")
    monkeypatch.setattr(bench, "benchmark_layer", benchmark_layer)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for path in (tmp_path / "missing" / "x.json", tmp_path):
        with pytest.raises(ValueError, match="--json"):
            bench.run(parser.parse_args(["--threads", "1", "--layers", "alexnet.conv3", "--ranks", "8", "--reps", "1",
                                         "--no-onnx", "--json", str(path)]))
    from cpconv.cli import main

    assert main(["bench", "--no-onnx", "--json", str(tmp_path / "missing" / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cpconv bench: error: --json") and len(err.strip().splitlines()) == 1
