"""Crash, preemption and NaN: real `tfsft fit` processes, killed, and the same command run again."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import run_cli, tiny_recipe

STAGES = """
  - {name: head, epochs: 2, learning_rate: 1.0e-3, trainable: head}
  - {name: finetune, epochs: 3, learning_rate: 1.0e-3, trainable: top_blocks:1, schedule: cosine}"""
EXPECTED_EPOCHS = [("head", 1), ("head", 2), ("finetune", 3), ("finetune", 4), ("finetune", 5)]

pytestmark = pytest.mark.slow


@pytest.fixture
def recipe(tmp_path, shapes_dir):
    path = tmp_path / "recipe.yaml"
    path.write_text(tiny_recipe(shapes_dir, str(tmp_path / "run"), STAGES))
    return str(path)


def history(run_dir):
    with open(os.path.join(run_dir, "history.csv")) as handle:
        return list(csv.DictReader(handle))


def start_fit(recipe, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "tfsft", "fit", "--config", recipe, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for_line(process, text):
    """Reads the process's output until a line containing ``text``; returns all lines read."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"process ended before printing {text!r}: {''.join(lines)}{process.stderr.read()}")


@pytest.fixture(scope="module")
def reference_learning_rates(tmp_path_factory, shapes_dir):
    """The learning rate of every epoch in an uninterrupted run of the same recipe."""
    root = tmp_path_factory.mktemp("reference")
    path = root / "recipe.yaml"
    path.write_text(tiny_recipe(shapes_dir, str(root / "run"), STAGES))
    result = run_cli("fit", "--config", str(path))
    assert result.returncode == 0, result.stderr[-2000:]
    return [float(row["learning_rate"]) for row in history(root / "run")]


def test_sigkill_mid_stage_then_same_command_resumes_where_it_stopped(recipe, tmp_path, reference_learning_rates):
    process = start_fit(recipe)
    wait_for_line(process, "[finetune] epoch 4/5")
    process.kill()
    process.wait()
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["finished"] is False and state["checkpoints"][-1]["epoch"] == 4

    again = run_cli("fit", "--config", recipe)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout and "after epoch 4" in again.stdout
    assert "[head]" not in again.stdout, "finished stages must not run again"
    rows = history(tmp_path / "run")
    assert [(r["stage"], int(r["epoch"])) for r in rows] == EXPECTED_EPOCHS, "every epoch exactly once"
    # The cosine schedule carries on from the optimizer's saved step count.
    assert [float(r["learning_rate"]) for r in rows] == pytest.approx(reference_learning_rates, rel=1e-5)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 4 and metrics["epochs"] == 5

    finished = run_cli("fit", "--config", recipe)
    assert finished.returncode == 2 and "already holds a finished run" in finished.stderr


def test_kill_in_the_middle_of_writing_a_checkpoint_loses_at_most_that_epoch(recipe, tmp_path):
    # The head stage runs on cached features: its checkpoints hold the head alone, on top of a
    # full one written at the stage's start. Saves: stage-01-start, epoch-0001, epoch-0002 (killed).
    process = start_fit(recipe, env={"TFSFT_FAULT": "checkpoint:3"})
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert [(c["name"], c["base"]) for c in state["checkpoints"]] == [
        ("stage-01-start", None), ("epoch-0001", "stage-01-start")]
    with np.load(tmp_path / "run" / "checkpoints" / "epoch-0001" / "weights.npz") as saved:
        assert [key.split(":")[1] for key in saved.files] == ["predictions/kernel", "predictions/bias"]
    assert not (tmp_path / "run" / "checkpoints" / "epoch-0002").exists(), "a half-written checkpoint is visible"

    again = run_cli("fit", "--config", recipe)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "after epoch 1" in again.stdout
    assert [(r["stage"], int(r["epoch"])) for r in history(tmp_path / "run")] == EXPECTED_EPOCHS
    kept = json.loads((tmp_path / "run" / "state.json").read_text())["checkpoints"]
    needed = {c["name"] for c in kept} | {c["base"] for c in kept if c["base"]}
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == sorted(needed), "leftovers"


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one_with_one_warning(recipe, tmp_path):
    process = start_fit(recipe)
    wait_for_line(process, "[finetune] epoch 4/5")
    process.kill()
    process.wait()
    newest = tmp_path / "run" / "checkpoints" / "epoch-0004" / "weights.npz"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as a dying disk would leave it

    again = run_cli("fit", "--config", recipe)
    assert again.returncode == 0, again.stderr[-2000:]
    warnings = [line for line in again.stdout.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 1 and "epoch-0004" in warnings[0]
    assert "after epoch 3" in again.stdout
    assert [(r["stage"], int(r["epoch"])) for r in history(tmp_path / "run")] == EXPECTED_EPOCHS


def test_sigterm_stops_cleanly_and_the_run_resumes(recipe, tmp_path):
    process = start_fit(recipe)
    wait_for_line(process, "[head] epoch 2/2")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143
    assert "stopped by SIGTERM" in stderr and "Run the same command to resume" in stderr
    assert "Traceback" not in stderr and stderr.strip().count("\n") == 0

    again = run_cli("fit", "--config", recipe)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [(r["stage"], int(r["epoch"])) for r in history(tmp_path / "run")] == EXPECTED_EPOCHS


def test_a_changed_config_is_not_resumed_silently(recipe, tmp_path):
    process = start_fit(recipe)
    wait_for_line(process, "[head] epoch 1/2")
    process.kill()
    process.wait()
    changed = run_cli("fit", "--config", recipe, "--set", "data.batch_size=4")
    assert changed.returncode == 2
    assert "different config (data.batch_size: 8 there, 4 now)" in changed.stderr
    assert changed.stderr.strip().count("\n") == 0
    assert json.loads((tmp_path / "run" / "state.json").read_text())["finished"] is False, "nothing was changed"


def test_nan_loss_stops_within_a_step_keeps_the_checkpoint_and_resumes_with_a_lower_rate(tmp_path, shapes_dir):
    path = tmp_path / "recipe.yaml"
    path.write_text(tiny_recipe(shapes_dir, str(tmp_path / "run"), """
      - {name: head, epochs: 1, learning_rate: 1.0e-3, trainable: head}
      - {name: wild, epochs: 2, learning_rate: 10, trainable: all, optimizer: sgd}""",
        ) .replace("mobilenet_v3_small", "resnet50v2"))
    failed = run_cli("fit", "--config", str(path))
    assert failed.returncode == 2
    message = failed.stderr.strip()
    assert message.count("\n") == 0 and "Traceback" not in message
    assert "the loss became nan in stage wild, epoch 2, step" in message
    assert "last good checkpoint (epoch 1) is kept" in message
    assert "--set stages.1.learning_rate=1" in message
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["checkpoints"][-1]["epoch"] == 1

    resumed = run_cli("fit", "--config", str(path), "--set", "stages.1.learning_rate=1e-4")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "after epoch 1" in resumed.stdout
    assert [(r["stage"], int(r["epoch"])) for r in history(tmp_path / "run")] == [("head", 1), ("wild", 2), ("wild", 3)]


def test_a_file_damaged_inside_stops_fit_naming_it_and_the_run_resumes_without_it(tmp_path, shapes_dir):
    import io
    import shutil

    import numpy as np
    from PIL import Image

    from tfsft import config as config_module
    from tfsft.errors import TfsftError
    from tfsft.training import fit

    folder = tmp_path / "shapes"
    shutil.copytree(shapes_dir, folder)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buffer, "PNG")
    damaged = bytearray(buffer.getvalue())
    damaged[len(damaged) // 2:len(damaged) // 2 + 40] = b"\x00" * 40  # header and end intact
    bad = folder / "circle" / "damaged.png"
    bad.write_bytes(bytes(damaged))
    path = tmp_path / "recipe.yaml"
    path.write_text(tiny_recipe(str(folder), str(tmp_path / "run"), STAGES))
    config = config_module.load(str(path))
    with pytest.raises(TfsftError, match=f"cannot be decoded: {bad}.*run the same command to resume"):
        fit(config, log=lambda line: None)
    bad.unlink()
    result = fit(config, log=lambda line: None)
    assert [(r["stage"], int(r["epoch"])) for r in history(result.run_dir)] == EXPECTED_EPOCHS
