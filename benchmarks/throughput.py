"""Training throughput of tfsft against the in-memory ceiling, measured side by side in one run.

    python benchmarks/throughput.py [--images 128] [--image-size 128] [--batch-size 16]
                                    [--backbone resnet50] [--head-epochs 10] [--finetune-epochs 3]
                                    [--cache-images 960 ...] [--precision]
                                    [--peer torch [--peer-python PYTHON]]

It writes JPEG images (the sample shapes) to a temporary folder and times, on this machine:

- the in-memory ceiling: Keras ``fit`` on the same images already decoded and resized, held in
  memory as tensors behind tf.data (head stage, then full fine-tuning), the same model, batch and
  resolution, in float32 like the tfsft rows, validating on the same validation images every
  epoch as tfsft does;
- ``tfsft fit`` on the folder: a head stage with the feature cache off, the same head stage with
  the cache on, and a full fine-tuning stage, reading the files every epoch and with
  ``data.cache: memory``; every row's rate is the best of two rounds that each time the ceiling
  and its tfsft rows one after the other;
- one forward pass of the backbone over the data (training and validation images, what a head
  stage runs the backbone on), the unit the feature-cache target is set in, and the cached head
  stage against it again on each ``--cache-images`` count of images (its fixed costs, tracing and one full
  checkpoint, weigh less as the data grows); both sides are the best of three measurements;
- with ``--peer torch``: PyTorch's transfer-learning recipe (torchvision ResNet50, new fc, SGD)
  on the same in-memory images, run by ``benchmarks/torch_peer.py`` in its own process with
  ``--peer-python`` (default: this Python), when that Python has torch and torchvision;
- with ``--precision``: the in-memory head and fine-tune stages in float32 and mixed_bfloat16.

Images per second are computed from steady-state epochs (the first epoch of each stage, which
includes tracing, is left out). tfsft's epochs include what a real run does every epoch: a small
validation pass (val_split 0.05; the ceiling runs it too) and writing a checkpoint (the ceiling
does not). Absolute numbers drift on shared machines; the ratios, measured in the same run, are
the point. It prints a table and the peak resident memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfsft.tfimport import tf  # noqa: E402
import keras  # noqa: E402

from tfsft import config as config_module  # noqa: E402
from tfsft import data as data_module  # noqa: E402
from tfsft.features import feature_extractor  # noqa: E402
from tfsft.model import build_classifier, set_trainable  # noqa: E402
from tfsft.sample_data import make_shapes  # noqa: E402
from tfsft.training import compile_for_stage, fit  # noqa: E402


def steady_rate(seconds: list[float], images: int) -> float:
    """Images per second over the epochs after the first."""
    steady = seconds[1:] if len(seconds) > 1 else seconds
    return images * len(steady) / sum(steady)


class EpochTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)


def in_memory(config, images: np.ndarray, labels: np.ndarray, trainable: str, epochs: int,
              precision: str = "float32", validation: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Steady images/s of Keras fit on in-memory tensors; with ``validation`` (images, labels),
    validating on them every epoch as a tfsft stage does."""
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(0)
    model, _ = build_classifier(config.model, 3, config.image_size)
    keras.mixed_precision.set_global_policy("float32")
    stage = config_module.StageConfig(epochs=epochs, learning_rate=1e-4, trainable=trainable)
    set_trainable(model, trainable, "frozen")
    compile_for_stage(model, stage, len(images) // config.data.batch_size, 3)
    timer = EpochTimer()
    # In-memory tensors through tf.data: the fastest feed Keras has (faster than fit on numpy).
    tensors = tf.data.Dataset.from_tensor_slices((images, keras.utils.to_categorical(labels, 3)))
    tensors = tensors.shuffle(len(images), seed=0).batch(config.data.batch_size).prefetch(tf.data.AUTOTUNE)
    val = None if validation is None else tf.data.Dataset.from_tensor_slices(
        (validation[0], keras.utils.to_categorical(validation[1], 3))).batch(config.data.batch_size)
    model.fit(tensors, validation_data=val, epochs=epochs, verbose=0, callbacks=[timer])
    return steady_rate(timer.seconds, len(images))


def tfsft_stage(recipe: str, folder: str, run_dir: str, stage: str, train_images: int,
                overrides: tuple[str, ...] = ()) -> tuple[float, float]:
    """Runs tfsft fit with one stage; returns (steady images/s, whole stage seconds)."""
    config = config_module.load(recipe, [f"stages=[{stage}]", f"run.dir={run_dir}", *overrides])
    result = fit(config, restart=True, log=lambda line: None)
    with open(os.path.join(run_dir, "history.csv")) as handle:
        seconds = [float(row["seconds"]) for row in csv.DictReader(handle)]
    return steady_rate(seconds, train_images), sum(result.metrics["timings"]["stage_seconds"].values())


def forward_pass_seconds(config, images: np.ndarray, batch_size: int) -> float:
    """One forward pass of the frozen backbone over ``images``, with the feature cache's own
    extractor, traced beforehand (for any batch size) so the timing holds no tracing."""
    keras.utils.set_random_seed(0)
    model, _ = build_classifier(config.model, 3, config.image_size)
    forward = feature_extractor(model, config.image_size)
    forward(images[:batch_size]).numpy()
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        forward(images[start:start + batch_size]).numpy()
    return time.perf_counter() - started


def image_folder(work: str, name: str, count: int, args) -> tuple[str, str, np.ndarray, np.ndarray,
                                                                  tuple[np.ndarray, np.ndarray]]:
    """A folder of JPEG shapes, its recipe, and its training split (images, labels) and
    validation split ((images, labels)) decoded in memory."""
    folder = os.path.join(work, name)
    make_shapes(folder, images_per_class=max(2, count // 3), image_size=args.image_size, num_classes=3)
    recipe = os.path.join(work, f"{name}.yaml")
    with open(recipe, "w") as handle:
        # val_split is as small as allowed so nearly every image trains; the validation pass
        # each epoch is timed in tfsft's rows and in the ceiling alike.
        # float32 like the in-memory ceiling (precision is compared separately, --precision).
        handle.write(f"data: {{train: {folder}, image_size: {args.image_size}, batch_size: {args.batch_size}, "
                     f"val_split: 0.05}}\nmodel: {{backbone: {args.backbone}, weights: none}}\n"
                     f"distribute: {{precision: float32}}\n")
    config = config_module.load(recipe)
    built = data_module.build(config.data, 0)

    def decoded(source) -> tuple[np.ndarray, np.ndarray]:
        batches = [(x.numpy(), np.argmax(y.numpy(), -1)) for x, y in
                   data_module.pipeline(source, 3, config.image_size, args.batch_size, training=False)]
        return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])

    return (folder, recipe, *decoded(built.train), decoded(built.val))


def cached_head_against_forward_pass(config, folder: str, recipe: str, images: np.ndarray,
                                     validation: tuple[np.ndarray, np.ndarray], stage: str, run_dir: str, args) -> tuple[float, float]:
    """(cached head stage seconds, one forward pass seconds over training and validation images),
    each the best of three measurements, taken in turn: this machine has spells of a minute or
    more in which everything runs at about half speed."""
    both = np.concatenate([images, validation[0]])
    seconds, forward = float("inf"), float("inf")
    for attempt in (1, 2, 3):
        forward = min(forward, forward_pass_seconds(config, both, args.batch_size))
        seconds = min(seconds, tfsft_stage(recipe, folder, f"{run_dir}-{attempt}", stage, len(images))[1])
    return seconds, forward


def torch_peer(python: str, images: np.ndarray, labels: np.ndarray, work: str, args) -> dict | str:
    """The PyTorch recipe's rates, or why it did not run."""
    path = os.path.join(work, "peer_images.npz")
    np.savez(path, images=images, labels=labels)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_peer.py")
    result = subprocess.run([python, script, path, "--batch-size", str(args.batch_size), "--head-epochs",
                             str(args.head_epochs), "--finetune-epochs", str(args.finetune_epochs)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"not run with {python}: {last}. Fix: pip install torch torchvision, or pass --peer-python"
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128, help="images per class x 3 classes is rounded to this")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--cache-images", type=int, nargs="*", default=[960],
                        help="also time the cached head stage on these many images (none: skip)")
    parser.add_argument("--precision", action="store_true",
                        help="also time the in-memory stages in mixed_bfloat16 against float32")
    parser.add_argument("--peer", choices=["torch"], help="also time a peer's recipe on the same images")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="the Python that has the peer's packages (default: this one)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="tfsft-bench-")
    try:
        run(args, work)
    finally:  # every run directory holds models and checkpoints: gigabytes by the end
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: str) -> None:
    folder, recipe, images, labels, validation = image_folder(work, "images", args.images, args)
    config = config_module.load(recipe)
    train_images = len(images)

    head = f"{{name: head, epochs: {args.head_epochs}, learning_rate: 1.0e-3, trainable: head, cache_features: CACHE}}"
    finetune = f"{{name: finetune, epochs: {args.finetune_epochs}, learning_rate: 1.0e-4, trainable: all}}"
    rows = []
    # Every rate is the best of two rounds, each round timing the ceiling and the tfsft rows
    # compared with it one after the other: rates on these shared CPUs drift and climb over the
    # first runs of a process, and the best of each side is the least disturbed.
    best: dict[str, float] = {}
    plain_seconds = float("inf")  # the whole uncached head stage, for the feature-cache table
    for attempt in (1, 2):
        ceiling = in_memory(config, images, labels, "head", args.head_epochs, validation=validation)
        plain, seconds = tfsft_stage(recipe, folder, os.path.join(work, f"plain{attempt}"),
                                     head.replace("CACHE", "false"), train_images)
        plain_seconds = min(plain_seconds, seconds)
        measured = {
            "ceiling_head": ceiling,
            "plain": plain,
            "cached": tfsft_stage(recipe, folder, os.path.join(work, f"cached{attempt}"),
                                  head.replace("CACHE", "true"), train_images)[0],
            "ceiling_finetune": in_memory(config, images, labels, "all", args.finetune_epochs,
                                          validation=validation),
            "finetune": tfsft_stage(recipe, folder, os.path.join(work, f"finetune{attempt}"), finetune,
                                    train_images)[0],
            "finetune_cached": tfsft_stage(recipe, folder, os.path.join(work, f"finetune_cached{attempt}"),
                                           finetune, train_images, ("data.cache=memory",))[0],
        }
        best = {key: max(value, best.get(key, 0.0)) for key, value in measured.items()}
    ceiling_head, plain_rate, cached_rate = best["ceiling_head"], best["plain"], best["cached"]
    ceiling_finetune, finetune_rate, finetune_cached_rate = (best["ceiling_finetune"], best["finetune"],
                                                             best["finetune_cached"])
    rows.append(("head, in-memory ceiling", ceiling_head, 1.0))
    rows.append(("head, tfsft from JPEG folder, cache off", plain_rate, plain_rate / ceiling_head))
    rows.append(("head, tfsft from JPEG folder, cache on", cached_rate, cached_rate / ceiling_head))
    rows.append(("fine-tune all, in-memory ceiling", ceiling_finetune, 1.0))
    rows.append(("fine-tune all, tfsft from JPEG folder", finetune_rate, finetune_rate / ceiling_finetune))
    rows.append(("fine-tune all, tfsft, data.cache: memory", finetune_cached_rate,
                 finetune_cached_rate / ceiling_finetune))
    peer = torch_peer(args.peer_python, images, labels, work, args) if args.peer == "torch" else None
    if isinstance(peer, dict):
        rows.insert(3, ("head, PyTorch recipe, in memory", peer["head"], peer["head"] / ceiling_head))
        rows.append(("fine-tune all, PyTorch recipe, in memory", peer["finetune"],
                     peer["finetune"] / ceiling_finetune))

    print(f"\n{args.backbone} at {args.image_size} px, batch {args.batch_size}, {train_images} training "
          f"images, {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}, Keras {keras.__version__}"
          + (f", PyTorch {peer['torch']} ({peer['threads']} threads)" if isinstance(peer, dict) else ""))
    print(f"{'what':<44}{'images/s':>10}{'vs ceiling':>12}")
    for name, rate, ratio in rows:
        print(f"{name:<44}{rate:>10.1f}{ratio:>11.2f}x")
    if isinstance(peer, dict):
        print(f"tfsft against the PyTorch recipe: head {plain_rate / peer['head']:.2f}x (cache off), "
              f"{cached_rate / peer['head']:.2f}x (cache on); fine-tune {finetune_rate / peer['finetune']:.2f}x")
    elif peer is not None:
        print(f"peer torch: {peer}")
    cached = head.replace("CACHE", "true")
    cached_seconds, forward_pass = cached_head_against_forward_pass(
        config, folder, recipe, images, validation, cached, os.path.join(work, "cached_stage"), args)
    print(f"\n{args.head_epochs}-epoch head stage against one forward pass of the backbone over the "
          f"training and validation images:")
    print(f"{'images':>8}{'forward pass':>14}{'cache on':>10}{'ratio':>8}{'cache off':>11}{'ratio':>8}")
    print(f"{train_images + len(validation[0]):>8}{forward_pass:>13.2f}s{cached_seconds:>9.2f}s"
          f"{cached_seconds / forward_pass:>7.2f}x{plain_seconds:>10.2f}s{plain_seconds / forward_pass:>7.2f}x")
    for count in args.cache_images:
        large_folder, large_recipe, large_images, _, large_val = image_folder(work, f"large{count}", count, args)
        large_seconds, large_forward = cached_head_against_forward_pass(
            config, large_folder, large_recipe, large_images, large_val, cached, os.path.join(work, f"large{count}"),
            args)
        print(f"{len(large_images) + len(large_val[0]):>8}{large_forward:>13.2f}s{large_seconds:>9.2f}s"
              f"{large_seconds / large_forward:>7.2f}x{'(not run)':>11}")
    if args.precision:
        print(f"\n{'in-memory stage':<44}{'float32':>10}{'bfloat16':>10}{'ratio':>8}")
        for name, trainable, epochs in (("head (frozen backbone)", "head", args.head_epochs),
                                        ("fine-tune all", "all", args.finetune_epochs)):
            f32 = in_memory(config, images, labels, trainable, epochs, "float32")
            bf16 = in_memory(config, images, labels, trainable, epochs, "mixed_bfloat16")
            print(f"{name:<44}{f32:>10.1f}{bf16:>10.1f}{bf16 / f32:>7.2f}x")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MB")


if __name__ == "__main__":
    main()
