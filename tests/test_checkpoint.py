"""Checkpoint/resume of ``cpconv.compress``: a real process killed mid-run, corrupt folders, failures."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import cpconv
from cpconv import CheckpointError, CompressionReport, compress

from compress_worker import build_model

HERE = os.path.dirname(__file__)
WORKER = os.path.join(HERE, "compress_worker.py")


def _run_worker(ckpt, out, delay):
    return subprocess.Popen([sys.executable, WORKER, str(ckpt), str(out), str(delay)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finished_layers(ckpt):
    try:
        with open(os.path.join(ckpt, "manifest.json")) as f:
            return json.load(f)["finished_layers"]
    except (OSError, ValueError):
        return 0


def _steps(out):
    with open(str(out) + ".steps") as f:
        return [int(s) for s in f.read().split()]


def _layers_without_time(report):
    return [{k: v for k, v in layer.to_dict().items() if k != "seconds"} for layer in report.layers]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = _run_worker(tmp / "ckpt", tmp / "out", 0)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output.decode()
    return torch.load(tmp / "out.pt", weights_only=True), CompressionReport.load(tmp / "out.json")


@pytest.mark.parametrize("kill_after", [1, 3])
def test_kill_and_resume_equals_uninterrupted_run(tmp_path, uninterrupted, kill_after):
    ref_state, ref_report = uninterrupted
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    proc = _run_worker(ckpt, out, 1.0)  # each layer's fine_tune sleeps 1 s: a window to kill in
    deadline = time.monotonic() + 240
    while _finished_layers(ckpt) < kill_after:
        assert proc.poll() is None, proc.communicate()[0].decode()
        assert time.monotonic() < deadline, "worker too slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: during the next layer's decomposition or fine-tuning
    proc.communicate()
    done = _finished_layers(ckpt)
    assert kill_after <= done < 4 and not os.path.exists(str(out) + ".pt")
    steps_before = _steps(out)

    proc = _run_worker(ckpt, out, 0)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output.decode()
    steps = _steps(out)
    resumed = steps[len(steps_before):]
    assert resumed == list(range(done, 4)), f"finished layers redone or skipped: {steps_before} then {resumed}"

    state = torch.load(str(out) + ".pt", weights_only=True)
    report = CompressionReport.load(str(out) + ".json")
    assert report.ranks == ref_report.ranks
    assert state.keys() == ref_state.keys()
    for key in state:
        assert torch.equal(state[key], ref_state[key]), key
    assert _layers_without_time(report) == _layers_without_time(ref_report)


def _snapshot(folder):
    digests = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            digests[name] = hashlib.sha256(f.read()).hexdigest()
    return digests


def _checkpointed_run(folder, **kwargs):
    torch.manual_seed(0)
    model = build_model()
    report = compress(model, checkpoint_dir=folder, progress=False, seed=0, **kwargs)
    return model, report


def test_corrupt_checkpoint_folder_is_refused_and_untouched(tmp_path):
    folder = tmp_path / "ckpt"
    _checkpointed_run(folder)
    files = sorted(os.listdir(folder))
    assert files == ["manifest.json", "model-0004.pt", "report-0004.json", "rng-0004.json"]

    # A damaged model file: hash mismatch.
    with open(folder / "model-0004.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    before = _snapshot(folder)
    with pytest.raises(CheckpointError, match="model-0004.pt does not match the SHA-256"):
        _checkpointed_run(folder)
    assert _snapshot(folder) == before

    # An unreadable manifest.
    (folder / "manifest.json").write_text('{"format": "cpconv-compress-checkpoint", "vers')
    before = _snapshot(folder)
    with pytest.raises(CheckpointError, match="manifest.json cannot be read"):
        _checkpointed_run(folder)
    assert _snapshot(folder) == before

    # A manifest naming a missing file.
    _checkpointed_run(tmp_path / "other")
    os.remove(tmp_path / "other" / "rng-0004.json")
    before = _snapshot(tmp_path / "other")
    with pytest.raises(CheckpointError, match="rng-0004.json named in manifest.json is missing"):
        _checkpointed_run(tmp_path / "other")
    assert _snapshot(tmp_path / "other") == before

    # A manifest of another program.
    (folder / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not a cpconv compression checkpoint"):
        _checkpointed_run(folder)

    # checkpoint_dir is a file.
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        _checkpointed_run(tmp_path / "file")


def test_leftovers_of_an_interrupted_write_are_ignored(tmp_path):
    """A process killed while writing leaves temp files or a next step's data files: both are ignored."""
    folder = tmp_path / "ckpt"
    model_a, report_a = _checkpointed_run(folder)
    (folder / "model-0005.pt").write_bytes(b"half written")
    (folder / ".tmp-manifest.json-123").write_bytes(b"{")
    torch.manual_seed(0)
    model_b = build_model()
    report_b = compress(model_b, checkpoint_dir=folder, progress=False, seed=0)  # all 4 layers done: restore only
    assert report_b.ranks == report_a.ranks
    for (ka, va), (kb, vb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_resume_with_other_arguments_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    _checkpointed_run(folder)
    before = _snapshot(folder)
    with pytest.raises(ValueError, match="other arguments.*weakening"):
        _checkpointed_run(folder, weakening=0.5)
    assert _snapshot(folder) == before
    _, report = _checkpointed_run(folder, weakening=0.5, resume=False)  # explicit fresh start replaces it
    assert report.settings["weakening"] == 0.5


def test_fine_tune_that_raises_keeps_the_checkpoint_valid(tmp_path):
    folder = tmp_path / "ckpt"

    def failing(m, step):
        if step == 2:
            raise RuntimeError("out of memory in fine-tuning")

    torch.manual_seed(0)
    model = build_model()
    with pytest.raises(RuntimeError, match="out of memory in fine-tuning"):
        compress(model, fine_tune=failing, checkpoint_dir=folder, progress=False, seed=0)
    state = cpconv.checkpoint.CompressionCheckpoint(folder).load()
    assert state.finished_layers == 2

    # Resuming with the same arguments finishes the remaining layers only.
    calls = []

    def working(m, step):
        calls.append(step)

    torch.manual_seed(0)
    model = build_model()
    report = compress(model, fine_tune=working, checkpoint_dir=folder, progress=False, seed=0)
    assert calls == [2, 3] and report.finished and len(report.layers) == 4
    assert all(isinstance(model[i], cpconv.CPConv2d) for i in (0, 2, 4, 6))


@pytest.mark.parametrize("crash_at", ["model-0002.pt", "report-0002.json", "rng-0002.json", "manifest.json"])
def test_crash_inside_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, monkeypatch, crash_at):
    """Simulate a kill inside the second checkpoint's write, right before each of its renames."""
    def fine_tune(m, step):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape))  # global RNG: a wrong restore changes the result

    torch.manual_seed(5)
    reference = build_model()
    ref_report = compress(reference, fine_tune=fine_tune, progress=False, seed=0)

    folder = tmp_path / "ckpt"
    real_replace = os.replace
    state = {"saves": 0}

    def replace(src, dst):
        if os.path.basename(str(dst)) == "manifest.json":
            state["saves"] += 1
        if os.path.basename(str(dst)) == crash_at and state["saves"] >= (1 if crash_at != "manifest.json" else 2):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    torch.manual_seed(5)
    with pytest.raises(KeyboardInterrupt):
        compress(build_model(), fine_tune=fine_tune, checkpoint_dir=folder, progress=False, seed=0)
    monkeypatch.setattr(os, "replace", real_replace)
    assert cpconv.checkpoint.CompressionCheckpoint(folder).load().finished_layers == 1

    torch.manual_seed(123)  # whatever the RNG is now, the checkpoint's state is restored
    model = build_model()
    report = compress(model, fine_tune=fine_tune, checkpoint_dir=folder, progress=False, seed=0)
    assert report.ranks == ref_report.ranks
    for (ka, va), (kb, vb) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    assert sorted(os.listdir(folder)) == ["manifest.json", "model-0004.pt", "report-0004.json", "rng-0004.json"]


def test_resume_without_a_seed_equals_an_uninterrupted_run(tmp_path):
    """seed=None draws CP-ALS seeds from torch's global RNG, whose state the checkpoint restores."""
    model_fn = lambda: nn.Sequential(*list(build_model())[:6])  # noqa: E731  three convs are enough

    def crashing(m, step):
        if step == 1:
            raise RuntimeError("killed")

    def fine_tune(m, step):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape))

    torch.manual_seed(0)
    straight = model_fn()
    report = compress(straight, fine_tune=fine_tune, progress=False, max_iter=20)
    assert max(report.ranks.values()) > 3  # above kh = kw: random initial columns, so the seed matters
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="killed"):
        compress(model_fn(), fine_tune=lambda m, s: (fine_tune(m, s), crashing(m, s)),
                 checkpoint_dir=tmp_path, progress=False, max_iter=20)
    torch.manual_seed(123)  # the resumed run must not depend on the RNG state it starts with
    resumed = model_fn()
    compress(resumed, fine_tune=fine_tune, checkpoint_dir=tmp_path, progress=False, max_iter=20)
    for (ka, va), (kb, vb) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_resume_keeps_shared_and_frozen_layers(tmp_path):
    torch.manual_seed(0)
    model = build_model()
    model[2].requires_grad_(False)
    model.tied = model[4]  # the same conv under a second name
    compress(model, layers=["0", "2", "4"], checkpoint_dir=tmp_path, progress=False, seed=0, max_iter=10)
    torch.manual_seed(0)
    again = build_model()
    again[2].requires_grad_(False)
    again.tied = again[4]
    report = compress(again, layers=["0", "2", "4"], checkpoint_dir=tmp_path, progress=False, seed=0,
                      max_iter=10)  # everything done: restored only
    assert report.finished and again.tied is again[4] and isinstance(again[4], cpconv.CPConv2d)
    assert not any(p.requires_grad for p in again[2].parameters())
    assert all(p.requires_grad for p in again[0].parameters())
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_checkpoint_json_is_strict_and_resume_keeps_non_finite_metrics(tmp_path):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    model, report = _checkpointed_run(tmp_path, evaluate=lambda m: float("nan"))
    for name in os.listdir(tmp_path):
        if name.endswith(".json"):
            json.loads((tmp_path / name).read_text(), parse_constant=refuse)
    _, resumed = _checkpointed_run(tmp_path, evaluate=lambda m: 0.0)  # everything done: restored only
    assert math.isnan(resumed.metric_before) and math.isnan(resumed.layers[-1].metric_after_decomposition)
    assert _layers_without_time(resumed) == _layers_without_time(report)
