"""Crash-safe checkpoints of a running :func:`cpconv.compress` (one after every finished layer).

Layout of a checkpoint folder after ``n`` finished layers::

    model-000n.pt    the model's ``state_dict`` (loaded with ``weights_only=True``)
    report-000n.json the report so far (:meth:`CompressionReport.to_dict`)
    rng-000n.json    the RNG states of torch (CPU and CUDA), NumPy and Python's ``random``
    manifest.json    written last: which files make up the checkpoint, their SHA-256, the run's settings

Every file is written to a temporary name, flushed, fsynced and renamed over (``os.replace``) and the
folder fsynced; the manifest is replaced last and the files it names are never touched afterwards.
So a process killed at any moment leaves either the previous complete checkpoint or the new one; files
of an unfinished write are ignored (and removed by the next save). A folder whose manifest is
unreadable, names missing files or files whose hash does not match raises :class:`CheckpointError`
and is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

__all__ = ["CheckpointError", "CheckpointState", "CompressionCheckpoint", "capture_rng_state",
           "restore_rng_state"]

MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = "cpconv-compress-checkpoint"
CHECKPOINT_VERSION = 1
_OWN_FILE = re.compile(r"^(model-\d{4,}\.pt|report-\d{4,}\.json|rng-\d{4,}\.json|\.tmp-.*)$")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used: corrupt, from another run, or not a folder."""


@dataclass
class CheckpointState:
    """What a checkpoint holds: ``finished_layers`` layers done, the model and RNG state after them."""

    finished_layers: int
    settings: Dict[str, Any]
    model_state: Dict[str, torch.Tensor]
    report: Dict[str, Any]
    rng_state: Dict[str, Any]


# ---------------------------------------------------------------------- RNG state
def capture_rng_state() -> Dict[str, Any]:
    """The global RNG states of torch (CPU, and CUDA if initialised), NumPy and ``random``, as JSON data."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_version, list(py_internal), py_gauss],
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---------------------------------------------------------------------- atomic writes
def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(directory: str, name: str, write) -> str:
    """Write a file through ``write(fileobj)`` to a temp name, fsync, rename over ``name``; its SHA-256."""
    tmp = os.path.join(directory, f".tmp-{name}-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, name))
    _fsync_dir(directory)
    return _sha256(os.path.join(directory, name))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")


class CompressionCheckpoint:
    """Reads and writes the checkpoint folder ``directory`` (created on the first save)."""

    def __init__(self, directory: "os.PathLike | str") -> None:
        self.directory = os.fspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint_dir {self.directory!r} exists and is not a folder")

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.directory, MANIFEST)

    def exists(self) -> bool:
        """True when the folder holds a manifest (a checkpoint, valid or not)."""
        return os.path.exists(self.manifest_path)

    def load(self) -> Optional[CheckpointState]:
        """The last complete checkpoint, ``None`` when there is none yet.

        Raises
        ------
        CheckpointError
            The manifest is unreadable or of another format, names a missing file, or a file's
            SHA-256 does not match (the folder is corrupt or was edited).
        """
        if not self.exists():
            return None
        where = f"checkpoint folder {self.directory!r}"
        try:
            with open(self.manifest_path, "rb") as f:
                manifest = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{where} is corrupt: {MANIFEST} cannot be read ({exc}); "
                                  "remove the folder or pass another checkpoint_dir") from None
        if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{where} is not a cpconv compression checkpoint ({MANIFEST} has no "
                                  f"format {CHECKPOINT_FORMAT!r})")
        if manifest.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{where} has checkpoint version {manifest.get('version')!r}; "
                                  f"this cpconv reads version {CHECKPOINT_VERSION}")
        try:
            files = manifest["files"]
            finished = int(manifest["finished_layers"])
            settings = manifest["settings"]
            paths = {}
            for key in ("model", "report", "rng"):
                name = files[key]["name"]
                if not isinstance(name, str) or os.path.basename(name) != name:
                    raise CheckpointError(f"{where} is corrupt: bad file name {name!r} in {MANIFEST}")
                paths[key] = (os.path.join(self.directory, name), files[key]["sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{where} is corrupt: {MANIFEST} lacks {exc}") from None
        for key, (path, digest) in paths.items():
            if not os.path.isfile(path):
                raise CheckpointError(f"{where} is corrupt: {os.path.basename(path)} named in {MANIFEST} is missing")
            if _sha256(path) != digest:
                raise CheckpointError(f"{where} is corrupt: {os.path.basename(path)} does not match the "
                                      f"SHA-256 recorded in {MANIFEST}")
        try:
            model_state = torch.load(paths["model"][0], map_location="cpu", weights_only=True)
            with open(paths["report"][0], "rb") as f:
                report = json.loads(f.read().decode("utf-8"))
            with open(paths["rng"][0], "rb") as f:
                rng_state = json.loads(f.read().decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 -- any failure to read means a corrupt checkpoint
            raise CheckpointError(f"{where} is corrupt: {exc}") from None
        return CheckpointState(finished, settings, model_state, report, rng_state)

    def save(self, state: CheckpointState) -> None:
        """Write ``state`` as the new checkpoint (data files first, the manifest last)."""
        os.makedirs(self.directory, exist_ok=True)
        n = state.finished_layers
        names = {"model": f"model-{n:04d}.pt", "report": f"report-{n:04d}.json", "rng": f"rng-{n:04d}.json"}
        digests = {
            "model": _write_atomic(self.directory, names["model"], lambda f: torch.save(state.model_state, f)),
            "report": _write_atomic(self.directory, names["report"], lambda f: f.write(_json_bytes(state.report))),
            "rng": _write_atomic(self.directory, names["rng"], lambda f: f.write(_json_bytes(state.rng_state))),
        }
        manifest = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "finished_layers": n,
            "settings": state.settings,
            "files": {k: {"name": names[k], "sha256": digests[k]} for k in names},
        }
        _write_atomic(self.directory, MANIFEST, lambda f: f.write(_json_bytes(manifest)))
        # Only now are the older files unreferenced; remove them (and temp files of a killed write).
        keep = set(names.values())
        for entry in os.listdir(self.directory):
            if _OWN_FILE.match(entry) and entry not in keep:
                try:
                    os.remove(os.path.join(self.directory, entry))
                except OSError:
                    pass
