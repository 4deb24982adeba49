"""The built-in digits and image folders."""

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


@pytest.mark.parametrize("arguments,message", [
    ({"split": "validation"}, "split must be one of"),
    ({"image_size": 0}, "image_size must be a positive integer"),
    ({"channels": 2}, "channels must be 1 or 3"),
])
def test_digits_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        data.digits(**arguments)


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
