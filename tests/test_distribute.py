"""Distribution: MirroredStrategy on two logical CPU devices, MultiWorkerMirroredStrategy with two
worker processes on this machine, precision and XLA settings."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from helpers import run_cli, tiny_recipe, write_config

STAGES = """
      - {name: head, epochs: 2, learning_rate: 1.0e-2, trainable: head}
      - {name: finetune, epochs: 1, learning_rate: 1.0e-3, trainable: top_blocks:1}"""


def recipe(tmp_path, shapes_dir, name, strategy):
    text = tiny_recipe(shapes_dir, str(tmp_path / name), stages=STAGES).replace(
        "mobilenet_v3_small", "resnet50v2").replace(  # random-init MobileNets give constant outputs
        "distribute:\n", f"distribute:\n  strategy: {strategy}\n")
    return write_config(tmp_path / f"{name}.yaml", text)


def history(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "history.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def assert_losses_close(rows, reference, tolerance):
    assert [row["stage"] for row in rows] == [row["stage"] for row in reference]
    for row, expected in zip(rows, reference):
        assert abs(float(row["loss"]) - float(expected["loss"])) <= tolerance * float(expected["loss"]), (rows, reference)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, shapes_dir):
    """The same recipe trained in one process on the default strategy: the reference."""
    tmp_path = tmp_path_factory.mktemp("single")
    result = run_cli("fit", "--config", recipe(tmp_path, shapes_dir, "run", "default"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distribute: default strategy (one device), 1 replica; precision float32; XLA off" in result.stdout
    return str(tmp_path / "run")


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpu_devices_trains_the_staged_schedule(tmp_path, shapes_dir, single_run):
    config_path = recipe(tmp_path, shapes_dir, "run", "mirrored")
    script = textwrap.dedent(f"""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from tfsft import config, training
        result = training.fit(config.load({config_path!r}))
        print("val_accuracy", result.metrics["val_accuracy"])
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distribute: MirroredStrategy, 2 replicas" in result.stdout
    rows = history(tmp_path / "run")
    # The same global batch split over two replicas: the same losses as one device.
    assert_losses_close(rows, history(single_run), 0.02)
    # The metrics are those of the saved model: re-evaluating it gives the reported accuracy.
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    evaluated = run_cli("evaluate", "--run-dir", str(tmp_path / "run"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"accuracy {metrics['val_accuracy']:.3f}" in evaluated.stdout


@pytest.mark.slow
def test_two_workers_train_in_step_and_only_the_chief_writes(tmp_path, shapes_dir, single_run):
    config_path = recipe(tmp_path, shapes_dir, "run", "auto")
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen([sys.executable, "-m", "tfsft", "fit", "--config", config_path],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "TF_CONFIG": tf_config}))
    outputs = [worker.communicate(timeout=600) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    chief, other = outputs[0][0], outputs[1][0]
    assert "MultiWorkerMirroredStrategy (worker 0 of 2, the chief), 2 replicas" in chief
    assert "this worker is done; the chief wrote the run directory" in other
    fingerprints = [line.split()[-1] for stdout, _ in outputs for line in stdout.splitlines()
                    if "final weights fingerprint" in line]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1], fingerprints
    run_dir = tmp_path / "run"
    for name in ("model.keras", "metrics.json", "history.csv", "config.yaml", "confusion_matrix.png"):
        assert (run_dir / name).is_file(), name
    assert not list(tmp_path.glob("tfsft-worker-*"))
    # One worker's shard of each global batch: the epoch losses match one process's within
    # tolerance (the data order differs: each worker reads every other example).
    assert_losses_close(history(run_dir), history(single_run), 0.15)


@pytest.mark.slow
def test_a_worker_that_dies_ends_the_other_with_one_line(tmp_path, shapes_dir):
    stages = """
      - {name: head, epochs: 1, learning_rate: 1.0e-2, trainable: head, cache_features: false}
      - {name: finetune, epochs: 4, learning_rate: 1.0e-3, trainable: top_blocks:1}"""
    config_path = write_config(tmp_path / "r.yaml", tiny_recipe(shapes_dir, str(tmp_path / "run"), stages))
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    workers = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        if index == 1:
            env["TFSFT_FAULT"] = "checkpoint:2"  # killed while writing its second checkpoint
        workers.append(subprocess.Popen([sys.executable, "-m", "tfsft", "fit", "--config", config_path],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    chief_out, chief_err = workers[0].communicate(timeout=300)  # no hang
    workers[1].communicate(timeout=60)
    assert workers[1].returncode == -9
    assert workers[0].returncode == 2, chief_err[-3000:]
    # TensorFlow's own log lines come first; tfsft's line ends it.
    last = chief_err.strip().splitlines()[-1]
    assert last.startswith("tfsft: worker 0 of 2: another worker of the cluster stopped"), last
    assert "start every worker again with the same command to resume" in last


def test_unknown_strategy_and_multi_worker_without_a_cluster_are_one_line(tmp_path, shapes_dir):
    result = run_cli("config", "check", recipe(tmp_path, shapes_dir, "run", "mirored"))
    assert result.returncode == 2 and "did you mean 'mirrored'?" in result.stderr
    result = run_cli("fit", "--config", recipe(tmp_path, shapes_dir, "run", "multi_worker"),
                     env={"TF_CONFIG": ""})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "multi_worker needs a cluster" in lines[0], lines


def test_mixed_bfloat16_trains_and_saves_a_float32_model(tmp_path, shapes_dir):
    from tfsft import config as config_module
    from tfsft.model import load
    from tfsft.training import fit

    import keras

    text = open(recipe(tmp_path, shapes_dir, "run", "default")).read().replace(
        "precision: float32", "precision: mixed_bfloat16")
    lines = []
    result = fit(config_module.load(write_config(tmp_path / "bf16.yaml", text)), log=lines.append)
    assert "precision mixed_bfloat16" in lines[0]
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the run
    losses = [float(row["loss"]) for row in history(result.run_dir)]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses), losses
    model = load(os.path.join(result.run_dir, "model.keras"))
    policies = {layer.dtype_policy.name for layer in model.layers + model.get_layer("backbone").layers}
    assert policies == {"float32"}, policies
    assert model.get_layer("backbone").weights[0].dtype == "float32"


def test_auto_precision_follows_the_hardware(tmp_path, monkeypatch):
    from tfsft import distribute

    for flags, expected in (("fpu sse avx512f avx512_bf16 amx_tile", "mixed_bfloat16"),
                            ("fpu sse avx2 avx512f", "float32")):
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(distribute, "cpu_has_native_bfloat16",
                            lambda path=str(cpuinfo), original=distribute.cpu_has_native_bfloat16: original(path))
        assert distribute.choose_precision("auto", "default") == expected  # no GPU here
    assert distribute.choose_precision("auto", "tpu") == "mixed_bfloat16"
    assert distribute.choose_precision("float32", "default") == "float32"
    assert distribute.choose_jit_compile("auto") is False and distribute.choose_jit_compile("true") is True


def test_mixed_float16_without_a_gpu_is_one_line(tmp_path, shapes_dir):
    text = open(recipe(tmp_path, shapes_dir, "run", "default")).read().replace(
        "precision: float32", "precision: mixed_float16")
    result = run_cli("fit", "--config", write_config(tmp_path / "f16.yaml", text))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mixed_float16 needs GPUs" in lines[0], lines
    assert not os.path.exists(tmp_path / "run")
