"""The classifier-FID and class spread (imggen_fast.quality)."""

import math

import numpy as np
import pytest
import torch

from imggen_fast import models, patch, quality


def _scipy_frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The textbook formula through scipy's sqrtm."""
    from scipy import linalg

    mean_a, mean_b = features_a.mean(0), features_b.mean(0)
    covariance_a, covariance_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    root = linalg.sqrtm(covariance_a @ covariance_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(covariance_a + covariance_b - 2 * root))


def test_frechet_distance_matches_scipys_sqrtm():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 12, generator=generator, dtype=torch.float64) @ torch.randn(12, 12, generator=generator,
                                                                                       dtype=torch.float64)
    b = torch.randn(300, 12, generator=generator, dtype=torch.float64) * 2 + 0.5
    expected = _scipy_frechet_distance(a.numpy(), b.numpy())
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_gaussians_with_known_answer():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(2000, 4, generator=generator, dtype=torch.float64)
    assert quality.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    # A shift of the mean by d adds |d|^2; the covariances are the same.
    shift = torch.tensor([3.0, 0.0, 4.0, 0.0], dtype=torch.float64)
    assert quality.frechet_distance(a, a + shift) == pytest.approx(25.0, rel=1e-9)
    # Scaling by s: |(1 - s) mu|^2 + tr(C + s^2 C - 2 s C) = (1 - s)^2 (|mu|^2 + tr(C)).
    expected = 4 * (a.mean(0).square().sum() + torch.cov(a.T).trace()).item()
    assert quality.frechet_distance(a, 3 * a) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_bad_input():
    with pytest.raises(ValueError, match="same D"):
        quality.frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2 rows"):
        quality.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_class_spread():
    logits = torch.full((100, 10), -5.0)
    logits[:50, 3] = 5
    logits[50:99, 7] = 5
    logits[99, 1] = 5
    spread = quality.class_spread(logits)
    assert spread["histogram"][3] == 0.5 and spread["histogram"][7] == 0.49 and spread["histogram"][1] == 0.01
    expected = -(0.5 * math.log(0.5) + 0.49 * math.log(0.49) + 0.01 * math.log(0.01)) / math.log(10)
    assert spread["normalized_entropy"] == pytest.approx(expected, abs=1e-4)
    assert spread["classes_seen"] == 3
    uniform = quality.class_spread(torch.eye(10).repeat(5, 1))
    assert uniform["normalized_entropy"] == pytest.approx(1.0) and uniform["classes_seen"] == 10
    collapsed = quality.class_spread(torch.eye(10)[[4] * 8])
    assert collapsed["histogram"][4] == 1 and collapsed["classes_seen"] == 1
    assert str(collapsed["normalized_entropy"]) == "0.0"  # not -0.0


def test_sample_quality_features_are_the_penultimate_layer_of_plain_and_patched_cnns():
    torch.manual_seed(0)
    classifier = models.CNN(image_size=8, channels=1)
    images = torch.rand(20, 1, 8, 8) * 2 - 1
    features, logits = quality.classifier_outputs(classifier, images)
    with torch.no_grad():
        torch.testing.assert_close(logits, classifier(images))
        hidden = classifier.classifier[:-1](classifier.features(images))
    torch.testing.assert_close(features, hidden.double())
    assert features.shape == (20, models.cnn.HIDDEN_WIDTH)
    patched_features, _ = quality.classifier_outputs(patch(classifier), images)
    torch.testing.assert_close(patched_features, features, rtol=1e-5, atol=1e-6)

    result = quality.sample_quality(classifier, images[:10], images[10:])
    assert result["classifier_fid"] >= 0 and result["generated_images"] == 10 and result["real_images"] == 10
    same = quality.sample_quality(classifier, images, images)
    assert same["classifier_fid"] == pytest.approx(0, abs=1e-3)


def test_sample_quality_bad_input():
    classifier = models.CNN(image_size=8, channels=1)
    with pytest.raises(ValueError, match=r"generated: the classifier takes images of shape \(N, 1, 8, 8\)"):
        quality.sample_quality(classifier, torch.zeros(4, 1, 16, 16), torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValueError, match="real: needs at least 2 images"):
        quality.sample_quality(classifier, torch.zeros(4, 1, 8, 8), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="not finite"):
        quality.sample_quality(classifier, torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValueError, match="labels must be"):
        quality.accuracy(classifier, torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.int64))
