"""imggen_fast.patch / unpatch: one generic walker over any model."""

import copy

import pytest
import torch
from torch import nn

import imggen_fast
from imggen_fast import models
from imggen_fast import nn as fused_nn
from imggen_fast.patch import FusedAway


def fused_layers(model):
    return [m for m in model.modules() if isinstance(m, (fused_nn.Conv2dLeakyReLU, fused_nn.LinearLeakyReLU,
                                                          fused_nn.ConvTranspose2dLeakyReLU, fused_nn.Reparameterize))]


@pytest.mark.parametrize("build,inputs,expected_fused", [
    (lambda: models.Generator(image_size=16, channels=1), lambda m: (m.sample_noise(3),), 8 + 2),
    (lambda: models.Discriminator("mlp", image_size=16, channels=1), lambda m: (torch.randn(3, 1, 16, 16),), 5),
    (lambda: models.Discriminator("conv", image_size=16, channels=1), lambda m: (torch.randn(3, 1, 16, 16),), 2),
    (lambda: models.CNN(image_size=16), lambda m: (torch.randn(3, 1, 16, 16),), 3),
    (lambda: models.VAE(image_size=16, channels=1, latent_dim=4).eval(), lambda m: (torch.randn(3, 1, 16, 16),),
     2 + 1 + 1 + 1),
])
def test_patched_models_compute_the_same_and_unpatch_restores(build, inputs, expected_fused):
    torch.manual_seed(0)
    eager = build()
    arguments = inputs(eager)
    patched = imggen_fast.patch(copy.deepcopy(eager))
    assert len(fused_layers(patched)) == expected_fused
    assert patched.state_dict().keys() == eager.state_dict().keys()
    expected, actual = eager(*arguments), patched(*arguments)
    for got, want in zip(actual if isinstance(actual, tuple) else (actual,),
                         expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    restored = imggen_fast.unpatch(patched)
    assert not fused_layers(restored) and not any(isinstance(m, FusedAway) for m in restored.modules())
    assert [type(m) for m in restored.modules()] == [type(m) for m in eager.modules()]
    assert repr(restored) == repr(eager)


def test_bernoulli_vae_loss_is_patched_and_equal():
    torch.manual_seed(0)
    eager = models.VAE(image_size=8, channels=1, latent_dim=4, reconstruction="bernoulli").eval()
    patched = imggen_fast.patch(copy.deepcopy(eager))
    assert type(patched.reconstruction_loss) is fused_nn.BCEWithLogitsLoss
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(patched.loss(images), eager.loss(images), rtol=1e-5, atol=1e-5)
    assert type(imggen_fast.unpatch(patched).reconstruction_loss) is nn.BCEWithLogitsLoss


def test_parameters_are_shared_so_an_existing_optimizer_keeps_training_them():
    model = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    imggen_fast.patch(model)
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    before = model[0].weight.detach().clone()
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)
    assert isinstance(model[0], fused_nn.LinearLeakyReLU) and model[0].negative_slope == 0.2


def test_only_consecutive_pairs_inside_sequentials_are_fused():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)
            self.activation = nn.LeakyReLU()  # order of use unknown outside a Sequential

        def forward(self, x):
            return self.linear(self.activation(x))

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.LeakyReLU(), Custom(), nn.Conv2d(1, 1, 1))
    imggen_fast.patch(model)
    assert not fused_layers(model)


def test_patch_twice_is_harmless_and_inplace_activations_round_trip():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.LeakyReLU(0.1, inplace=True))
    imggen_fast.patch(imggen_fast.patch(model))
    assert isinstance(model[0], fused_nn.Conv2dLeakyReLU) and isinstance(model[1], FusedAway)
    imggen_fast.unpatch(model)
    assert type(model[0]) is nn.Conv2d and model[1].inplace and model[1].negative_slope == 0.1


def test_unpatch_keeps_fused_layers_it_did_not_create():
    built_fused = fused_nn.LinearLeakyReLU(3, 3, negative_slope=0.2)
    model = nn.Sequential(built_fused, nn.Linear(3, 3), nn.LeakyReLU(0.1))
    imggen_fast.unpatch(imggen_fast.patch(model))
    assert model[0] is built_fused
    assert type(model[1]) is nn.Linear and type(model[2]) is nn.LeakyReLU and model[2].negative_slope == 0.1
    assert not hasattr(model[1], "negative_slope")


def test_pairs_whose_fusion_would_change_the_model_are_left_alone():
    class Reversed(nn.Sequential):
        def forward(self, x):  # children run last to first: the order proves nothing
            for module in reversed(self):
                x = module(x)
            return x

    seen = []
    hooked_layer = nn.Linear(3, 3)
    hooked_layer.register_forward_hook(lambda module, args, output: seen.append(output))
    hooked_activation = nn.LeakyReLU()
    hooked_activation.register_forward_pre_hook(lambda module, args: seen.append(args))
    model = nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(-0.5),  # negative slope: not a fused layer's contract
                          Reversed(nn.Linear(3, 3), nn.LeakyReLU()),
                          nn.Sequential(hooked_layer, nn.LeakyReLU()),
                          nn.Sequential(nn.Linear(3, 3), hooked_activation))
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    expected = model(x)
    imggen_fast.patch(model)
    assert not fused_layers(model) and not any(isinstance(m, FusedAway) for m in model.modules())
    torch.testing.assert_close(model(x), expected)


def test_hook_handles_made_before_patch_still_work():
    calls = []
    model = nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU(0.2))
    handle = model[0].register_forward_pre_hook(lambda module, args: calls.append(1))  # sees the input only
    imggen_fast.patch(model)
    assert isinstance(model[0], fused_nn.LinearLeakyReLU)
    model(torch.randn(2, 3))
    handle.remove()
    model(torch.randn(2, 3))
    assert calls == [1]
