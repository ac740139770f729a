"""The ``tfsft`` command. Each command parses its options and calls one library function.

TensorFlow is imported only inside the commands that need it, so ``tfsft --help`` and config
errors answer at once.
"""

from __future__ import annotations

import sys
from typing import Optional

import click

from tfsft import __version__
from tfsft.errors import TfsftError

USER_ERROR = 2


class _Group(click.Group):
    """Turns a user error anywhere below into its one-line message and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except TfsftError as error:
            for line in str(error).splitlines():
                click.echo(f"tfsft: {line}" if not line.startswith("config error") else line, err=True)
            ctx.exit(getattr(error, "exit_code", USER_ERROR))
        except KeyboardInterrupt:
            click.echo("tfsft: interrupted", err=True)
            ctx.exit(130)


_trust_option = click.option(
    "--trust-model", is_flag=True,
    help="Load a model.keras that holds code (Lambda layers); only for files from a source you trust.")

_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a config value, e.g. --set data.batch_size=16 or --set stages.1.epochs=3. Repeatable.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="tfsft")
def main() -> None:
    """Fine-tune pretrained image classifiers with TensorFlow and Keras 3."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML recipe (see configs/).")
@_set_option
@click.option("--run-dir", help="Where to write the run (overrides run.dir).")
@click.option("--restart", is_flag=True,
              help="Start over in a run directory that already holds a run (default: resume an unfinished one).")
def fit(config_path: str, overrides: tuple[str, ...], run_dir: str | None, restart: bool) -> None:
    """Train in stages, evaluate, and write a run directory."""
    from tfsft import config as config_module

    if run_dir:
        overrides = overrides + (f"run.dir={run_dir}",)
    config = config_module.load(config_path, overrides)
    from tfsft.training import fit as run_fit

    result = run_fit(config, restart=restart, log=lambda line: click.echo(line))
    metrics = result.metrics
    if not metrics:  # a worker other than the chief of a multi-worker run
        click.echo("\nthis worker is done; the chief wrote the run directory")
        return
    top5 = f", top-5 {metrics['val_top5_accuracy']:.3f}" if "val_top5_accuracy" in metrics else ""
    click.echo(f"\nvalidation accuracy {metrics['val_accuracy']:.3f}{top5} on "
               f"{metrics['val_num_images']} images")
    click.echo(f"run directory: {result.run_dir}")
    click.echo("next:")
    click.echo(f"  look at {result.run_dir}/confusion_matrix.png and training_curves.png")
    click.echo(f"  tfsft evaluate --run-dir {result.run_dir} --data path/to/other/folder")
    click.echo(f"  tfsft export --run-dir {result.run_dir}          # SavedModel for TF Serving")
    click.echo(f"  tfsft convert --run-dir {result.run_dir} --quantize float16 --quantize int8   # TFLite")
    click.echo(f"  tfsft predict --model {result.run_dir} path/to/photo.jpg")


@main.command()
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="A run written by tfsft fit.")
@click.option("--data", help="Folder, CSV or tfds:NAME[:SPLIT] to evaluate on (default: the run's validation split).")
@_trust_option
def evaluate(run_dir: str, data: str | None, trust_model: bool) -> None:
    """Recompute metrics for a run's model."""
    from tfsft.evaluate import evaluate_run, summary

    metrics, output = evaluate_run(run_dir, data, trust_model=trust_model)
    click.echo(summary(metrics))
    click.echo(f"written to {output}")


@main.command()
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="A run written by tfsft fit.")
@click.option("--name", help="Served model name (default: the run directory's name).")
@click.option("--version", "version", type=int, help="Integer version (default: the next one).")
@click.option("--base", default="saved_models", show_default=True, help="Folder TF Serving serves.")
@click.option("--overwrite", is_flag=True, help="Replace an existing version.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(1, 1000),
              help="Labels and scores returned per image.")
@_trust_option
def export(run_dir: str, name: str | None, version: int | None, base: str, overwrite: bool, top_k: int,
           trust_model: bool) -> None:
    """Export a run as a SavedModel for TF Serving (bytes in, labels out), verified."""
    import os

    from tfsft.export import export_run

    result = export_run(run_dir, name=name, version=version, base=base, overwrite=overwrite,
                        top_k=top_k, trust_model=trust_model, log=lambda line: click.echo(line))
    click.echo(f"exported {result.path} (model '{result.name}', version {result.version}); "
               f"verified on {result.verified_images} images, max probability difference "
               f"{result.max_difference:.1e}")
    click.echo("serve it:")
    click.echo(f'  docker run -p 8501:8501 -v "{os.path.abspath(base)}:/models" tensorflow/serving '
               f"--model_config_file=/models/models.config")
    click.echo(f"  curl -d '{{\"instances\": [{{\"b64\": \"'$(base64 -w0 photo.jpg)'\"}}]}}' "
               f"localhost:8501/v1/models/{result.name}:predict")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--model", "model_path", required=True, type=click.Path(exists=True),
              help="Run directory, SavedModel folder (saved_models/NAME/VERSION) or .tflite file.")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1, 1000))
@_trust_option
def predict(inputs: tuple[str, ...], model_path: str, top_k: int, trust_model: bool) -> None:
    """Print one JSON line per image: path, top-k labels and scores."""
    from tfsft.predict import format_line, load_predictor, predict_files

    predictor = load_predictor(model_path, trust_model=trust_model)
    count = 0
    for result in predict_files(predictor, list(inputs), top_k, note=lambda line: click.echo(line, err=True)):
        click.echo(format_line(result))
        count += 1
    if count == 0:
        click.echo("tfsft: no images to predict", err=True)


@main.command()
@click.option("--run-dir", type=click.Path(file_okay=False), help="A run written by tfsft fit.")
@click.option("--saved-model", type=click.Path(file_okay=False), help="A version written by tfsft export.")
@click.option("--quantize", "modes", multiple=True, default=("none",), show_default=True,
              type=click.Choice(["none", "dynamic", "float16", "int8"]),
              help="Quantization mode; repeat to compare several.")
@click.option("--output", type=click.Path(dir_okay=False), help="Output .tflite (one mode only).")
@click.option("--calibration-images", default=200, show_default=True, type=click.IntRange(1, 100000),
              help="Training images used to calibrate int8.")
@click.option("--min-agreement", default=0.98, show_default=True, type=click.FloatRange(0, 1),
              help="int8 top-1 agreement with the Keras model below which tfsft warns.")
@click.option("--int8-input", default="uint8", show_default=True, type=click.Choice(["uint8", "float32"]),
              help="Input type of the int8 file.")
@click.option("--int8-output", default="float32", show_default=True, type=click.Choice(["float32", "uint8"]),
              help="Output type of the int8 file.")
@click.option("--strict", is_flag=True, help="Exit 1 when int8 agreement is below --min-agreement.")
@_trust_option
def convert(run_dir, saved_model, modes, output, calibration_images, min_agreement, int8_input, int8_output,
            strict, trust_model) -> None:
    """Convert to TFLite and check each file against the Keras model with LiteRT."""
    from tfsft.tflite import convert_run, table

    if output and len(modes) > 1:
        raise click.UsageError("--output names one file; give one --quantize mode with it")
    reports, report_path, warning = convert_run(
        run_dir, saved_model=saved_model, modes=list(modes), output=output,
        calibration_images=calibration_images, min_agreement=min_agreement, int8_input=int8_input,
        int8_output=int8_output, trust_model=trust_model, log=lambda line: click.echo(line))
    click.echo(table(reports))
    click.echo(f"report: {report_path}")
    if warning:
        click.echo(f"warning: {warning}", err=True)
        if strict:
            sys.exit(1)


@main.group()
def config() -> None:
    """Inspect and validate recipes."""


@config.command("show")
@click.argument("path", type=click.Path(dir_okay=False))
@_set_option
def config_show(path: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved config (defaults, file and overrides)."""
    from tfsft import config as config_module

    click.echo(config_module.dump(config_module.load(path, overrides)), nl=False)


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@_set_option
def config_check(path: str, overrides: tuple[str, ...]) -> None:
    """Validate a recipe without training."""
    from tfsft import config as config_module

    loaded = config_module.load(path, overrides)
    stages = ", ".join(f"{stage.name} ({stage.epochs} epochs, {stage.trainable})" for stage in loaded.stages)
    size = (f"{loaded.image_size[0]}x{loaded.image_size[1]}" if loaded.data.image_size
            else "the backbone's own image size")
    click.echo(f"{path}: valid. backbone {loaded.model.backbone} at {size}; stages: {stages}")


@main.command()
@click.argument("name", required=False)
def backbones(name: Optional[str]) -> None:
    """List the supported backbones, or the blocks of one (for trainable: top_blocks:N)."""
    from tfsft.backbones import BACKBONES, get_spec

    if name is None:
        click.echo(f"{'name':<20}{'size':>5}  {'preprocessing':<14}{'params':>7}{'blocks':>7}  block names")
        for spec in BACKBONES.values():
            click.echo(f"{spec.name:<20}{spec.default_size:>5}  {spec.preprocessing:<14}"
                       f"{spec.params / 1e6:>6.1f}M{spec.num_blocks:>7}  {spec.first_block} ... {spec.last_block}")
        click.echo("also: hub:HANDLE (TF Hub / Kaggle Models module), run:DIR and keras:PATH.keras "
                   "(the backbone of a model tfsft trained); `tfsft backbones NAME` lists NAME's blocks")
        return
    from tfsft.tfimport import tf  # noqa: F401  (imports TensorFlow quietly first)
    from tfsft.backbones import assign_blocks, build_backbone

    spec = get_spec(name)
    backbone, _ = build_backbone(spec, "none", (spec.min_size, spec.min_size))
    blocks = assign_blocks(backbone, spec)
    click.echo(f"{spec.name}: {len(blocks) - 1} blocks, bottom to top; top_blocks:N unfreezes the last N")
    for index, (block, layers) in enumerate(blocks):
        params = sum(layer.count_params() for layer in layers)
        label = "stem (never in top_blocks)" if index == 0 else f"top_blocks:{len(blocks) - index:<3}"
        click.echo(f"  {block:<22}{label:<28}{len(layers):>4} layers {params:>12,} params")


@main.command("sample-data")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--images-per-class", default=100, show_default=True, type=click.IntRange(2, 100000))
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(16, 4096))
@click.option("--classes", "num_classes", default=3, show_default=True, type=click.IntRange(2, 6))
@click.option("--seed", default=0, show_default=True, type=int)
def sample_data(folder: str, images_per_class: int, image_size: int, num_classes: int, seed: int) -> None:
    """Write a small labelled image folder (shapes) to try tfsft on."""
    import os

    from tfsft.sample_data import make_shapes

    if os.path.isdir(folder) and os.listdir(folder):
        click.echo(f"{folder} already exists; using it as it is")
        return
    names = make_shapes(folder, images_per_class=images_per_class, image_size=image_size,
                        num_classes=num_classes, seed=seed)
    click.echo(f"wrote {images_per_class * len(names)} images of {', '.join(names)} to {folder}")


if __name__ == "__main__":
    sys.exit(main())
