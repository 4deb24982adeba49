"""Sample quality without downloads: the classifier-FID and the class spread.

The classifier-FID is the Fréchet distance between Gaussians fitted to a trained
digit classifier's penultimate-layer features of generated images and of held-out
real images: the Fréchet Inception Distance with the Inception network replaced by a
classifier trained on the data set itself, as used for MNIST in the GAN literature.
Lower is better; 0 means the two feature distributions have the same mean and
covariance. Like FID, it is biased upwards for few images, so compare scores computed
from the same numbers of images. The class spread says which digits the classifier
sees in the samples: a generator that draws only a few digits (mode collapse) has a
low normalised entropy."""

from __future__ import annotations

import math

import torch
from torch import nn

from .models import CNN

FEATURE_BATCH = 500


def _check_images(images: object, classifier: CNN, argument: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"{argument} must be a tensor (N, C, H, W), got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    expected = (classifier.channels, classifier.image_size, classifier.image_size)
    if tuple(images.shape[1:]) != expected:
        raise ValueError(f"{argument}: the classifier takes images of shape (N, {', '.join(map(str, expected))}), "
                         f"got {tuple(images.shape)}")
    if images.shape[0] < 2:
        raise ValueError(f"{argument}: needs at least 2 images for a covariance, got {images.shape[0]}")


@torch.no_grad()
def classifier_outputs(classifier: CNN, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features (N, hidden width), logits (N, classes)) of ``classifier``, a
    :class:`~imggen_fast.models.CNN` (plain or patched), for images (N, C, H, W) in
    [-1, 1], computed in eval mode in batches on the classifier's device."""
    _check_images(images, classifier, "images")
    device = next(classifier.parameters()).device
    # The CNN's head is Flatten, Linear+LeakyReLU, Linear: all but the last layer give the features.
    body: nn.Module = classifier.classifier[:-1]
    last: nn.Module = classifier.classifier[-1]
    was_training = classifier.training
    classifier.eval()
    features, logits = [], []
    for batch in images.split(FEATURE_BATCH):
        hidden = body(classifier.features(batch.to(device)))
        features.append(hidden.double().cpu())
        logits.append(last(hidden).cpu())
    classifier.train(was_training)
    return torch.cat(features), torch.cat(logits)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D), (N_b, D):
    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``, in float64.

    The trace of the matrix square root is taken as the sum of the square roots of the
    eigenvalues of the symmetric ``C_a^(1/2) C_b C_a^(1/2)`` (the same eigenvalues as
    ``C_a C_b``), which stays real and stable where ``scipy.linalg.sqrtm`` can return
    complex noise."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"frechet_distance: features must be (N, D) with the same D, got "
                         f"{tuple(features_a.shape)} and {tuple(features_b.shape)}")
    if min(features_a.shape[0], features_b.shape[0]) < 2:
        raise ValueError("frechet_distance: each feature set needs at least 2 rows")
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    covariance_a, covariance_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance_a)
    root_a = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    middle = root_a @ covariance_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).square().sum() + covariance_a.trace() + covariance_b.trace() - 2 * trace_root
    return float(distance.clamp(min=0))


def class_spread(logits: torch.Tensor) -> dict[str, object]:
    """What the classifier sees in a set of images, from its logits (N, classes):
    ``histogram`` (the share of images predicted as each class), ``normalized_entropy``
    (of that histogram, divided by log(classes): 1 for a uniform spread, 0 when every
    image is one class) and ``classes_seen`` (classes predicted for at least 1 % of the
    images)."""
    classes = logits.shape[1]
    counts = torch.bincount(logits.argmax(1), minlength=classes).double()
    shares = counts / counts.sum()
    nonzero = shares[shares > 0]
    # + 0.0: a single class gives -(1 * log 1) = -0.0, and -0.0 + 0.0 is 0.0.
    entropy = float(-(nonzero * nonzero.log()).sum()) / math.log(classes) + 0.0 if classes > 1 else 0.0
    return {
        "histogram": [round(float(share), 4) for share in shares],
        "normalized_entropy": round(entropy, 4),
        "classes_seen": int((shares >= 0.01).sum()),
    }


def accuracy(classifier: CNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``images`` (N, C, H, W) whose predicted class equals ``labels`` (N,)."""
    if labels.shape != (images.shape[0],):
        raise ValueError(f"accuracy: labels must be (N,) = ({images.shape[0]},), got {tuple(labels.shape)}")
    _, logits = classifier_outputs(classifier, images)
    return float((logits.argmax(1) == labels.cpu()).double().mean())


def sample_quality(classifier: CNN, generated: torch.Tensor, real: torch.Tensor) -> dict[str, object]:
    """The classifier-FID of ``generated`` against ``real`` images (each (N, C, H, W) in
    [-1, 1], held-out real images, never the training set) and the class spread of
    both, as a JSON-ready dict."""
    _check_images(generated, classifier, "generated")
    _check_images(real, classifier, "real")
    generated_features, generated_logits = classifier_outputs(classifier, generated)
    real_features, real_logits = classifier_outputs(classifier, real)
    if not torch.isfinite(generated_features).all():
        raise ValueError("generated: the classifier's features of the generated images are not finite "
                         "(the generator produced NaN or infinite values)")
    return {
        "classifier_fid": round(frechet_distance(generated_features, real_features), 4),
        "class_spread": class_spread(generated_logits),
        "real_class_spread": class_spread(real_logits),
        "generated_images": generated.shape[0],
        "real_images": real.shape[0],
    }

