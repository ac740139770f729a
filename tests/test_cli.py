"""The ``tfsft`` command as a user runs it: a real subprocess on a real folder of images."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from helpers import run_cli, tiny_recipe
from tfsft import __version__, runs
from tfsft.errors import RunDirError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_version_and_help():
    version = run_cli("--version")
    assert version.returncode == 0 and __version__ in version.stdout
    helped = run_cli("--help")
    assert helped.returncode == 0
    for command in ("fit", "evaluate", "config", "sample-data", "backbones"):
        assert command in helped.stdout


def test_console_script_is_installed():
    executable = shutil.which("tfsft")
    if executable is None:
        pytest.skip("tfsft is not installed in this environment (pip install -e .)")
    import subprocess

    result = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and __version__ in result.stdout


def test_missing_data_folder_is_one_line_and_exit_2(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe("no/such/folder", str(tmp_path / "run")))
    result = run_cli("fit", "--config", str(recipe))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "data.train: path not found: no/such/folder" in result.stderr
    assert not (tmp_path / "run").exists(), "a config error must not create the run directory"


def test_run_directory_is_never_overwritten_without_restart(tmp_path):
    root = str(tmp_path / "run")
    run = runs.RunDir.prepare(root, restart=False)
    run.write_text(runs.CONFIG, "old")
    (tmp_path / "run" / "my_notes.txt").write_text("mine")
    run.write_json(runs.STATE, {"finished": False, "checkpoints": []})
    runs.RunDir.prepare(root, restart=False)
    assert (tmp_path / "run" / runs.CONFIG).read_text() == "old", "an unfinished run is kept for resuming"
    run.mark_finished()
    with pytest.raises(RunDirError, match="already holds a finished run.*--restart"):
        runs.RunDir.prepare(root, restart=False)
    assert (tmp_path / "run" / runs.CONFIG).read_text() == "old"
    runs.RunDir.prepare(root, restart=True)
    assert not (tmp_path / "run" / runs.CONFIG).exists() and not (tmp_path / "run" / runs.STATE).exists()
    assert (tmp_path / "run" / "my_notes.txt").read_text() == "mine", "restart removes only tfsft's files"


def test_unwritable_run_directory_is_reported_before_work_starts(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunDirError, match="cannot write to run directory"):
        runs.RunDir.prepare(str(tmp_path / "a_file" / "run"), restart=False)


@pytest.mark.slow
def test_fit_then_evaluate_end_to_end(tmp_path):
    made = run_cli("sample-data", "data/shapes", "--images-per-class", "12", "--image-size", "40", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    (tmp_path / "data" / "shapes" / "circle" / "broken.jpg").write_text("<html>404</html>")
    (tmp_path / "recipe.yaml").write_text(tiny_recipe("data/shapes", "runs/first"))

    result = run_cli("fit", "--config", "recipe.yaml", "--set", "stages.1.epochs=2",
                     "--set", "data.augment.flip=horizontal", "--run-dir", "runs/try2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "validation accuracy" in out and "run directory: runs/try2" in out and "next:" in out
    assert "skipped 1 files" in out
    assert [line.split()[0] for line in out.splitlines() if " epoch " in line] == ["[head]", "[finetune]", "[finetune]"]
    assert "Traceback" not in result.stderr and "oneDNN" not in result.stderr + out

    run = tmp_path / "runs" / "try2"
    for name in ("config.yaml", "class_names.txt", "history.csv", "metrics.json", "confusion_matrix.png",
                 "training_curves.png", "model.keras", "skipped.jsonl", "logs"):
        assert (run / name).exists(), name
    assert not (tmp_path / "runs" / "first").exists()
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["stages"][1]["epochs"] == 2 and resolved["data"]["augment"]["flip"] == "horizontal"
    assert (run / "class_names.txt").read_text().split() == ["circle", "square", "triangle"]
    with open(run / "history.csv") as handle:
        history = list(csv.DictReader(handle))
    assert [(row["stage"], row["epoch"]) for row in history] == [("head", "1"), ("finetune", "2"), ("finetune", "3")]
    skipped = [json.loads(line) for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 1 and skipped[0]["path"].endswith("broken.jpg")
    for picture in ("confusion_matrix.png", "training_curves.png"):
        assert (run / picture).read_bytes().startswith(PNG_SIGNATURE)

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["weights_used"].startswith("none")
    assert metrics["val_num_images"] == 6 and metrics["num_train_images"] == 30
    assert set(metrics["per_class"]) == {"circle", "square", "triangle"}
    assert sum(c["support"] for c in metrics["per_class"].values()) == 6
    assert np.sum(metrics["confusion_matrix"]) == 6
    assert "top5_accuracy" not in metrics, "top-5 only for more than 5 classes"
    assert set(metrics["timings"]["stage_seconds"]) == {"head", "finetune"}

    evaluated = run_cli("evaluate", "--run-dir", "runs/try2", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"accuracy {metrics['val_accuracy']:.3f}" in evaluated.stdout, "the saved model is not the one evaluated"
    again = json.loads((run / "evaluation" / "val" / "metrics.json").read_text())
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    assert again["loss"] == pytest.approx(metrics["val_loss"], rel=1e-4)

    run_cli("sample-data", "data/other", "--images-per-class", "4", "--image-size", "50",
            "--classes", "2", "--seed", "5", cwd=tmp_path)
    other = run_cli("evaluate", "--run-dir", "runs/try2", "--data", "data/other", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    assert "on 8 images" in other.stdout
    assert json.loads((run / "evaluation" / "other" / "metrics.json").read_text())["num_images"] == 8

    model_time = os.path.getmtime(run / "model.keras")
    repeat = run_cli("fit", "--config", "recipe.yaml", "--run-dir", "runs/try2", cwd=tmp_path)
    assert repeat.returncode == 2 and "already holds a finished run" in repeat.stderr
    assert repeat.stderr.strip().count("\n") == 0
    assert os.path.getmtime(run / "model.keras") == model_time


@pytest.mark.slow
def test_shipped_quickstart_recipe_runs(tmp_path):
    """configs/quickstart.yaml, as shipped, on the sample data (epochs cut to keep the suite short)."""
    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs")
    made = run_cli("sample-data", "data/shapes", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    checked = run_cli("config", "check", "configs/quickstart.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    result = run_cli("fit", "--config", "configs/quickstart.yaml", "--set", "stages.0.epochs=1",
                     "--set", "stages.1.epochs=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation accuracy" in result.stdout
    assert (tmp_path / "runs" / "quickstart" / "model.keras").exists()
