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
    state.json             where the run stands: its checkpoints, newest last, and whether it finished
    checkpoints/           the last two epochs' weights and optimizer state, for resuming (in
                           a stage on cached features: the head's weights, on top of a full
                           checkpoint from the stage's start)

Every file is written to a temporary name in the same folder and renamed, so no final path ever
holds a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

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
STATE = "state.json"
CHECKPOINTS = "checkpoints"
EVALUATION = "evaluation"
ARTIFACTS = (CONFIG, CLASS_NAMES, HISTORY, METRICS, CONFUSION_MATRIX, TRAINING_CURVES, SKIPPED, MODEL, LOGS,
             STATE, CHECKPOINTS, EVALUATION, "feature_cache", "tflite_report.json", "labels.txt", "model_float32.tflite",
             "model_dynamic.tflite", "model_float16.tflite", "model_int8.tflite")
KEEP_CHECKPOINTS = 2
WEIGHTS_FILE = "weights.npz"
OPTIMIZER_FILE = "optimizer.npz"


@dataclass
class Checkpoint:
    """A point a run can resume from.

    Attributes:
        name: its folder under checkpoints/.
        stage_index: the stage to run (or continue) from here.
        stage_start_epoch: the global epoch at which that stage began.
        epoch: global epochs completed.
        history: the history.csv rows up to here.
        has_optimizer: whether the optimizer state of ``stage_index`` is saved (mid-stage), or
            the stage starts afresh (a stage boundary).
        base: ``None`` when the checkpoint holds every weight of the model; else the name of a
            checkpoint that does, and this one holds only the weights that changed since (the
            head, in a stage on cached features, where the backbone cannot change). Writing the
            whole model every epoch would cost more than such a stage's training.
    """

    name: str
    stage_index: int
    stage_start_epoch: int
    epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    has_optimizer: bool = True
    base: Optional[str] = None


class RunDir:
    """Paths and atomic writers for one run directory."""

    def __init__(self, root: str):
        self.root = root

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    @classmethod
    def prepare(cls, root: str, restart: bool) -> "RunDir":
        """Opens ``root`` for fit, checking it is writable before any work starts.

        A finished run is never overwritten silently; an unfinished one (``state.json`` without
        ``finished``) is left as it is for fit to resume. ``restart`` removes the files tfsft
        wrote there (and nothing else). Files of an attempt that ended before its first
        checkpoint hold no work and are replaced.
        """
        run = cls(root)
        check_writable(root, "run directory", "choose another --run-dir or fix its permissions")
        state = None if restart else run.read_state()
        if state is not None:
            if state.get("finished"):
                raise RunDirError(f"run directory {root} already holds a finished run; nothing was "
                                  f"changed. Fix: pass --restart to start over, or --run-dir to write "
                                  f"a new one")
            return run
        if os.path.exists(run.path(MODEL)) and not restart:
            raise RunDirError(f"run directory {root} already holds a model.keras that tfsft cannot "
                              f"resume from; nothing was changed. Fix: pass --restart to start over, "
                              f"or --run-dir to write a new one")
        for name in ARTIFACTS:
            target = run.path(name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
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

    def read_state(self) -> Optional[dict[str, Any]]:
        path = self.path(STATE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError) as error:
            raise RunDirError(f"{path} is unreadable ({error}); cannot resume. Fix: pass --restart "
                              f"to start over") from None

    def checkpoints(self) -> list[Checkpoint]:
        """The saved checkpoints, newest last."""
        state = self.read_state() or {}
        return [Checkpoint(**entry) for entry in state.get("checkpoints", [])]

    def save_checkpoint(self, model, optimizer_variables: Optional[list], point: Checkpoint,
                        changed: Optional[list] = None) -> None:
        """Writes weights (and optimizer state) under a temporary name, renames it into place,
        then records it in state.json and drops the oldest beyond ``KEEP_CHECKPOINTS``. With
        ``point.base``, only the ``changed`` variables of ``model`` are written; the base stays
        as long as a kept checkpoint refers to it."""
        folder = self.path(CHECKPOINTS)
        os.makedirs(folder, exist_ok=True)
        for leftover in os.listdir(folder):  # a save that a crash interrupted
            if leftover.startswith(".saving-"):
                shutil.rmtree(os.path.join(folder, leftover), ignore_errors=True)
        staging = tempfile.mkdtemp(dir=folder, prefix=".saving-")
        try:
            weights = model.weights
            if point.base is not None:
                wanted = {id(variable) for variable in changed or []}
                weights = [w if id(w) in wanted else None for w in weights]
            _save_arrays(os.path.join(staging, WEIGHTS_FILE), weights)
            if optimizer_variables is not None:
                _save_arrays(os.path.join(staging, OPTIMIZER_FILE), optimizer_variables)
            fault_point("checkpoint")
            target = os.path.join(folder, point.name)
            if os.path.exists(target):
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        kept = ([c for c in self.checkpoints() if c.name != point.name] + [point])[-KEEP_CHECKPOINTS:]
        self.write_json(STATE, {"finished": False, "checkpoints": [asdict(c) for c in kept]})
        needed = {c.name for c in kept} | {c.base for c in kept if c.base}
        for name in os.listdir(folder):
            if name not in needed and not name.startswith("."):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)

    def load_weights(self, point: Checkpoint, model) -> None:
        """Loads a checkpoint's model weights (its base's first, if it has one); raises if a
        file is unreadable or does not fit ``model``."""
        folder = self.path(CHECKPOINTS)
        if point.base is not None:
            _load_arrays(os.path.join(folder, point.base, WEIGHTS_FILE), model.weights, complete=True)
        _load_arrays(os.path.join(folder, point.name, WEIGHTS_FILE), model.weights,
                     complete=point.base is None)

    def load_optimizer(self, point: Checkpoint, optimizer) -> None:
        """Loads a checkpoint's optimizer state except the learning rate (the config's wins, so
        a run can resume with a lower one). Raises on any mismatch."""
        _load_arrays(os.path.join(self.path(CHECKPOINTS), point.name, OPTIMIZER_FILE), optimizer.variables,
                     complete=True, keep=lambda variable: variable.path.endswith("/learning_rate"))

    def mark_finished(self) -> None:
        state = self.read_state() or {"checkpoints": []}
        state["finished"] = True
        self.write_json(STATE, state)

    def temporary_path(self, name: str) -> str:
        """A fresh path beside ``name`` for writers that need a file name (model.save)."""
        handle, path = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
        os.close(handle)
        return path


def _save_arrays(path: str, variables: list) -> None:
    """Variables' values in one .npz file, keyed ``<index>:<path>`` by their place in
    ``variables`` (``None`` entries are left out). Uncompressed: a ResNet50's weights write in
    about a third of the time Keras' .weights.h5 takes."""
    import numpy as np

    arrays = {f"{index}:{variable.path}": np.asarray(variable.numpy())
              for index, variable in enumerate(variables) if variable is not None}
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def _load_arrays(path: str, variables: list, *, complete: bool, keep=lambda variable: False) -> None:
    """Assigns the values ``_save_arrays`` wrote to the variables at the same places, except
    those ``keep`` is true for. Raises ValueError, before assigning anything, when the file is
    unreadable or does not fit: another count (``complete``: it must hold every variable), index
    or shape."""
    import zipfile

    import numpy as np

    try:
        with np.load(path) as saved:
            values = {int(key.split(":", 1)[0]): saved[key] for key in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: {error}") from None
    if complete and sorted(values) != list(range(len(variables))):
        raise ValueError(f"{path} holds {len(values)} variables, expected {len(variables)}")
    for index, value in values.items():
        if index >= len(variables) or tuple(value.shape) != tuple(variables[index].shape):
            raise ValueError(f"{path}: variable {index} does not fit ({value.shape})")
    for index, value in values.items():
        if not keep(variables[index]):
            variables[index].assign(value)


def check_writable(folder: str, what: str, fix: str) -> None:
    """Creates ``folder`` if needed and fails with one line when a file cannot be written there,
    so an unwritable place is reported before any work starts."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder, prefix=".tfsft-write-check-").close()
    except OSError as error:
        raise RunDirError(f"cannot write to {what} {folder} ({error.strerror or error}). Fix: {fix}") from None


_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: kills the process the Nth time it passes here when TFSFT_FAULT=<name>:<N>, to
    test recovery from a crash at that exact point (in the middle of writing a checkpoint).
    Inert otherwise."""
    wanted, _, count = os.environ.get("TFSFT_FAULT", "").partition(":")
    if wanted != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


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
