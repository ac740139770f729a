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
                       "page.jpg": "not a JPEG, PNG, GIF or BMP image (file header)"}


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
