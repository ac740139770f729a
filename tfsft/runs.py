"""The run directory: what a run writes, and where.

    config.yaml            the resolved config (load it back with tfsft.config.load)
    class_names.txt        one class per line, in the model's output order
    history.csv            one row per epoch, with its stage
    metrics.json           validation metrics, weights used, timings
    confusion_matrix.png   rows: true class, columns: predicted class
    training_curves.png    loss and accuracy per epoch, stage boundaries marked
    skipped.jsonl          files left out, one JSON object per line with its reason
    model.keras            the final model
    logs/                  TensorBoard logs

Every file is written to a temporary name in the same folder and renamed, so no final path ever
holds a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from typing import Any, Iterable

from tfsft.errors import RunDirError

CONFIG = "config.yaml"
CLASS_NAMES = "class_names.txt"
HISTORY = "history.csv"
METRICS = "metrics.json"
CONFUSION_MATRIX = "confusion_matrix.png"
TRAINING_CURVES = "training_curves.png"
SKIPPED = "skipped.jsonl"
MODEL = "model.keras"
LOGS = "logs"
ARTIFACTS = (CONFIG, CLASS_NAMES, HISTORY, METRICS, CONFUSION_MATRIX, TRAINING_CURVES, SKIPPED, MODEL, LOGS)


class RunDir:
    """Paths and atomic writers for one run directory."""

    def __init__(self, root: str):
        self.root = root

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    @classmethod
    def prepare(cls, root: str, restart: bool) -> "RunDir":
        """Creates ``root`` for a new run, checking it is writable before any work starts.

        A folder that already holds a run is never overwritten silently: ``restart`` removes the
        files tfsft wrote there (and nothing else).
        """
        run = cls(root)
        existing = [name for name in ARTIFACTS if os.path.exists(run.path(name))]
        if existing and not restart:
            raise RunDirError(f"run directory {root} already holds a run ({', '.join(existing[:3])}); "
                              f"nothing was changed. Fix: pass --restart to start over, or "
                              f"--run-dir to write a new one")
        try:
            os.makedirs(root, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=root, prefix=".tfsft-write-check-", delete=True)
            probe.close()
        except OSError as error:
            raise RunDirError(f"cannot write to run directory {root} ({error.strerror or error}). "
                              f"Fix: choose another --run-dir or fix its permissions") from None
        for name in existing:
            target = run.path(name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            else:
                os.remove(target)
        return run

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_bytes(self, name: str, data: bytes) -> None:
        atomic_write(self.path(name), data)

    def write_json(self, name: str, value: Any) -> None:
        self.write_text(name, json.dumps(value, indent=2) + "\n")

    def write_csv(self, name: str, rows: list[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        if rows:
            writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        self.write_text(name, buffer.getvalue())

    def write_jsonl(self, name: str, rows: Iterable[dict[str, Any]]) -> None:
        self.write_text(name, "".join(json.dumps(row) + "\n" for row in rows))

    def read_class_names(self) -> list[str]:
        path = self.path(CLASS_NAMES)
        if not os.path.isfile(path):
            raise RunDirError(f"{self.root} is not a finished tfsft run (no {CLASS_NAMES}). Fix: "
                              f"point --run-dir at a folder written by tfsft fit")
        with open(path, encoding="utf-8") as handle:
            return [line.rstrip("\n") for line in handle if line.strip()]

    def temporary_path(self, name: str) -> str:
        """A fresh path beside ``name`` for writers that need a file name (model.save)."""
        handle, path = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
        os.close(handle)
        return path


def atomic_write(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary sibling and a rename."""
    folder = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
