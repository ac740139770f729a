"""Image sources (a folder of class folders, a CSV list, a TFDS dataset) and their tf.data pipelines.

Reading a source lists its examples and labels without decoding any image, so a missing folder,
a class without images or an unknown validation class is reported before TensorFlow starts
working. Files whose first bytes are not an image are left out and reported, so one bad file does
not stop a fit. The pipeline decodes with ``tf.io.decode_image``, resizes with the same bilinear
resize the model applies to images of other sizes, batches, augments the training split only, and
prefetches.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from tfsft.errors import DataError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

    from tfsft.config import AugmentConfig, DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# Image formats people keep in image folders that tf.io.decode_image cannot read.
UNSUPPORTED_EXTENSIONS = (".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".nef")
# Files operating systems leave in folders.
SYSTEM_FILES = {".ds_store": "macOS folder metadata", "thumbs.db": "Windows thumbnail cache",
                "desktop.ini": "Windows folder settings"}
DEFAULT_MAX_PIXELS = 100_000_000
# Ends the reason of a skipped file that never was an image (OS files): such files are listed
# but do not count as damaged images against data.max_bad_fraction.
NOT_AN_IMAGE = "not an image"


@dataclass
class Source:
    """The examples of one source: labels always, and either image files or a TFDS split.

    Attributes:
        class_names: the source's classes; ``labels`` index into them.
        labels: the class index of every example, in order.
        paths: the image files, for folder and CSV sources.
        tfds: (name, split) for a TFDS source, loaded when a pipeline is made.
        skipped: (path, reason) for every file left out.
    """

    class_names: list[str]
    labels: np.ndarray
    paths: Optional[list[str]] = None
    tfds: Optional[tuple[str, str]] = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> "Source":
        """The examples at ``indices`` (file sources only)."""
        assert self.paths is not None
        return Source(self.class_names, self.labels[indices], [self.paths[i] for i in indices])

    def relabel(self, class_names: list[str], what: str) -> "Source":
        """The same examples with labels indexing ``class_names`` (the training classes)."""
        unknown = [name for name in self.class_names if name not in class_names]
        if unknown:
            raise DataError(f"{what} has classes the training data lacks: {', '.join(unknown)}; "
                            f"training classes: {', '.join(class_names)}. Fix: remove or rename "
                            f"those classes, or train on them too")
        mapping = np.array([class_names.index(name) for name in self.class_names], dtype=np.int64)
        return Source(class_names, mapping[self.labels] if len(self.labels) else self.labels,
                      self.paths, self.tfds, self.skipped)


@dataclass
class Data:
    """The training and validation examples of a run."""

    class_names: list[str]
    train: Source
    val: Source

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.train.skipped + self.val.skipped


def build(config: "DataConfig", seed: int) -> Data:
    """Reads ``data.train`` (and ``data.val``, or splits train) into training and validation sets."""
    train = read_source(config.train, "data.train", config.max_pixels)
    if len(train.class_names) < 2:
        raise DataError(f"data.train ({config.train}) has {len(train.class_names)} class"
                        f"{'' if len(train.class_names) == 1 else 'es'}; a classifier needs at "
                        f"least two. Fix: add a sub-folder (or CSV label) per class")
    if config.val is not None:
        val = read_source(config.val, "data.val", config.max_pixels).relabel(
            train.class_names, f"data.val ({config.val})")
    elif train.tfds is not None:
        name, split = train.tfds
        percent = 100 - round(100 * config.val_split)
        train = _tfds_source(name, f"{split}[:{percent}%]")
        val = _tfds_source(name, f"{split}[{percent}%:]")
    else:
        skipped = train.skipped
        train_index, val_index = stratified_split(train.labels, config.val_split, seed)
        if len(val_index) == 0:
            raise DataError(f"data.train ({config.train}) has too few images for a validation "
                            f"split of {config.val_split}. Fix: add images, raise data.val_split, "
                            f"or set data.val")
        train, val = train.subset(train_index), train.subset(val_index)
        train.skipped = skipped
    if len(val) == 0:
        raise DataError(f"the validation data ({config.val or config.train}) has no images. Fix: "
                        f"point data.val at a folder with images")
    return Data(train.class_names, train, val)


def read_source(spec: str, what: str = "data", max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    """Lists the examples of ``spec``: a folder of class folders, a CSV file, or tfds:NAME[:SPLIT]."""
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        return _tfds_source(name, split or "train")
    if not os.path.exists(spec):
        raise DataError(f"{what}: path not found: {spec}. Fix: check the path (relative paths "
                        f"start at the current directory)")
    if os.path.isfile(spec):
        if not spec.lower().endswith(".csv"):
            raise DataError(f"{what}: expected a folder, a .csv file or tfds:NAME, got the file {spec}")
        return _csv_source(spec, what, max_pixels)
    return _folder_source(spec, what, max_pixels)


def _folder_source(root: str, what: str, max_pixels: int) -> Source:
    classes = sorted(entry.name for entry in os.scandir(root)
                     if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        loose = any(name.lower().endswith(IMAGE_EXTENSIONS) for name in os.listdir(root))
        hint = " (it holds images directly: move them into one sub-folder per class)" if loose else ""
        raise DataError(f"{what}: no class sub-folders in {root}{hint}; expected "
                        f"{root}/<class name>/<images>. Fix: make one sub-folder per class")
    paths: list[str] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    for index, name in enumerate(classes):
        found = images_below(os.path.join(root, name), skipped, max_pixels)
        if not found:
            raise DataError(f"{what}: class folder {os.path.join(root, name)} has no usable images "
                            f"({', '.join(IMAGE_EXTENSIONS)}, any case, any depth). Fix: add images "
                            f"or remove the folder")
        paths.extend(found)
        labels.extend([index] * len(found))
    return Source(classes, np.array(labels, dtype=np.int64), paths, skipped=skipped)


def images_below(folder: str, skipped: list[tuple[str, str]],
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> list[str]:
    """Usable image files below ``folder`` (symbolic links to folders are not followed, so a
    link loop cannot trap the walk); every file passed over that a person would call an image,
    or that a system left there, is added to ``skipped`` with the reason."""
    found = []
    for directory, subdirectories, files in os.walk(folder):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(directory, name)
            lower = name.lower()
            if name.startswith("._"):
                skipped.append((path, f"macOS metadata file (AppleDouble), {NOT_AN_IMAGE}"))
            elif lower in SYSTEM_FILES:
                skipped.append((path, f"{SYSTEM_FILES[lower]}, {NOT_AN_IMAGE}"))
            elif lower.endswith(UNSUPPORTED_EXTENSIONS):
                skipped.append((path, f"{os.path.splitext(lower)[1][1:].upper()} images cannot be "
                                      f"decoded by TensorFlow; convert them to JPEG or PNG"))
            elif lower.endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                reason = check_image_file(path, max_pixels)
                if reason:
                    skipped.append((path, reason))
                else:
                    found.append(path)
    return found


def check_image_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Optional[str]:
    """Returns why ``path`` cannot be an image tf.io.decode_image reads, or None when it can be.

    Cheap: it reads the header (format, and the size in pixels through Pillow, which reads no
    pixel data) and the last bytes (a truncated JPEG, PNG, GIF or BMP lacks its end marker),
    not the whole image.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(32)
            handle.seek(max(0, size - 1024))
            tail = handle.read()
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    if not head:
        return "empty file"
    kind = _format_of(head)
    if kind is None:
        return "not a JPEG, PNG, GIF, BMP or WebP image (file header)"
    truncated = {
        "JPEG": b"\xff\xd9" not in tail,
        "PNG": b"IEND" not in tail[-64:],
        "GIF": b"\x3b" not in tail[-16:],
        "BMP": len(head) >= 6 and int.from_bytes(head[2:6], "little") > size,
        "WebP": len(head) >= 8 and int.from_bytes(head[4:8], "little") + 8 > size,
    }[kind]
    if truncated:
        return f"truncated {kind} (the file ends before the image does)"
    try:
        from PIL import Image

        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # Pillow cannot read every file TensorFlow can; the size check is then skipped.
        return None
    if width * height > max_pixels:
        return (f"{width}x{height} pixels is over data.max_pixels ({max_pixels:,}); raise it to "
                f"use this image")
    return None


def _format_of(head: bytes) -> Optional[str]:
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WebP"
    return None


def find_undecodable(paths: list[str]) -> list[str]:
    """The files TensorFlow fails to decode, found by decoding each one (used after a decode
    error stopped training, to say which file it was)."""
    import tensorflow as tf

    failed = []
    for path in paths:
        try:
            decode_image(tf.io.read_file(path))
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError):
            failed.append(path)
    return failed


def check_bad_fraction(data: "Data", max_bad_fraction: float) -> None:
    """Stops before training when too many image files had to be left out."""
    bad = [path for path, reason in data.skipped if not reason.endswith(NOT_AN_IMAGE)]
    total = len(bad) + len(data.train) + len(data.val)
    if not bad or len(bad) / total <= max_bad_fraction:
        return
    folders: dict[str, int] = {}
    for path in bad:
        folders[os.path.dirname(path)] = folders.get(os.path.dirname(path), 0) + 1
    worst, count = max(folders.items(), key=lambda item: item[1])
    raise DataError(f"{len(bad)} of {total} image files ({len(bad) / total:.0%}) cannot be used, more "
                    f"than data.max_bad_fraction ({max_bad_fraction}); the most ({count}) are in {worst}. "
                    f"Fix: see skipped.jsonl in the run directory for each file and reason, repair or "
                    f"remove them, or raise data.max_bad_fraction")


def _csv_source(path: str, what: str, max_pixels: int) -> Source:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{what}: {path} needs a header line 'path,label', got "
                            f"{','.join(reader.fieldnames or [])!r}. Fix: add that header")
        rows = [(row["path"], row["label"]) for row in reader]
    if not rows:
        raise DataError(f"{what}: {path} lists no images. Fix: add lines 'path,label'")
    class_names = sorted({label for _, label in rows})
    paths, labels, skipped = [], [], []
    for relative, label in rows:
        image = relative if os.path.isabs(relative) else os.path.join(base, relative)
        if not os.path.exists(image):
            skipped.append((image, "listed in the CSV but not found"))
            continue
        reason = check_image_file(image, max_pixels)
        if reason:
            skipped.append((image, reason))
            continue
        paths.append(image)
        labels.append(class_names.index(label))
    if not paths:
        raise DataError(f"{what}: none of the {len(rows)} files listed in {path} is a usable "
                        f"image (first: {skipped[0][0]}: {skipped[0][1]}). Fix: paths are "
                        f"relative to the CSV's folder")
    return Source(class_names, np.array(labels, dtype=np.int64), paths, skipped=skipped)


def _tfds_source(name: str, split: str) -> Source:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name)
        builder.download_and_prepare()
        label_dataset = builder.as_dataset(split=split, as_supervised=True,
                                           decoders=_skip_image_decoding(builder))
    except Exception as error:  # tfds raises many kinds; all mean the same to the user.
        message = first_line(error, limit=None)
        raise DataError(f"cannot load TFDS dataset {name}:{split} ({message}). Fix: check the "
                        f"name and split (see the TFDS catalog), and TFDS_DATA_DIR when offline") from None
    label_feature = builder.info.features[builder.info.supervised_keys[1]]
    class_names = list(getattr(label_feature, "names", None) or
                       [str(i) for i in range(label_feature.num_classes)])
    labels = np.array([int(label) for _, label in tfds.as_numpy(label_dataset)], dtype=np.int64)
    return Source(class_names, labels, tfds=(name, split))


def _skip_image_decoding(builder) -> Optional[dict]:
    import tensorflow_datasets as tfds

    image_key = builder.info.supervised_keys[0]
    return {image_key: tfds.decode.SkipDecoding()}


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split holding out ``val_fraction`` of each class (at least one image of any class
    with two or more, never a class's last image). Returns sorted (train, val) indices."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        count = len(members)
        held = 0 if count < 2 else min(count - 1, max(1, round(count * val_fraction)))
        val.extend(members[:held])
        train.extend(members[held:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced class weights: n / (classes x class count), for the classes present."""
    counts = np.bincount(labels, minlength=num_classes)
    present = np.count_nonzero(counts)
    return {i: float(len(labels) / (present * c)) for i, c in enumerate(counts) if c > 0}


def steps_per_epoch(source: Source, batch_size: int) -> int:
    return max(1, math.ceil(len(source) / batch_size))


# -- tf.data -----------------------------------------------------------------------------------

def decode_image(encoded: "tf.Tensor") -> "tf.Tensor":
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [height, width, 3] (first frame of a GIF)."""
    import tensorflow as tf

    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize(images: "tf.Tensor", image_size: tuple[int, int]) -> "tf.Tensor":
    """Bilinear resize to float32, the same operation ``keras.layers.Resizing`` applies inside
    the model, so a pipeline-resized image and a raw one fed to the model give the same input."""
    import tensorflow as tf

    return tf.image.resize(images, image_size, method="bilinear", antialias=False)


def pipeline(source: Source, num_classes: int, image_size: tuple[int, int], batch_size: int, *,
             training: bool, augment: Optional["AugmentConfig"] = None, seed: int = 0) -> "tf.data.Dataset":
    """Batches of (float32 images 0-255 [batch, height, width, 3], one-hot labels).

    Training data is shuffled (with ``seed``, anew each epoch) and augmented; validation data is
    neither.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    if source.paths is not None:
        dataset = tf.data.Dataset.from_tensor_slices((source.paths, source.labels))
        if training:
            dataset = dataset.shuffle(len(source), seed=seed, reshuffle_each_iteration=True)
        # No ignore_errors() here: it would drop files silently and make the dataset's length
        # unknown to Keras. A file damaged past the checks stops fit, which names it
        # (find_undecodable) so the run can resume without it.
        dataset = dataset.map(lambda path, label: (decode_image(tf.io.read_file(path)), label),
                              num_parallel_calls=autotune)
    else:
        import tensorflow_datasets as tfds

        name, split = source.tfds
        dataset = tfds.load(name, split=split, as_supervised=True, shuffle_files=False)
        dataset = dataset.map(lambda image, label: (_to_rgb(image), label), num_parallel_calls=autotune)
        if training:
            dataset = dataset.shuffle(min(len(source), 10_000), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(
        lambda image, label: (resize(image, image_size), tf.one_hot(label, num_classes)),
        num_parallel_calls=autotune)
    dataset = dataset.batch(batch_size)
    if training:
        dataset = augment_batches(dataset, augment, seed)
    return dataset.prefetch(autotune)


def augment_batches(dataset: "tf.data.Dataset", augment: Optional["AugmentConfig"], seed: int) -> "tf.data.Dataset":
    """Applies the configured random augmentation to batches of (images, labels)."""
    import tensorflow as tf

    augmenter = make_augmenter(augment, seed) if augment is not None else None
    if augmenter is None:
        return dataset
    return dataset.map(lambda images, labels: (augmenter(images), labels), num_parallel_calls=tf.data.AUTOTUNE)


def _to_rgb(image: "tf.Tensor") -> "tf.Tensor":
    import tensorflow as tf

    image = tf.image.convert_image_dtype(image, tf.uint8) if image.dtype != tf.uint8 else image
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    elif image.shape[-1] == 4:
        image = image[..., :3]
    return image


def make_augmenter(augment: "AugmentConfig", seed: int):
    """A function applying the configured random transforms to a float batch, or None if none is on."""
    import keras

    layers = []
    if augment.flip != "none":
        layers.append(keras.layers.RandomFlip(augment.flip, seed=seed))
    if augment.rotation > 0:
        layers.append(keras.layers.RandomRotation(augment.rotation, fill_mode="reflect", seed=seed + 1))
    if augment.zoom > 0:
        layers.append(keras.layers.RandomZoom(augment.zoom, fill_mode="reflect", seed=seed + 2))
    if augment.contrast > 0:
        layers.append(keras.layers.RandomContrast(augment.contrast, value_range=(0, 255), seed=seed + 3))
    if not layers:
        return None

    def apply(images):
        for layer in layers:
            images = layer(images, training=True)
        return images

    return apply
