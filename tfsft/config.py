"""The typed config tree and its loader: defaults -> YAML -> ``--set`` overrides -> validation.

Every field is declared once here, with its default, its range and a description; the README's
reference table and the error messages come from these declarations. Types, ranges, choices and
unknown keys are checked by pydantic; checks that involve several fields or the file system are
plain Python in ``_check``. Nothing here imports TensorFlow, so a config error is answered in
well under a second.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any, Literal, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from tfsft.backbones import BACKBONES, unknown_backbone_message
from tfsft.backbones import parse as parse_backbone
from tfsft.data import DEFAULT_MAX_PIXELS
from tfsft.errors import ConfigError

WEIGHTS_KEYWORDS = ("imagenet", "none", "auto")
TRAINABLE_PATTERN = re.compile(r"^(head|all|top_blocks:(?P<blocks>\d+)|from_layer:(?P<layer>\S+))$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AugmentConfig(_Section):
    """Random augmentation, applied to training batches only."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = Field(
        "none", description="random flips", examples=["horizontal"])
    rotation: float = Field(
        0.0, ge=0, le=0.5, description="largest random rotation, as a fraction of a full turn",
        examples=[0.05])
    zoom: float = Field(
        0.0, ge=0, lt=1, description="largest random zoom in or out, as a fraction of the size",
        examples=[0.1])
    contrast: float = Field(
        0.0, ge=0, le=1, description="largest random contrast change, as a fraction", examples=[0.1])


class DataConfig(_Section):
    """Where the images are and how they are fed."""

    train: str = Field(
        description="folder with one sub-folder per class, a CSV file with a `path,label` header, "
        "or tfds:NAME[:SPLIT]", examples=["data/flowers"])
    val: Optional[str] = Field(
        None, description="validation data, same kinds as train; when absent, a seeded "
        "stratified split of train", examples=["data/flowers_val"])
    val_split: float = Field(
        0.2, gt=0, lt=1, description="fraction of each class held out for validation when val "
        "is absent", examples=[0.2])
    image_size: Optional[list[int]] = Field(
        None, description="[height, width] the model resizes images to (one number for a "
        "square); default: the backbone's own size (a Hub module's input size, else 224; a "
        "reused model's training size)", examples=["[224, 224]"])
    batch_size: StrictInt = Field(
        32, ge=1, description="images per training step (the global batch, over all replicas)",
        examples=[32])
    cache: Literal["none", "memory", "disk"] = Field(
        "none", description="keep decoded, resized images after the first epoch: in memory, or "
        "memory-mapped in the run directory (none: decode every epoch)", examples=["memory"])
    augment: Optional[AugmentConfig] = Field(
        None, description="random augmentation of training images; off when absent",
        examples=["{flip: horizontal, rotation: 0.05, zoom: 0.1}"])
    max_pixels: StrictInt = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="images with more pixels (read from the header) are "
        "left out", examples=[100000000])
    max_bad_fraction: float = Field(
        0.1, ge=0, le=1, description="stop before training when more than this fraction of "
        "image files cannot be used", examples=[0.1])

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected [height, width] or one integer")
        if isinstance(value, int):
            value = [value, value]
        if value is not None and not (
            isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in value)
        ):
            raise ValueError("expected [height, width] of positive integers, or one integer")
        return None if value is None else list(value)


class HubConfig(_Section):
    """How to feed a `hub:` backbone."""

    input_range: list[float] = Field(
        [0.0, 1.0], min_length=2, max_length=2, description="[low, high] pixel range the module "
        "expects (TF Hub image modules: [0, 1])", examples=["[0, 1]"])
    output_key: Optional[str] = Field(
        None, description="for modules that return a dict: the entry holding the features "
        "(default: default)", examples=["default"])


class ModelConfig(_Section):
    """The network: a pretrained backbone and a new softmax head."""

    backbone: str = Field(
        "resnet50", description="a name from `tfsft backbones`, hub:HANDLE (tfhub.dev or Kaggle "
        "Models URL, gs:// path or local SavedModel folder), run:DIR (the backbone of a tfsft "
        "run) or keras:PATH.keras (the backbone of a saved tfsft model)", examples=["resnet50"])
    weights: Optional[str] = Field(
        None, description="for table backbones: imagenet (the default) | none | auto (imagenet "
        "when it can be loaded, else random with a warning) | path/to/file.weights.h5",
        examples=["imagenet"])
    hub: HubConfig = Field(default_factory=HubConfig, description="settings for hub: backbones",
                           examples=["{input_range: [0, 1]}"])
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout before the head", examples=[0.2])


class EarlyStoppingConfig(_Section):
    """Stop a stage when the validation metric stops improving, keeping the best weights."""

    monitor: Literal["val_loss", "val_accuracy"] = Field(
        "val_loss", description="metric watched", examples=["val_loss"])
    patience: StrictInt = Field(
        3, ge=1, description="epochs without improvement before stopping", examples=[3])
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts", examples=[0.001])


class StageConfig(_Section):
    """One training stage: what is trainable, and how it is optimised."""

    name: Optional[str] = Field(
        None, description="stage name, in history.csv and logs (default: stageN)", examples=["head"])
    epochs: StrictInt = Field(ge=0, description="epochs in this stage", examples=[5])
    learning_rate: float = Field(gt=0, le=10, description="peak learning rate", examples=[0.001])
    trainable: str = Field(
        "head", description="head | all | top_blocks:N | from_layer:NAME", examples=["top_blocks:1"])
    batchnorm: Literal["frozen", "train"] = Field(
        "frozen", description="frozen keeps BatchNorm statistics and scales fixed in unfrozen "
        "blocks (recommended for small data)", examples=["frozen"])
    optimizer: Literal["adam", "adamw", "sgd"] = Field(
        "adam", description="optimizer, created anew for each stage", examples=["adam"])
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum for sgd", examples=[0.9])
    weight_decay: Optional[float] = Field(
        None, ge=0, description="decoupled weight decay (default: 0.01 for adamw, none otherwise)",
        examples=[0.01])
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning-rate schedule over the stage", examples=["cosine"])
    warmup_epochs: float = Field(
        0.0, ge=0, description="linear warmup at the start of a cosine schedule", examples=[1])
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing", examples=[0.1])
    class_weight: Literal["none", "balanced"] = Field(
        "none", description="balanced weighs each class by n / (classes x class count)",
        examples=["balanced"])
    backbone_lr_multiplier: float = Field(
        1.0, gt=0, le=10, description="the unfrozen backbone learns at learning_rate times this "
        "(discriminative learning rate; the head at learning_rate)", examples=[0.1])
    cache_features: Literal["auto", "true", "false"] = Field(
        "auto", description="train a head stage on backbone features computed once (auto: when "
        "no random augmentation is asked)", examples=["auto"])
    early_stopping: Optional[EarlyStoppingConfig] = Field(
        None, description="stop the stage early and restore its best weights",
        examples=["{monitor: val_loss, patience: 3}"])

    @field_validator("cache_features", mode="before")
    @classmethod
    def _yaml_boolean(cls, value: Any) -> Any:
        return str(value).lower() if isinstance(value, bool) else value

    @field_validator("trainable")
    @classmethod
    def _trainable(cls, value: str) -> str:
        if not TRAINABLE_PATTERN.match(value):
            raise ValueError("expected head, all, top_blocks:N or from_layer:NAME")
        return value

    def trainable_parts(self) -> tuple[str, Optional[str]]:
        """Splits ``trainable`` into its kind and argument: ("top_blocks", "2"), ("head", None)."""
        kind, _, argument = self.trainable.partition(":")
        return kind, argument or None


class RunConfig(_Section):
    """Where the run writes, and its seed."""

    dir: str = Field("runs/default", description="run directory", examples=["runs/quickstart"])
    seed: StrictInt = Field(
        0, ge=0, description="seed for the split, shuffling, augmentation and initialisation",
        examples=[0])


class DistributeConfig(_Section):
    """Where training runs: devices and machines, numeric precision, XLA."""

    strategy: Literal["auto", "default", "mirrored", "multi_worker", "tpu"] = Field(
        "auto", description="auto: multi_worker when TF_CONFIG or SLURM names several workers, "
        "tpu when one is present, mirrored with several GPUs, else default", examples=["auto"])
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = Field(
        "auto", description="auto: mixed_float16 on GPUs of compute capability 7.0+, "
        "mixed_bfloat16 on TPU and on CPUs with native bfloat16, else float32", examples=["auto"])
    jit_compile: Literal["auto", "true", "false"] = Field(
        "auto", description="XLA, passed to compile explicitly (auto: on for GPU and TPU)",
        examples=["auto"])

    @field_validator("jit_compile", mode="before")
    @classmethod
    def _yaml_boolean(cls, value: Any) -> Any:
        return str(value).lower() if isinstance(value, bool) else value


class ExportConfig(_Section):
    """What fit exports when training ends (nothing unless asked)."""

    name: Optional[str] = Field(
        None, description="when set, fit exports a SavedModel for TF Serving under this model name",
        examples=["flowers"])
    base: str = Field("saved_models", description="folder TF Serving serves", examples=["saved_models"])
    top_k: StrictInt = Field(5, ge=1, description="labels and scores the SavedModel returns per image",
                             examples=[5])
    tflite: list[Literal["none", "dynamic", "float16", "int8"]] = Field(
        default_factory=list, description="TFLite files fit converts and checks at the end",
        examples=["[float16, int8]"])


class TfliteConfig(_Section):
    """How TFLite files are calibrated and judged."""

    calibration_images: StrictInt = Field(
        200, ge=1, description="training images that calibrate int8", examples=[200])
    min_agreement: float = Field(
        0.98, ge=0, le=1, description="int8 top-1 agreement with the Keras model below which "
        "tfsft warns", examples=[0.98])
    int8_input: Literal["uint8", "float32"] = Field(
        "uint8", description="input type of int8 files: raw uint8 pixels, or float32",
        examples=["uint8"])
    int8_output: Literal["float32", "uint8"] = Field(
        "float32", description="output type of int8 files: float32 probabilities, or quantized uint8",
        examples=["float32"])


class Config(_Section):
    """The whole recipe."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    stages: list[StageConfig] = Field(
        min_length=1, description="training stages, run in order",
        examples=["[{name: head, epochs: 5, learning_rate: 0.001}]"])
    run: RunConfig = Field(default_factory=RunConfig)
    distribute: DistributeConfig = Field(default_factory=DistributeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tflite: TfliteConfig = Field(default_factory=TfliteConfig)

    @property
    def image_size(self) -> tuple[int, int]:
        """The resolved (height, width); set by ``load`` from the backbone when absent."""
        assert self.data.image_size is not None, \
            "image_size is resolved by config.load (table backbones) or model.resolve_backbone"
        return int(self.data.image_size[0]), int(self.data.image_size[1])


DEFAULT_STAGES: list[dict[str, Any]] = [
    {"name": "head", "epochs": 5, "learning_rate": 1.0e-3, "trainable": "head"},
    {"name": "finetune", "epochs": 5, "learning_rate": 1.0e-5, "trainable": "top_blocks:1",
     "batchnorm": "frozen"},
]


def load(path: str, overrides: Sequence[str] = (), *, check_paths: bool = True) -> Config:
    """Reads a YAML recipe, applies ``--set key=value`` overrides and validates the result.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML, list indices allowed
            (``stages.1.epochs=3``).
        check_paths: check that data and weights paths exist (off when a saved run's config is
            reloaded on another machine).

    Raises:
        ConfigError: with one line per problem, naming the file or ``--set``, the key, what was
            expected, what was received and a fix.
    """
    if not os.path.isfile(path):
        raise ConfigError([f"config file not found: {path}. Fix: check the path, or start from "
                           f"configs/quickstart.yaml"])
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return load_text(text, path, overrides, check_paths=check_paths)


def load_text(text: str, source: str, overrides: Sequence[str] = (), *,
              check_paths: bool = True) -> Config:
    """Like ``load``, from YAML text; ``source`` names it in messages."""
    raw = _parse_yaml(text, source)
    raw.setdefault("stages", [dict(stage) for stage in DEFAULT_STAGES])
    overridden = [_apply_override(raw, item) for item in overrides]
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError([_describe(item, source, overridden) for item in error.errors()]) from None
    problems = _check(config, check_paths)
    if problems:
        raise ConfigError([_line(source, overridden, key, message) for key, message in problems])
    return config


def dump(config: Config) -> str:
    """The resolved config as YAML, as written to the run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, default_flow_style=False)


def _parse_yaml(text: str, source: str) -> dict:
    try:
        raw = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as error:
        where = f":{error.problem_mark.line + 1}" if error.problem_mark else ""
        found = re.search(r"'tag:yaml\.org,2002:([^']*)'", error.problem or "")
        tag = f"!!{found.group(1)}" if found else (error.problem or "")
        raise ConfigError([f"{source}{where}: unsupported YAML tag {tag}; tfsft reads plain YAML "
                           f"only (yaml.safe_load). Fix: remove the tag"]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError([f"{source}{where}: invalid YAML: {problem}. Fix: check the "
                           f"indentation and quoting on that line"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{source}: expected a mapping with the sections data, model, stages, "
                           f"run, got {type(raw).__name__}. Fix: start from configs/quickstart.yaml"])
    return raw


def _apply_override(raw: dict, item: str) -> str:
    """Sets one ``dotted.key=value`` in the raw tree and returns the key."""
    key, equals, text = item.partition("=")
    key = key.strip()
    if not equals or not key:
        raise ConfigError([f"--set {item}: expected dotted.key=value, e.g. --set data.batch_size=16"])
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError([f"--set {key}: {where} is not an index of a list of {len(node)} "
                                   f"items. Fix: use 0 to {len(node) - 1}"])
            if last:
                node[int(part)] = value
            node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError([f"--set {key}: {'.'.join(parts[:depth])} holds a value, not a "
                               f"section. Fix: set {'.'.join(parts[:depth])} itself"])
    return key


def _key(loc: Sequence[Any]) -> str:
    return ".".join(str(part) for part in loc)


def _line(source: str, overridden: Sequence[str], key: str, message: str) -> str:
    if any(key == o or key.startswith(o + ".") for o in overridden):
        return f"config error: --set {key}: {message}"
    return f"config error: {source}: {key}: {message}"


def _section_class(loc: Sequence[Any]) -> Optional[type[BaseModel]]:
    """The config class that holds the key at ``loc`` (``data.augment.flip`` -> AugmentConfig)."""
    cls: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = _model_in(field.annotation)
        if cls is None:
            return None
    return cls


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in getattr(annotation, "__args__", ()):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def _example(loc: Sequence[Any]) -> Optional[str]:
    cls = _section_class(loc)
    field = cls.model_fields.get(str(loc[-1])) if cls else None
    if field is None or not field.examples:
        return None
    return f"{_key(loc)}: {field.examples[0]}"


def _describe(error: dict, source: str, overridden: Sequence[str]) -> str:
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
    key = _key(loc)
    kind = error["type"]
    received = error.get("input")
    example = _example(loc)
    if kind == "extra_forbidden":
        cls = _section_class(loc)
        valid = list(cls.model_fields) if cls else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        parent = _key(loc[:-1])
        prefix = f"{parent}." if parent else ""
        hint = f"did you mean '{prefix}{close[0]}'? " if close else ""
        return _line(source, overridden, key,
                     f"unknown key. Fix: {hint}valid keys{' under ' + parent if parent else ''}: "
                     f"{', '.join(valid)}")
    if kind == "missing":
        return _line(source, overridden, key, f"required key is missing. Fix: add {example or key}")
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", error["ctx"]["expected"])
        close = difflib.get_close_matches(str(received), choices, n=1)
        fix = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(choices)}"
        return _line(source, overridden, key,
                     f"expected one of {', '.join(choices)}, got {received!r}. Fix: {fix}")
    message = error["msg"]
    message = re.sub(r"^Value error, ", "", message)
    message = re.sub(r"^Input should be ", "expected ", message)
    message = re.sub(r"^List should have", "expected a list with", message)
    fix = f"e.g. {example}" if example else "see the config reference in README.md"
    if isinstance(received, dict):
        shown = "a mapping"
    elif isinstance(received, list) and kind != "value_error":
        shown = "a list"
    else:
        shown = repr(received)
    return _line(source, overridden, key, f"{message}, got {shown}. Fix: {fix}")


def _check(config: Config, check_paths: bool) -> list[tuple[str, str]]:
    """Checks across fields and against the file system; returns (key, message) pairs."""
    problems: list[tuple[str, str]] = []
    source, value = parse_backbone(config.model.backbone)
    spec = BACKBONES.get(value) if source == "table" else None
    if source == "table" and spec is None:
        problems.append(("model.backbone", unknown_backbone_message(config.model.backbone) +
                         ". Fix: pick one of those"))
    elif spec is not None:
        if config.data.image_size is None:
            config.data.image_size = [spec.default_size, spec.default_size]
        if min(config.data.image_size) < spec.min_size:
            problems.append(("data.image_size", f"{spec.name} needs at least {spec.min_size} "
                             f"pixels a side, got {config.data.image_size}. Fix: e.g. "
                             f"data.image_size: [{spec.default_size}, {spec.default_size}]"))
    else:
        problems.extend(_check_backbone_source(config, source, value, check_paths))

    weights = config.model.weights
    if source != "table":
        if weights is not None:
            problems.append(("model.weights", f"a {source}: backbone brings its own weights, so "
                             f"model.weights does not apply. Fix: remove model.weights"))
    elif weights is None:
        config.model.weights = "imagenet"
    elif weights not in WEIGHTS_KEYWORDS:
        if not weights.endswith(".h5"):
            problems.append(("model.weights", f"expected imagenet, none, auto or a path to a "
                             f".weights.h5 file, got {weights!r}. Fix: e.g. model.weights: imagenet"))
        elif check_paths and not os.path.isfile(weights):
            problems.append(("model.weights", f"weights file not found: {weights}. Fix: check "
                             f"the path (relative paths start at the current directory)"))

    if check_paths:
        for key, value in (("data.train", config.data.train), ("data.val", config.data.val)):
            if value is None or value.startswith("tfds:"):
                continue
            if not os.path.exists(value):
                problems.append((key, f"path not found: {value}. Fix: point it at a folder with "
                                 f"one sub-folder per class, a CSV file, or tfds:NAME "
                                 f"(relative paths start at the current directory)"))
            elif os.path.isfile(value) and not value.lower().endswith(".csv"):
                problems.append((key, f"expected a folder, a .csv file or tfds:NAME, got the file "
                                 f"{value}. Fix: point it at the folder that holds the class folders"))

    if config.export.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", config.export.name):
        problems.append(("export.name", f"expected letters, digits, '_', '.' or '-' (it is a URL path "
                         f"in TF Serving), got {config.export.name!r}. Fix: e.g. export.name: flowers"))

    names = set()
    for index, stage in enumerate(config.stages):
        if stage.name is None:
            stage.name = f"stage{index + 1}"
        key = f"stages.{index}"
        if stage.name in names:
            problems.append((f"{key}.name", f"stage name '{stage.name}' is used twice. Fix: give "
                             f"each stage its own name"))
        names.add(stage.name)
        kind, argument = stage.trainable_parts()
        if kind == "top_blocks" and spec is not None and not 1 <= int(argument) <= spec.num_blocks:
            problems.append((f"{key}.trainable", f"{spec.name} has {spec.num_blocks} blocks, got "
                             f"top_blocks:{argument}. Fix: use 1 to {spec.num_blocks}, or all"))
        if kind in ("top_blocks", "from_layer") and source == "hub":
            problems.append((f"{key}.trainable", f"a hub: backbone is one layer to Keras, without "
                             f"blocks, got {stage.trainable}. Fix: use trainable: head or all"))
        if stage.backbone_lr_multiplier != 1.0 and kind == "head":
            problems.append((f"{key}.backbone_lr_multiplier", f"this stage trains only the head "
                             f"(trainable: head), so the backbone's rate does not apply. Fix: remove "
                             f"it, or unfreeze part of the backbone (trainable: all, top_blocks:N)"))
        if stage.cache_features == "true" and kind != "head":
            problems.append((f"{key}.cache_features", f"features can be cached only while the "
                             f"backbone is frozen (trainable: head), got trainable: {stage.trainable}. "
                             f"Fix: remove cache_features or set trainable: head"))
        if stage.warmup_epochs > 0 and stage.schedule != "cosine":
            problems.append((f"{key}.warmup_epochs", f"warmup needs schedule: cosine, got schedule: "
                             f"{stage.schedule}. Fix: set {key}.schedule: cosine or remove warmup_epochs"))
        if stage.warmup_epochs > 0 and stage.warmup_epochs >= stage.epochs:
            problems.append((f"{key}.warmup_epochs", f"expected fewer warmup epochs than the "
                             f"stage's {stage.epochs} epochs, got {stage.warmup_epochs}. Fix: "
                             f"lower warmup_epochs or raise epochs"))
    return problems


def _check_backbone_source(config: Config, source: str, value: str, check_paths: bool) -> list[tuple[str, str]]:
    """Checks a hub:, run: or keras: backbone as far as can be done without TensorFlow."""
    key = "model.backbone"
    if not value:
        example = {"hub": "hub:https://tfhub.dev/...", "run": "run:runs/step1", "keras": "keras:model.keras"}
        return [(key, f"{source}: needs a value after the colon. Fix: e.g. {example[source]}")]
    if source == "keras" and not value.endswith(".keras"):
        return [(key, f"keras: takes a .keras file saved by tfsft, got {value!r}. Fix: e.g. "
                      f"keras:runs/step1/model.keras")]
    if not check_paths:
        return []
    if source == "run":
        model_file = os.path.join(value, "model.keras")
        if not os.path.isfile(model_file):
            return [(key, f"run:{value}: no finished tfsft run there ({model_file} not found). Fix: "
                          f"point at the run directory of a finished tfsft fit")]
        if config.data.image_size is None:  # the size that run was trained at
            config.data.image_size = _run_image_size(value)
    elif source == "keras" and not os.path.isfile(value):
        return [(key, f"keras:{value}: file not found. Fix: check the path (relative paths start "
                      f"at the current directory)")]
    elif source == "hub" and "://" not in value and not os.path.isdir(value):
        return [(key, f"hub:{value}: no such folder. Fix: point at a local SavedModel folder, or "
                      f"use a tfhub.dev or Kaggle Models URL")]
    return []


def _run_image_size(run_dir: str) -> Optional[list[int]]:
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as handle:
            size = yaml.safe_load(handle)["data"]["image_size"]
        return [int(size[0]), int(size[1])]
    except (OSError, KeyError, TypeError, ValueError, IndexError, yaml.YAMLError):
        return None  # model.resolve_backbone reads it from the model instead
