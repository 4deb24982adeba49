"""A small convolutional digit classifier."""

from __future__ import annotations

import torch
from torch import nn

from ._sizes import check_positive

SLOPE = 0.2
CONV_CHANNELS = (32, 64)
HIDDEN_WIDTH = 128


class CNN(nn.Module):
    """Images (N, channels, image_size, image_size) -> class logits (N, num_classes).

    Conv2d(3x3)+LeakyReLU, 2x2 max-pooling, Conv2d(3x3)+LeakyReLU, 2x2 max-pooling,
    Linear+LeakyReLU, Linear. ``image_size`` must be divisible by 4."""

    def __init__(self, image_size: int = 32, channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        check_positive(image_size, "image_size", "CNN")
        if image_size % 4:
            raise ValueError(f"CNN: image_size must be divisible by 4 (two 2x2 poolings), got {image_size}")
        self.image_size = image_size
        self.channels = check_positive(channels, "channels", "CNN")
        self.num_classes = check_positive(num_classes, "num_classes", "CNN")
        first, second = CONV_CHANNELS
        self.features = nn.Sequential(
            nn.Conv2d(channels, first, 3, padding=1), nn.LeakyReLU(SLOPE), nn.MaxPool2d(2),
            nn.Conv2d(first, second, 3, padding=1), nn.LeakyReLU(SLOPE), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * (image_size // 4) ** 2, HIDDEN_WIDTH), nn.LeakyReLU(SLOPE),
            nn.Linear(HIDDEN_WIDTH, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))
