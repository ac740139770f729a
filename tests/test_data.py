"""Sources (folder, CSV, TFDS), the validation split, and the tf.data pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tfsft import data
from tfsft.config import AugmentConfig, DataConfig
from tfsft.errors import DataError


def save_image(path, size=(20, 30), colour=(200, 10, 10), mode="RGB", file_format=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path, format=file_format)
    return path


def test_folder_classes_are_sorted_subfolders_with_images_at_any_depth_and_any_case(tmp_path):
    save_image(tmp_path / "zebra" / "a.JPG", file_format="JPEG")
    save_image(tmp_path / "zebra" / "deep" / "deeper" / "b.png")
    save_image(tmp_path / "ant" / "c.bmp")
    save_image(tmp_path / "ant" / "d.gif", file_format="GIF")
    save_image(tmp_path / "ant" / "e.Jpeg", file_format="JPEG")
    (tmp_path / "ant" / "notes.txt").write_text("not an image, ignored")
    (tmp_path / ".hidden_class").mkdir()
    source = data.read_source(str(tmp_path))
    assert source.class_names == ["ant", "zebra"]
    assert sorted(np.bincount(source.labels).tolist()) == [2, 3]
    assert len(source.paths) == 5
    assert source.skipped == []


def test_files_that_are_not_images_are_skipped_and_reported(tmp_path):
    save_image(tmp_path / "a" / "good.jpg", file_format="JPEG")
    save_image(tmp_path / "b" / "good.png")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    (tmp_path / "b" / "page.jpg").write_text("<html>not found</html>")
    (tmp_path / "b" / "._good.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    source = data.read_source(str(tmp_path))
    assert len(source.paths) == 2
    reasons = dict((path.split("/")[-1], reason) for path, reason in source.skipped)
    assert reasons == {"empty.jpg": "empty file",
                       "page.jpg": "not a JPEG, PNG, GIF, BMP or WebP image (file header)",
                       "._good.png": "macOS metadata file (AppleDouble), not an image"}


def encoded(image, file_format, **options):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format=file_format, **options)
    return buffer.getvalue()


def test_messy_folder_keeps_every_decodable_image_and_reports_the_rest(tmp_path):
    import os

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8))
    good, bad = tmp_path / "good", tmp_path / "bad"
    kept = {
        "cmyk.jpg": encoded(rgb.convert("CMYK"), "JPEG"),
        "gray.png": encoded(rgb.convert("L"), "PNG"),
        "rgba.png": encoded(rgb.convert("RGBA"), "PNG"),
        "palette.png": encoded(rgb.convert("P"), "PNG"),
        "sixteen_bit.png": encoded(Image.fromarray(rng.integers(0, 65535, (24, 36)).astype(np.uint16)), "PNG"),
        "animated.gif": encoded(rgb, "GIF", save_all=True, append_images=[rgb.rotate(90)]),
        "plain.bmp": encoded(rgb, "BMP"),
        "UPPER.JPEG": encoded(rgb, "JPEG"),
        "café_été.jpg": encoded(rgb, "JPEG"),
        "photo.webp": encoded(rgb, "WEBP"),
    }
    for name, data_bytes in kept.items():
        (good / name).parent.mkdir(parents=True, exist_ok=True)
        (good / name).write_bytes(data_bytes)
    jpeg, png = encoded(rgb, "JPEG"), encoded(rgb, "PNG")
    broken = {
        "zero.jpg": (b"", "empty file"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated JPEG"),
        "cut.png": (png[: len(png) // 2], "truncated PNG"),
        "page.jpg": (b"<!DOCTYPE html><html>404</html>", "not a JPEG, PNG, GIF, BMP or WebP image"),
        "._photo.jpg": (b"\x00\x05\x16\x07", "AppleDouble"),
        ".DS_Store": (b"\x00\x00\x00\x01Bud1", "macOS folder metadata"),
        "Thumbs.db": (b"\xd0\xcf\x11\xe0", "Windows thumbnail cache"),
        "desktop.ini": (b"[.ShellClassInfo]", "Windows folder settings"),
        "scan.tiff": (encoded(rgb, "TIFF"), "TIFF images cannot be decoded by TensorFlow"),
    }
    for name, (data_bytes, _) in broken.items():
        (bad / name).parent.mkdir(parents=True, exist_ok=True)
        (bad / name).write_bytes(data_bytes)
    (bad / "ok.jpg").write_bytes(jpeg)
    os.symlink(str(tmp_path / "missing.jpg"), str(bad / "dangling.jpg"))
    os.symlink(str(bad), str(bad / "loop"))  # a link back up: must not be followed forever
    source = data.read_source(str(tmp_path))
    reasons = {os.path.basename(path): reason for path, reason in source.skipped}
    for name, (_, reason) in broken.items():
        assert reason in reasons.pop(name), name
    assert reasons.pop("dangling.jpg").startswith("unreadable")
    assert reasons == {}
    assert sorted(os.path.basename(p) for p in source.paths) == sorted(list(kept) + ["ok.jpg"])
    images, _ = next(iter(data.pipeline(source, 2, (16, 16), len(source), training=False)))
    assert images.shape == (len(source), 16, 16, 3)


def test_images_over_the_pixel_limit_are_left_out_from_the_header(tmp_path):
    save_image(tmp_path / "a" / "small.png", size=(8, 8))
    save_image(tmp_path / "a" / "large.png", size=(40, 30))
    source = data.read_source(str(tmp_path), max_pixels=100)
    assert [p.split("/")[-1] for p in source.paths] == ["small.png"]
    assert "40x30 pixels is over data.max_pixels (100)" in source.skipped[0][1]


def test_too_many_bad_files_stop_the_run_naming_the_worst_folder(tmp_path):
    for index in range(4):
        save_image(tmp_path / "cats" / f"{index}.png")
        save_image(tmp_path / "dogs" / f"{index}.png")
    for index in range(3):
        (tmp_path / "dogs" / "broken" / f"{index}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dogs" / "broken" / f"{index}.jpg").write_bytes(b"")
    (tmp_path / "cats" / "._0.png").write_bytes(b"\x00\x05")  # junk does not count as a bad image
    built = data.build(DataConfig(train=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match=r"3 of 11 image files \(27%\).*most \(3\) are in .*dogs/broken"):
        data.check_bad_fraction(built, 0.1)
    data.check_bad_fraction(built, 0.3)


@pytest.mark.parametrize("layout, message", [
    ({}, "no class sub-folders"),
    ({"only_class/a.png": True}, "has 1 class"),
    ({"a/x.png": True, "b/readme.txt": False}, "b has no usable images"),
])
def test_unusable_folders_get_a_clear_error(tmp_path, layout, message):
    for relative, is_image in layout.items():
        if is_image:
            save_image(tmp_path / relative)
        else:
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / relative).write_text("x")
    with pytest.raises(DataError, match=message):
        data.build(DataConfig(train=str(tmp_path)), seed=0)


def test_loose_images_without_class_folders_are_explained(tmp_path):
    save_image(tmp_path / "a.png")
    with pytest.raises(DataError, match="move them into one sub-folder per class"):
        data.read_source(str(tmp_path))


def test_missing_path():
    with pytest.raises(DataError, match="path not found: nowhere/at/all"):
        data.read_source("nowhere/at/all", "data.train")


def test_validation_folder_with_unknown_class_is_an_error(tmp_path):
    for name in ("cat", "dog"):
        save_image(tmp_path / "train" / name / "x.png")
    save_image(tmp_path / "val" / "cat" / "x.png")
    save_image(tmp_path / "val" / "horse" / "x.png")
    with pytest.raises(DataError, match="classes the training data lacks: horse"):
        data.build(DataConfig(train=str(tmp_path / "train"), val=str(tmp_path / "val")), seed=0)


def test_validation_folder_with_fewer_classes_maps_labels_by_name(tmp_path):
    for name in ("ant", "bee", "cat"):
        save_image(tmp_path / "train" / name / "x.png")
    save_image(tmp_path / "val" / "cat" / "y.png")
    built = data.build(DataConfig(train=str(tmp_path / "train"), val=str(tmp_path / "val")), seed=0)
    assert built.class_names == ["ant", "bee", "cat"]
    assert built.val.labels.tolist() == [2]


def test_csv_source_resolves_paths_against_its_folder(tmp_path):
    save_image(tmp_path / "images" / "1.png")
    save_image(tmp_path / "images" / "2.png")
    save_image(tmp_path / "images" / "3.png")
    (tmp_path / "list.csv").write_text("path,label\nimages/1.png,rose\nimages/2.png,tulip\n"
                                       "images/3.png,rose\nimages/missing.png,tulip\n")
    source = data.read_source(str(tmp_path / "list.csv"))
    assert source.class_names == ["rose", "tulip"]
    assert source.labels.tolist() == [0, 1, 0]
    assert source.paths[0] == str(tmp_path / "images" / "1.png")
    assert source.skipped == [(str(tmp_path / "images" / "missing.png"), "listed in the CSV but not found")]


def test_csv_without_header_is_explained(tmp_path):
    (tmp_path / "list.csv").write_text("a.png,rose\n")
    with pytest.raises(DataError, match="needs a header line 'path,label'"):
        data.read_source(str(tmp_path / "list.csv"))


def test_stratified_split_is_seeded_and_keeps_every_class():
    labels = np.array([0] * 50 + [1] * 10 + [2] * 3 + [3] * 1)
    train, val = data.stratified_split(labels, 0.2, seed=7)
    again_train, again_val = data.stratified_split(labels, 0.2, seed=7)
    assert train.tolist() == again_train.tolist() and val.tolist() == again_val.tolist()
    assert set(train) | set(val) == set(range(len(labels))) and not set(train) & set(val)
    assert np.bincount(labels[val], minlength=4).tolist() == [10, 2, 1, 0]
    other_train, _ = data.stratified_split(labels, 0.2, seed=8)
    assert other_train.tolist() != train.tolist()


def test_balanced_class_weights():
    weights = data.class_weights(np.array([0, 0, 0, 1]), 2)
    assert weights == {0: pytest.approx(4 / 6), 1: pytest.approx(2.0)}


def test_pipeline_yields_resized_float_batches_and_one_hot_labels(shapes_dir):
    source = data.read_source(shapes_dir)
    dataset = data.pipeline(source, 3, (32, 48), 5, training=False)
    images, labels = next(iter(dataset))
    assert images.shape == (5, 32, 48, 3) and images.dtype.name == "float32"
    assert 0 <= float(np.min(images)) and float(np.max(images)) <= 255
    assert labels.shape == (5, 3) and np.allclose(np.sum(labels, axis=1), 1)
    total = sum(int(batch[0].shape[0]) for batch in dataset)
    assert total == len(source)


def test_grayscale_rgba_palette_and_gif_decode_to_three_channels(tmp_path):
    save_image(tmp_path / "a" / "gray.png", mode="L")
    save_image(tmp_path / "a" / "rgba.png", mode="RGBA", colour=(10, 20, 30, 128))
    save_image(tmp_path / "b" / "palette.png", mode="P")
    save_image(tmp_path / "b" / "anim.gif", file_format="GIF")
    source = data.read_source(str(tmp_path))
    images, _ = next(iter(data.pipeline(source, 2, (16, 16), 4, training=False)))
    assert images.shape == (4, 16, 16, 3)


def test_validation_pipeline_is_deterministic_and_training_is_augmented(shapes_dir):
    source = data.read_source(shapes_dir)
    val = data.pipeline(source, 3, (32, 32), 36, training=False)
    first, second = next(iter(val))[0].numpy(), next(iter(val))[0].numpy()
    np.testing.assert_array_equal(first, second)

    augment = AugmentConfig(flip="horizontal", rotation=0.1, zoom=0.1, contrast=0.1)
    train = data.pipeline(source, 3, (32, 32), 36, training=True, augment=augment, seed=3)
    plain = data.pipeline(source, 3, (32, 32), 36, training=True, augment=None, seed=3)
    augmented_batch, labels = next(iter(train))
    plain_batch, plain_labels = next(iter(plain))
    np.testing.assert_array_equal(labels, plain_labels)  # same shuffle order, same seed
    assert not np.allclose(augmented_batch, plain_batch), "augmentation changed nothing"
    assert float(np.min(augmented_batch)) >= 0 and float(np.max(augmented_batch)) <= 255.5


def test_tfds_source_with_class_names_from_dataset_info():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=20):
        built = data.build(DataConfig(train="tfds:mnist", val_split=0.25), seed=0)
        assert built.class_names == [str(i) for i in range(10)]
        # mock_data ignores split slicing, so check the slices asked for.
        assert built.train.tfds == ("mnist", "train[:75%]")
        assert built.val.tfds == ("mnist", "train[75%:]")
        assert len(built.train) == 20 and built.train.labels.max() < 10
        images, labels = next(iter(data.pipeline(built.train, 10, (32, 32), 4, training=True)))
        assert images.shape == (4, 32, 32, 3) and labels.shape == (4, 10)


def test_unknown_tfds_name_is_one_line():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match="cannot load TFDS dataset no_such_dataset_xyz:train"):
        data.read_source("tfds:no_such_dataset_xyz")
