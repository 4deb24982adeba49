"""Data sets: scikit-learn's bundled 8 x 8 digits (no download) and folders of images.

Both return a :class:`torch.utils.data.Dataset` of ``(image, label)`` pairs with images
(channels, image_size, image_size) in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("all", "train", "test")
# The fixed split of the 1,797 digits: the first 1,437 images (80 %, in scikit-learn's
# order) are "train", the last 360 are "test". Every class appears in both.
DIGITS_TRAIN_COUNT = 1437
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


def digits(image_size: int = 32, channels: int = 1, split: str = "all") -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits (8 x 8, bundled with the package), scaled
    to [-1, 1], resized bilinearly to ``image_size`` and repeated to ``channels``.

    ``split``: ``"all"``, ``"train"`` (the first 1,437 in scikit-learn's order) or
    ``"test"`` (the last 360). Labels are the digits 0-9."""
    _check_size(image_size, channels, "digits")
    if split not in SPLITS:
        raise ValueError(f"digits: split must be one of {', '.join(SPLITS)}, got {split!r}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 16.0 * 2.0 - 1.0
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    if split == "train":
        images, labels = images[:DIGITS_TRAIN_COUNT], labels[:DIGITS_TRAIN_COUNT]
    elif split == "test":
        images, labels = images[DIGITS_TRAIN_COUNT:], labels[DIGITS_TRAIN_COUNT:]
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp_(-1.0, 1.0).repeat(1, channels, 1, 1).contiguous()
    return ImageDataset(images, labels)


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
