"""The config contract: defaults, overrides, and one clear line for every invalid value."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tfsft import config
from tfsft.errors import ConfigError


@pytest.fixture
def data_dir(tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / "data" / name).mkdir(parents=True)
    return tmp_path / "data"


def load(text: str, overrides=(), source="recipe.yaml"):
    return config.load_text(textwrap.dedent(text), source, overrides)


def error_lines(text: str, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(text, overrides)
    return caught.value.lines


def test_defaults_are_filled_and_resolved(data_dir):
    loaded = load(f"data: {{train: {data_dir}}}")
    assert loaded.model.backbone == "resnet50"
    assert loaded.model.weights == "imagenet"
    assert loaded.image_size == (224, 224), "image_size defaults to the backbone's own size"
    assert [s.name for s in loaded.stages] == ["head", "finetune"]
    assert loaded.stages[1].trainable == "top_blocks:1"
    assert loaded.stages[1].batchnorm == "frozen"
    assert loaded.data.augment is None


def test_overrides_reach_lists_nested_sections_and_parse_yaml_values(data_dir):
    loaded = load(f"data: {{train: {data_dir}}}", [
        "stages.1.epochs=3", "data.batch_size=16", "data.augment.flip=horizontal",
        "data.image_size=[64, 48]", "stages.0.learning_rate=1e-2", "run.dir=runs/try2"])
    assert loaded.stages[1].epochs == 3
    assert loaded.data.batch_size == 16
    assert loaded.data.augment.flip == "horizontal"
    assert loaded.image_size == (64, 48)
    assert loaded.stages[0].learning_rate == pytest.approx(0.01)
    assert loaded.run.dir == "runs/try2"


def test_a_single_number_means_a_square_image(data_dir):
    assert load(f"data: {{train: {data_dir}, image_size: 96}}").image_size == (96, 96)


def test_stages_without_names_are_numbered(data_dir):
    loaded = load(f"""
    data: {{train: {data_dir}}}
    stages:
      - {{epochs: 1, learning_rate: 0.1}}
      - {{epochs: 1, learning_rate: 0.1, trainable: all}}
    """)
    assert [s.name for s in loaded.stages] == ["stage1", "stage2"]


def test_dump_round_trips(data_dir, tmp_path):
    loaded = load(f"data: {{train: {data_dir}, augment: {{zoom: 0.1}}}}", ["stages.0.optimizer=sgd"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.dump(loaded))
    assert config.load(str(path)) == loaded


BAD_CONFIGS = [
    # (yaml body after data.train, overrides, key named, words expected in the line)
    ("data: {train: DATA, batch_sise: 4}", [], "data.batch_sise", ["unknown key", "did you mean 'data.batch_size'"]),
    ("data: {train: DATA}\nmodle: {}", [], "modle", ["unknown key", "did you mean 'model'"]),
    ("data: {train: DATA, batch_size: many}", [], "data.batch_size", ["integer", "'many'", "Fix: e.g. data.batch_size: 32"]),
    ("data: {train: DATA, batch_size: 0}", [], "data.batch_size", ["greater than or equal to 1", "got 0"]),
    ("data: {train: DATA, val_split: 1.5}", [], "data.val_split", ["less than 1", "got 1.5"]),
    ("data: {train: DATA, image_size: [1, 2, 3]}", [], "data.image_size", ["[height, width]"]),
    ("data: {train: DATA, augment: {flip: horizontall}}", [], "data.augment.flip", ["did you mean 'horizontal'"]),
    ("data: {train: DATA}\nmodel: {backbone: resnet5}", [], "model.backbone", ["did you mean 'resnet50'", "mobilenet_v2"]),
    ("data: {train: DATA}\nmodel: {dropout: -0.1}", [], "model.dropout", ["greater than or equal to 0"]),
    ("data: {train: DATA}\nmodel: {weights: imagenett}", [], "model.weights", ["imagenet, none, auto"]),
    ("data: {train: DATA}\nmodel: {weights: missing.weights.h5}", [], "model.weights", ["not found: missing.weights.h5"]),
    ("data: {train: DATA, image_size: 16}", [], "data.image_size", ["at least 32"]),
    ("data: {train: does/not/exist}", [], "data.train", ["path not found: does/not/exist"]),
    ("data: {train: DATA, val: nowhere}", [], "data.val", ["path not found: nowhere"]),
    ("data: {}", [], "data.train", ["required key is missing", "Fix: add data.train: data/flowers"]),
    ("data: {train: DATA}\nstages: []", [], "stages", ["at least 1"]),
    ("data: {train: DATA}\nstages: [{epochs: 1}]", [], "stages.0.learning_rate", ["required key is missing"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, trainable: top_block:2}]", [],
     "stages.0.trainable", ["head, all, top_blocks:N or from_layer:NAME"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, trainable: top_blocks:99}]", [],
     "stages.0.trainable", ["resnet50 has 16 blocks", "use 1 to 16"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, optimizer: adma}]", [],
     "stages.0.optimizer", ["did you mean 'adam'"]),
    ("data: {train: DATA}\nstages: [{name: a, epochs: 1, learning_rate: 0.1}, {name: a, epochs: 1, learning_rate: 0.1}]",
     [], "stages.1.name", ["used twice"]),
    ("data: {train: DATA}\nstages: [{epochs: 4, learning_rate: 0.1, warmup_epochs: 1}]", [],
     "stages.0.warmup_epochs", ["needs schedule: cosine"]),
    ("data: {train: DATA}\nstages: [{epochs: 2, learning_rate: 0.1, schedule: cosine, warmup_epochs: 2}]", [],
     "stages.0.warmup_epochs", ["fewer warmup epochs"]),
    ("data: {train: DATA}\nstages: [{epochs: 2, learning_rate: 0.1, early_stopping: {monitor: val_acc}}]", [],
     "stages.0.early_stopping.monitor", ["did you mean 'val_accuracy'"]),
    ("data: {train: DATA}\nrun: {seed: -1}", [], "run.seed", ["greater than or equal to 0"]),
    ("data: {train: DATA}\nrun: {dir: [a, b]}", [], "run.dir", ["string", "Fix: e.g. run.dir: runs/quickstart"]),
    ("data: {train: DATA, max_pixels: 0}", [], "data.max_pixels", ["greater than or equal to 1"]),
    ("data: {train: DATA, max_bad_fraction: 1.5}", [], "data.max_bad_fraction", ["less than or equal to 1"]),
    ("data: {train: DATA, augment: {zoom: 1.0}}", [], "data.augment.zoom", ["less than 1"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, label_smoothing: 1}]", [],
     "stages.0.label_smoothing", ["less than 1"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, batchnorm: freeze}]", [],
     "stages.0.batchnorm", ["did you mean 'frozen'"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, class_weight: balance}]", [],
     "stages.0.class_weight", ["did you mean 'balanced'"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, schedule: cosin}]", [],
     "stages.0.schedule", ["did you mean 'cosine'"]),
    ("data: {train: DATA}\nstages: [{epochs: 1.5, learning_rate: 0.1}]", [], "stages.0.epochs", ["integer"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0}]", [], "stages.0.learning_rate", ["greater than 0"]),
    ("data: {train: DATA}\nexport: {name: 'my model'}", [], "export.name", ["letters, digits"]),
    ("data: {train: DATA}\nexport: {tflite: [int4]}", [], "export.tflite.0", ["expected one of none, dynamic, float16, int8"]),
    ("data: {train: DATA}\nexport: {top_k: 0}", [], "export.top_k", ["greater than or equal to 1"]),
    ("data: {train: DATA}\ntflite: {int8_input: int8}", [], "tflite.int8_input", ["expected one of uint8, float32"]),
    ("data: {train: DATA}\ntflite: {min_agreement: 2}", [], "tflite.min_agreement", ["less than or equal to 1"]),
    ("data: {train: DATA}\ntflite: {int8_output: int8}", [], "tflite.int8_output", ["expected one of float32, uint8"]),
    ("data: {train: DATA}\ntflite: {calibration_images: 0}", [], "tflite.calibration_images", ["greater than or equal to 1"]),
    ("data: {train: DATA}\nexport: {base: 3}", [], "export.base", ["string"]),
    ("data: {train: DATA, augment: {contrast: 2}}", [], "data.augment.contrast", ["less than or equal to 1"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, momentum: 1}]", [], "stages.0.momentum", ["less than 1"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, weight_decay: -1}]", [],
     "stages.0.weight_decay", ["greater than or equal to 0"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, trainable: all, cache_features: true}]", [],
     "stages.0.cache_features", ["only while the backbone is frozen"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, cache_features: maybe}]", [],
     "stages.0.cache_features", ["expected one of auto, true, false"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, early_stopping: {patience: 0}}]", [],
     "stages.0.early_stopping.patience", ["greater than or equal to 1"]),
    ("data: {train: DATA}\nstages: [{epochs: 1, learning_rate: 0.1, early_stopping: {min_delta: -1}}]", [],
     "stages.0.early_stopping.min_delta", ["greater than or equal to 0"]),
    ("data: {train: DATA}", ["run.seed=abc"], "--set run.seed", ["integer", "'abc'"]),
    ("data: {train: DATA}", ["data.batch_sise=4"], "--set data.batch_sise", ["did you mean 'data.batch_size'"]),
]


@pytest.mark.parametrize("body, overrides, key, words", BAD_CONFIGS, ids=[c[2] for c in BAD_CONFIGS])
def test_each_invalid_value_gets_one_line_naming_file_key_received_and_fix(
        data_dir, body, overrides, key, words):
    lines = error_lines(body.replace("DATA", str(data_dir)), overrides)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line
    origin = "--set" if key.startswith("--set") else "recipe.yaml"
    assert line.startswith(f"config error: {origin}"), line
    assert key.replace("--set ", "") in line
    assert "Fix" in line or "did you mean" in line, line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"


@pytest.mark.parametrize("text, overrides, words", [
    ("!!python/object/apply:os.system ['echo pwned']", [], ["unsupported YAML tag !!python/object/apply:os.system"]),
    ("data: [1, 2", [], ["invalid YAML", "recipe.yaml:1"]),
    ("- just\n- a list", [], ["expected a mapping"]),
    ("data: {train: x}", ["no_equals_sign"], ["expected dotted.key=value"]),
    ("data: {train: x}", ["stages.7.epochs=1"], ["not an index of a list of 2 items"]),
])
def test_malformed_files_and_overrides_are_one_line(text, overrides, words):
    lines = error_lines(text, overrides)
    assert len(lines) == 1
    for word in words:
        assert word in lines[0]


def test_several_mistakes_are_all_reported(data_dir):
    lines = error_lines(f"data: {{train: {data_dir}, batch_size: 0, val_split: 2}}")
    assert len(lines) == 2
    assert any("data.batch_size" in line for line in lines)
    assert any("data.val_split" in line for line in lines)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        config.load("nope.yaml")


def test_yaml_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ConfigError):
        load(f"!!python/object/apply:os.system ['touch {marker}']")
    assert not marker.exists()


def _cli_in_fresh_python(*args: str) -> subprocess.CompletedProcess:
    """Runs the CLI in a fresh interpreter and reports whether TensorFlow got imported."""
    code = ("import sys\nfrom tfsft.cli import main\n"
            "try:\n    main(list(sys.argv[1:]))\n"
            "except SystemExit as e:\n    code = e.code\n"
            "print('TF_IMPORTED' if 'tensorflow' in sys.modules else 'TF_NOT_IMPORTED', code)\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


def test_cli_config_errors_exit_2_with_one_line_and_without_importing_tensorflow(tmp_path, data_dir):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"data: {{train: {data_dir}}}\nmodel: {{backbone: resnet5}}\n")
    result = _cli_in_fresh_python("config", "check", str(recipe))
    assert result.stdout.split() == ["TF_NOT_IMPORTED", "2"]
    assert result.stderr.count("\n") == 1, result.stderr
    assert "model.backbone" in result.stderr and "did you mean 'resnet50'" in result.stderr
    assert "Traceback" not in result.stderr

    fit = _cli_in_fresh_python("fit", "--config", str(recipe))
    assert fit.stdout.split() == ["TF_NOT_IMPORTED", "2"]
    assert "Traceback" not in fit.stderr


def test_cli_config_show_prints_the_resolved_config(tmp_path, data_dir):
    from click.testing import CliRunner

    from tfsft.cli import main

    recipe = tmp_path / "ok.yaml"
    recipe.write_text(f"data: {{train: {data_dir}}}\n")
    result = CliRunner().invoke(main, ["config", "show", str(recipe), "--set", "stages.1.epochs=3"])
    assert result.exit_code == 0, result.output
    import yaml

    shown = yaml.safe_load(result.output)
    assert shown["stages"][1]["epochs"] == 3
    assert shown["data"]["image_size"] == [224, 224]

    checked = CliRunner().invoke(main, ["config", "check", str(recipe)])
    assert checked.exit_code == 0 and "valid" in checked.output


def _all_keys(cls, prefix=""):
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        section = config._model_in(field.annotation)
        if section is None or cls is not config.Config or name == "stages":
            yield key  # top-level sections are headings, not keys
        if section is not None:
            yield from _all_keys(section, f"{key}[]." if name == "stages" else f"{key}.")


def test_readme_config_reference_documents_every_key():
    import os

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    reference = readme.split("## Config reference", 1)[1]
    keys = list(_all_keys(config.Config))
    assert "stages[].early_stopping.patience" in keys
    missing = [key for key in keys if f"| `{key}` |" not in reference]
    assert not missing, f"README's config reference lacks {missing}"
