"""The ``cpconv`` command line: ``--help`` everywhere, ``demo --quick``, ``inspect``."""

import json
import subprocess
import sys

import pytest
import torch

import cpconv
from cpconv.cli import main


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["inspect", "--help"], ["bench", "--help"]])
def test_help_is_complete(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cpconv")
    if argv == ["--help"]:
        assert all(cmd in out for cmd in ("demo", "inspect", "bench"))
    if argv[0] == "inspect":
        assert "unpickled" in out and "trust" in out
    if argv[0] == "demo":
        assert all(opt in out for opt in ("--out", "--quick", "--schedule", "--seed", "--cache-dir"))


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: cpconv" in capsys.readouterr().out


def test_python_dash_m_runs():
    proc = subprocess.run([sys.executable, "-m", "cpconv", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"cpconv {cpconv.__version__}"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    status = main(["demo", "--quick", "--out", str(out), "--no-progress"])
    assert status == 0
    return out


def test_demo_quick_writes_everything(quick_demo, capsys):
    out = quick_demo
    for schedule in ("iterative", "static", "uniform"):
        assert (out / f"model_{schedule}.pt").is_file()
        report = cpconv.CompressionReport.load(out / f"report_{schedule}.json")
        assert report.finished and report.settings["schedule"] == schedule
    summary = json.loads((out / "comparison.json").read_text())
    assert [row["schedule"] for row in summary["rows"]] == ["dense", "iterative", "static", "uniform"]
    assert summary["dense_from_cache"] is False
    for row in summary["rows"]:
        assert 0 <= row["accuracy"] <= 1 and row["latency_ms"] > 0 and row["conv_params"] > 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "accuracy_vs_compression.png" in pngs
    assert any(p.startswith("spectrum_features_conv") for p in pngs)
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A compressed model is a working model.
    model = torch.load(out / "model_iterative.pt", weights_only=False)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_demo_second_run_uses_the_cache(quick_demo, capsys):
    status = main(["demo", "--quick", "--out", str(quick_demo), "--no-progress", "--schedule", "static"])
    assert status == 0
    out = capsys.readouterr().out
    assert "loaded from cache" in out
    summary = json.loads((quick_demo / "comparison.json").read_text())
    assert summary["dense_from_cache"] is True
    assert [row["schedule"] for row in summary["rows"]] == ["dense", "static"]
    assert "model  " in out and "static" in out  # the comparison table


def test_inspect_dense_and_compressed(quick_demo, capsys):
    assert main(["inspect", str(quick_demo / "model_dense.pt"), "--input-shape", "1,28,28"]) == 0
    out = capsys.readouterr().out
    for i in range(1, 6):
        assert f"features.conv{i}" in out
    assert "ranks out/in" in out and "one input channel" in out
    assert main(["inspect", str(quick_demo / "model_static.pt"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kinds = {layer["name"]: layer["kind"] for layer in data["layers"]}
    assert kinds["features.conv1"] == "Conv2d"
    report = cpconv.CompressionReport.load(quick_demo / "report_static.json")
    for layer in report.layers:
        assert kinds[layer.name] == ("CPConv2d" if layer.status == "compressed" else "Conv2d")


def test_inspect_bad_files(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 2
    assert "no such model file" in capsys.readouterr().err
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state.pt")
    assert main(["inspect", str(tmp_path / "state.pt")]) == 2
    assert "not a model" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert main(["inspect", str(tmp_path / "junk.pt")]) == 2
    assert "could not be loaded" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "state.pt"), "--input-shape", "a,b"]) == 2
    assert "--input-shape must look like" in capsys.readouterr().err


def test_demo_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--schedule", "greedy"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
