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


# torch's own deprecation of TorchScript
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inspect_names_deployment_archives(tmp_path, capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    torch.jit.save(torch.jit.trace(model, x), tmp_path / "traced.pt")
    assert main(["inspect", str(tmp_path / "traced.pt")]) == 2
    assert "is a TorchScript archive" in capsys.readouterr().err
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "exported.pt2")
    assert main(["inspect", str(tmp_path / "exported.pt2")]) == 2
    assert "is a torch.export archive" in capsys.readouterr().err


def test_demo_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--schedule", "greedy"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.fixture
def small_model(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3)), path)
    return str(path)


def _usage_error(argv, capsys) -> str:
    """Run ``cpconv argv``, expect an argparse error (exit status 2); its last stderr line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_inspect_method_options(small_model, capsys):
    assert "--method vbmf needs --prior" in _usage_error(["inspect", small_model, "--method", "vbmf"], capsys)
    assert "--method ratio needs --ratio" in _usage_error(["inspect", small_model, "--method", "ratio"], capsys)
    assert "--prior applies to --method vbmf only" in _usage_error(["inspect", small_model, "--prior", "1"], capsys)
    assert "--energy" in _usage_error(["inspect", small_model, "--method", "energy", "--energy", "1.5"], capsys)
    assert "--ratio" in _usage_error(["inspect", small_model, "--method", "ratio", "--ratio", "0"], capsys)
    assert "--weakening" in _usage_error(["inspect", small_model, "--weakening", "2"], capsys)
    assert "--weakening applies" in _usage_error(["inspect", small_model, "--method", "energy",
                                                  "--weakening", "0.5"], capsys)
    assert main(["inspect", small_model, "--method", "vbmf", "--prior", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["settings"]["method"] == "vbmf" and data["settings"]["options"] == {"prior": 1.0}
    assert main(["inspect", small_model, "--method", "ratio", "--ratio", "3"]) == 0
    assert "rank selection ratio, ratio=3.0" in capsys.readouterr().out


def test_inspect_int_rank(small_model, capsys):
    assert main(["inspect", small_model, "--method", "5", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [layer["rank"] for layer in data["layers"]] == [5, 5]
    for bad in ("0", "-2"):
        assert "an int rank must be >= 1" in _usage_error(["inspect", small_model, "--method", bad], capsys)
    assert "must be one of evbmf" in _usage_error(["inspect", small_model, "--method", "foo"], capsys)


def test_inspect_input_shape_errors(small_model, capsys):
    assert main(["inspect", small_model, "--input-shape", "4,12,12"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "(4, 12, 12)" in err and "takes 3 input channels" in err
    assert main(["inspect", small_model, "--input-shape", "3,2,2"]) == 2
    assert "(3, 2, 2) does not fit the model" in capsys.readouterr().err
    for bad in ("", "3,12", "3,0,12", "3,,12", "a,b,c"):
        assert main(["inspect", small_model, "--input-shape", bad]) == 2
        assert "--input-shape must look like" in capsys.readouterr().err


def test_inspect_error_has_no_traceback(small_model):
    proc = subprocess.run([sys.executable, "-m", "cpconv", "inspect", small_model, "--input-shape", "4,12,12"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("cpconv inspect: error: input shape")


@pytest.fixture
def no_demo_data(monkeypatch):
    """Make any demo run that gets as far as loading the digits fail loudly."""
    def load_digits():
        raise AssertionError("the demo loaded its data before rejecting its arguments")
    monkeypatch.setattr("cpconv.demo.run.load_digits", load_digits)


@pytest.mark.parametrize("args, option", [
    (["--weakening", "2"], "--weakening"),
    (["--uniform-ratio", "-1"], "--uniform-ratio"),
    (["--uniform-ratio", "nan"], "--uniform-ratio"),
    (["--finetune-batches", "0"], "--finetune-batches"),
    (["--train-epochs", "0"], "--train-epochs"),
    (["--threads", "0"], "--threads"),
    (["--seed", "-1"], "--seed"),
    (["--out", "FILE"], "--out"),
    (["--cache-dir", "FILE"], "--cache-dir"),
])
def test_demo_arguments_are_checked_up_front(args, option, tmp_path, no_demo_data, capsys):
    (tmp_path / "afile").write_text("")
    args = [str(tmp_path / "afile") if a == "FILE" else a for a in args]
    argv = ["demo", "--quick", "--no-progress", "--out", str(tmp_path / "out")] + args
    assert option in _usage_error(argv, capsys)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weakening=2.0), "weakening"),
    (dict(uniform_ratio=-1.0), "uniform_ratio"),
    (dict(finetune_batches=0), "finetune_batches"),
    (dict(seed=-1), "seed"),
    (dict(combine="median"), "combine"),
    (dict(cache_dir="FILE"), "cache_dir"),
    (dict(out_dir="FILE"), "out_dir"),
])
def test_run_demo_checks_arguments_before_loading_data(kwargs, match, tmp_path, no_demo_data):
    from cpconv.demo import run_demo

    (tmp_path / "afile").write_text("")
    kwargs = {k: str(tmp_path / "afile") if v == "FILE" else v for k, v in kwargs.items()}
    kwargs.setdefault("out_dir", str(tmp_path / "out"))
    with pytest.raises(ValueError, match=match):
        run_demo(quick=True, progress=False, log=lambda s: None, **kwargs)


def test_inspect_shows_rank_selection_warnings_as_notes(small_model, monkeypatch, capsys):
    import warnings

    real = cpconv.select_rank

    def select_rank(*args, **kwargs):
        warnings.warn("the requested ratio is not met", UserWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpconv, "select_rank", select_rank)
    assert main(["inspect", small_model]) == 0
    assert "note: 1: the requested ratio is not met" in capsys.readouterr().out
