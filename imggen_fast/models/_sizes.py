"""Size arithmetic shared by the models."""

from __future__ import annotations

IMAGE_SIZES = (8, 16, 32, 64)
BASE_SIZE = 4  # the generator starts, and the discriminator/encoder end, at 4 x 4


def stride2_stages(image_size: int, owner: str) -> int:
    """Number of stride-2 stages between 4 x 4 and ``image_size`` (a power of two >= 8)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8 or image_size & (
            image_size - 1):
        raise ValueError(f"{owner}: image_size must be a power of two >= 8 (8, 16, 32, 64, ...), "
                         f"got {image_size!r}")
    return (image_size // BASE_SIZE).bit_length() - 1


def check_positive(value: int, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value
