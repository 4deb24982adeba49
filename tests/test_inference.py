"""imggen_fast.fuse_for_inference: BatchNorms folded into the layer before them, then
activations fused; outputs equal the eval-mode original, which stays untouched."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import imggen_fast
from imggen_fast import models
from imggen_fast import nn as fused_nn


def with_statistics(model, inputs, steps=3):
    """``model`` after a few training forwards (running statistics away from 0 and 1),
    with random affine batch norm parameters, in eval mode."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*inputs)
    return model.eval()


def assert_folded_like(model, inputs, folded_count, trace=False):
    before = copy.deepcopy(model.state_dict())
    folded = imggen_fast.fuse_for_inference(model, trace=trace)
    report = imggen_fast.patch_report(folded)
    assert len(report.of("folded")) == folded_count, str(report)
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    with torch.no_grad():
        expected = model(*inputs)
        torch.testing.assert_close(folded(*inputs), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)  # the original is untouched
    return folded, report


@pytest.mark.parametrize("trace", [False, True])
@pytest.mark.parametrize("image_size,width", [(8, 3), (16, 5)])
def test_dcgan_generator_and_discriminator_fold(trace, image_size, width):
    generator = models.Generator(image_size=image_size, channels=3, noise_dim=7, kind="dcgan", width=width)
    noise = torch.randn(5, 7)
    generator = with_statistics(generator, (noise * 2 + 1,))
    folded, report = assert_folded_like(generator, (noise,), (image_size // 4).bit_length() - 1, trace)
    layers = [m for m in folded.modules() if isinstance(m, (nn.ConvTranspose2d, nn.BatchNorm2d))]
    assert all(isinstance(m, nn.ConvTranspose2d) for m in layers)  # every BatchNorm folded away
    assert sum(isinstance(m, fused_nn.ConvTranspose2dLeakyReLU) for m in layers) == len(report.of("folded"))

    discriminator = models.Discriminator("dcgan", image_size=image_size, channels=3, width=width)
    images = torch.randn(5, 3, image_size, image_size)
    discriminator = with_statistics(discriminator, (images * 3 - 1,))
    assert_folded_like(discriminator, (images,), (image_size // 4).bit_length() - 2, trace)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("affine", [True, False])
def test_folding_respects_each_layer_weight_layout(bias, groups, affine):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias), nn.BatchNorm2d(6, affine=affine), nn.ReLU(),
        # ConvTranspose2d's weight is (C_in, C_out / groups, kH, kW): output channels on dim 1.
        nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1, groups=groups, bias=bias), nn.BatchNorm2d(4, affine=affine),
        nn.LeakyReLU(0.1), nn.Flatten(),
        nn.Linear(4 * 10 * 10, 7, bias=bias), nn.BatchNorm1d(7, affine=affine), nn.ReLU(inplace=True),
        nn.Linear(7, 2))
    x = torch.randn(3, 4, 5, 5)
    model = with_statistics(model, (x * 2 + 1,))
    folded, report = assert_folded_like(model, (x,), 3)
    assert len(report.fused) == 3
    assert [type(m) for m in folded if not isinstance(m, (nn.Identity, nn.Flatten))] == [
        fused_nn.Conv2dLeakyReLU, fused_nn.ConvTranspose2dLeakyReLU, fused_nn.LinearLeakyReLU, nn.Linear]


def test_a_linear_that_absorbed_a_batch_norm_1d_refuses_other_layouts():
    model = with_statistics(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), (torch.randn(6, 4),))
    folded = imggen_fast.fuse_for_inference(model)
    with pytest.raises(ValueError, match="exact for input .N, in_features. only"):
        folded(torch.randn(2, 4, 4))


def test_batch_norms_that_cannot_be_folded_are_kept_and_reported():
    torch.manual_seed(0)
    shared = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(
        nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False),  # eval uses batch statistics
        shared, nn.BatchNorm2d(2), shared,  # a layer used twice
        nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2),  # watched by a hook
        nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
    model[6].register_forward_hook(lambda module, args, output: None)
    x = torch.randn(4, 2, 3, 3)
    model = with_statistics(model, (x,))
    folded, report = assert_folded_like(model, (x,), 1)
    assert [entry.where for entry in report.skipped] == ["0 + 1", "2 + 3", "5 + 6"]
    reasons = [entry.reason for entry in report.skipped]
    assert "no running statistics" in reasons[0] and "used in 2 places" in reasons[1] and "hook" in reasons[2]
    assert [type(folded[i]) for i in (1, 3, 6)] == [nn.BatchNorm2d] * 3


def test_trace_folds_a_functional_forward():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
            self.up, self.up_norm = nn.ConvTranspose2d(4, 2, 4, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            return torch.tanh(F.relu(self.up_norm(self.up(F.leaky_relu(self.norm(self.conv(x)), 0.2)))))

    x = torch.randn(3, 3, 6, 6)
    model = with_statistics(Block(), (x * 2,))
    folded, report = assert_folded_like(model, (x,), 2, trace=True)
    assert len(report.fused) == 2 and isinstance(folded, torch.fx.GraphModule)


def test_fuse_for_inference_refuses_a_scripted_model():
    with pytest.raises(TypeError, match="TorchScript"):
        imggen_fast.fuse_for_inference(torch.jit.script(nn.Sequential(nn.Linear(2, 2))))
