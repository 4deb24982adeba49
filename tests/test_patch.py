"""imggen_fast.patch / unpatch: one generic walker over any model (Sequential pairs in
place, or a torch.fx trace), the fused BatchNorm modules it makes, and whole models
trained patched against eager."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import imggen_fast
from imggen_fast import models, steps
from imggen_fast import nn as fused_nn
from imggen_fast.patch import CannotTrace, FusedAway

FUSED_TYPES = (fused_nn.Conv2dLeakyReLU, fused_nn.LinearLeakyReLU, fused_nn.ConvTranspose2dLeakyReLU,
               fused_nn.BatchNorm1dLeakyReLU, fused_nn.BatchNorm2dLeakyReLU, fused_nn.Reparameterize)


def fused_layers(model):
    return [m for m in model.modules() if isinstance(m, FUSED_TYPES)]


@pytest.mark.parametrize("build,inputs,expected_fused", [
    (lambda: models.Generator(image_size=16, channels=1), lambda m: (m.sample_noise(3),), 8 + 2),
    (lambda: models.Discriminator("mlp", image_size=16, channels=1), lambda m: (torch.randn(3, 1, 16, 16),), 5),
    (lambda: models.Discriminator("conv", image_size=16, channels=1), lambda m: (torch.randn(3, 1, 16, 16),), 2),
    (lambda: models.CNN(image_size=16), lambda m: (torch.randn(3, 1, 16, 16),), 3),
    (lambda: models.VAE(image_size=16, channels=1, latent_dim=4).eval(), lambda m: (torch.randn(3, 1, 16, 16),),
     2 + 1 + 1 + 1),
    (lambda: models.Generator(image_size=16, channels=1, kind="dcgan", width=4), lambda m: (m.sample_noise(3),), 2),
    (lambda: models.Discriminator("dcgan", image_size=16, channels=1, width=4),
     lambda m: (torch.randn(3, 1, 16, 16),), 2),
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


# --- ReLU, BatchNorm pairs, Identity, SyncBatchNorm ------------------------------------


@pytest.mark.parametrize("activation,slope", [(nn.ReLU(), 0.0), (nn.ReLU(inplace=True), 0.0),
                                              (nn.LeakyReLU(0.1), 0.1), (nn.LeakyReLU(0.3, inplace=True), 0.3)])
def test_relu_and_leaky_relu_in_place_or_not_fuse_with_layers_and_batch_norms(activation, slope):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(2, 3, 3), copy.deepcopy(activation), nn.Conv2d(3, 4, 3, bias=False),
                          nn.BatchNorm2d(4), copy.deepcopy(activation), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
                          nn.BatchNorm1d(5), copy.deepcopy(activation), nn.Linear(5, 3), copy.deepcopy(activation))
    patched = imggen_fast.patch(copy.deepcopy(eager))
    assert [type(m) for m in patched] == [fused_nn.Conv2dLeakyReLU, FusedAway, nn.Conv2d, fused_nn.BatchNorm2dLeakyReLU,
                                          FusedAway, nn.Flatten, nn.Linear, fused_nn.BatchNorm1dLeakyReLU, FusedAway,
                                          fused_nn.LinearLeakyReLU, FusedAway]
    assert all(m.negative_slope == slope for m in fused_layers(patched))
    assert patched[3].inplace == patched[7].inplace == activation.inplace
    for mode in ("train", "eval"):
        getattr(eager, mode)(), getattr(patched, mode)()
        x = torch.randn(6, 2, 8, 8)
        torch.testing.assert_close(patched(x), eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched.state_dict(), eager.state_dict())
    assert len(imggen_fast.patch_report(patched).fused) == 4


def test_an_identity_between_layer_and_activation_is_looked_through_unless_hooked():
    model = nn.Sequential(nn.Linear(3, 3), nn.Identity(), nn.ReLU(), nn.Linear(3, 3), nn.Identity(), nn.ReLU())
    model[4].register_forward_hook(lambda module, args, output: None)
    imggen_fast.patch(model)
    assert type(model[0]) is fused_nn.LinearLeakyReLU and type(model[2]) is FusedAway
    assert type(model[3]) is nn.Linear and type(model[5]) is nn.ReLU


def test_sync_batch_norm_is_left_alone_and_reported():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.SyncBatchNorm(2), nn.ReLU())
    imggen_fast.patch(model)
    assert type(model[1]) is nn.SyncBatchNorm and type(model[2]) is nn.ReLU
    (entry,) = imggen_fast.patch_report(model).skipped
    assert entry.where == "1" and "SyncBatchNorm" in entry.reason


# --- the report -----------------------------------------------------------------------


def test_report_is_printed_with_verbose_and_kept_until_unpatch(capsys):
    model = models.Discriminator("dcgan", image_size=16, channels=1, width=4)
    assert imggen_fast.patch(model, verbose=True) is model
    printed = capsys.readouterr().out
    report = imggen_fast.patch_report(model)
    assert printed.strip() == str(report)
    assert "2 fused" in printed and "layers.3 + layers.4" in printed and "BatchNorm2dLeakyReLU" in printed
    assert [entry.where for entry in report.fused] == ["layers.0 + layers.1", "layers.3 + layers.4"]
    imggen_fast.unpatch(model)
    with pytest.raises(ValueError, match="was not patched"):
        imggen_fast.patch_report(model)


def test_a_model_with_nothing_to_fuse_says_so_and_points_to_trace(capsys):
    imggen_fast.patch(models.ClassicVAE(), verbose=True)
    printed = capsys.readouterr().out
    assert "0 fused" in printed and "trace=True" in printed


def test_activations_outside_sequentials_are_reported_as_skipped():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.activation = nn.Linear(3, 3), nn.ReLU()

        def forward(self, x):
            return self.activation(self.linear(x))

    report = imggen_fast.patch_report(imggen_fast.patch(nn.Sequential(Block())))
    (entry,) = report.skipped
    assert entry.where == "0.activation" and "trace=True" in entry.reason


# --- unpatch puts back the very modules ------------------------------------------------


def test_unpatch_restores_the_same_module_objects_with_their_current_state():
    model = models.Generator(image_size=8, channels=1, kind="dcgan", width=4)
    before = list(model.modules())
    imggen_fast.patch(model)
    model.eval()
    imggen_fast.unpatch(model)
    after = list(model.modules())
    assert len(after) == len(before) and all(a is b for a, b in zip(after, before))
    assert not any(m.training for m in after)
    assert not any(key.startswith("_imggen_fast") for m in after for key in m.__dict__)


# --- TorchScript ------------------------------------------------------------------------


@pytest.mark.parametrize("build,inputs", [
    (lambda: models.Generator(image_size=8, channels=1, kind="dcgan", width=4), lambda: torch.randn(3, 100)),
    (lambda: models.Discriminator("dcgan", image_size=8, channels=1, width=4), lambda: torch.randn(3, 1, 8, 8)),
    (lambda: models.Generator(image_size=8, channels=1), lambda: torch.randn(3, 100)),
    (lambda: models.VAE(image_size=8, channels=1, latent_dim=4).eval(), lambda: torch.randn(3, 1, 8, 8)),
])
def test_patched_models_script_and_compute_the_same(build, inputs):
    torch.manual_seed(0)
    patched = imggen_fast.patch(build())
    scripted = torch.jit.script(patched)
    x = inputs()
    for mode in ("train", "eval"):
        getattr(patched, mode)(), getattr(scripted, mode)()
        torch.manual_seed(1)  # the same noise for the VAE
        expected = patched(x)
        torch.manual_seed(1)
        actual = scripted(x)
        for got, want in zip(actual if isinstance(actual, tuple) else (actual,),
                             expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(got, want)


def test_scripted_fused_batch_norm_updates_the_shared_running_statistics():
    patched = imggen_fast.patch(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU()))
    scripted = torch.jit.script(patched)
    scripted(torch.randn(4, 1, 3, 3))
    assert patched[1].num_batches_tracked == 1 and not torch.equal(patched[1].running_mean, torch.zeros(2))


# --- trace=True ------------------------------------------------------------------------


class FunctionalBlocks(nn.Module):
    """Every layer form (module and functional) followed by every activation form."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.activation = nn.LeakyReLU(0.1)
        self.transposed_weight = nn.Parameter(torch.randn(4, 3, 4, 4) * 0.1)
        self.norm_weight, self.norm_bias = nn.Parameter(torch.rand(3) + 0.5), nn.Parameter(torch.randn(3))
        self.register_buffer("running_mean", torch.zeros(3))
        self.register_buffer("running_var", torch.ones(3))
        self.linear = nn.Linear(3 * 8 * 8, 6)
        self.head_weight = nn.Parameter(torch.randn(5, 6) * 0.3)

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = self.activation(self.norm(h))
        h = F.conv2d(h, self.conv.weight[:4, :2].repeat(1, 2, 1, 1), None, 1, 1)
        h = torch.relu(h)
        h = F.conv_transpose2d(h, self.transposed_weight, None, stride=2, padding=1)
        h = F.leaky_relu(h, 0.2, inplace=True)
        h = F.batch_norm(h, self.running_mean, self.running_var, self.norm_weight, self.norm_bias, self.training)
        h = F.relu(h, inplace=True)
        h = self.linear(h.flatten(1)).relu()
        return F.leaky_relu(F.linear(h, self.head_weight), negative_slope=0.3)


def assert_same_training(eager, patched, batches, loss, rtol=1e-4, atol=1e-5):
    """Adam steps on both models in training mode; outputs, gradients, parameters and
    buffers stay equal, and so do the outputs in eval mode after the steps.
    batches: a list of input tuples; loss(output) -> scalar."""
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (eager, patched)]
    for step, inputs in enumerate(batches):
        outputs = []
        for model, optimizer in zip((eager, patched), optimizers):
            torch.manual_seed(step)  # the same noise for models that draw some
            optimizer.zero_grad()
            output = model(*inputs)
            loss(output).backward()
            outputs.append(output)
        for got, want in zip(*[o if isinstance(o, tuple) else (o,) for o in reversed(outputs)]):
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        for (name, want), got in zip(eager.named_parameters(), patched.parameters()):
            torch.testing.assert_close(got.grad, want.grad, rtol=rtol, atol=atol, msg=f"gradient of {name}")
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(dict(patched.named_parameters()), dict(eager.named_parameters()), rtol=rtol, atol=atol)
    torch.testing.assert_close(dict(patched.named_buffers()), dict(eager.named_buffers()), rtol=rtol, atol=atol)
    outputs = []
    for model in (eager.eval(), patched.eval()):
        torch.manual_seed(len(batches))
        with torch.no_grad():
            outputs.append(model(*batches[0]))
    for got, want in zip(*[o if isinstance(o, tuple) else (o,) for o in reversed(outputs)]):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_trace_fuses_every_functional_and_module_form():
    torch.manual_seed(0)
    eager = FunctionalBlocks()
    patched = imggen_fast.patch(eager, trace=True)
    assert isinstance(patched, torch.fx.GraphModule) and patched is not eager
    report = imggen_fast.patch_report(patched)
    assert len(report.fused) == 7 and not report.skipped, str(report)
    code = patched.code
    for fused in ("conv2d_leaky_relu", "conv_transpose2d_leaky_relu", "batch_norm_leaky_relu", "linear_leaky_relu"):
        assert fused in code
    assert "relu(" not in code.replace("leaky_relu(", "")
    assert type(patched.conv) is fused_nn.Conv2dLeakyReLU and type(patched.norm) is fused_nn.BatchNorm2dLeakyReLU
    assert type(eager.conv) is nn.Conv2d and type(eager.norm) is nn.BatchNorm2d  # the original is untouched
    assert patched.state_dict().keys() == eager.state_dict().keys()
    batches = [(torch.randn(5, 2, 4, 4),) for _ in range(3)]
    assert_same_training(eager, patched, batches, lambda output: output.square().mean())


def test_trace_fuses_the_classic_mnist_vae_and_trains_the_same():
    torch.manual_seed(0)
    eager = models.ClassicVAE(input_dim=64, hidden_dim=24, latent_dim=4)
    patched = imggen_fast.patch(eager, trace=True)
    assert [type(patched.fc1), type(patched.fc3)] == [fused_nn.LinearLeakyReLU] * 2
    assert len(imggen_fast.patch_report(patched).fused) == 2
    images = [(torch.rand(8, 1, 8, 8),) for _ in range(3)]
    assert_same_training(eager, patched, images,
                         lambda output: models.ClassicVAE.loss(output[0], images[0][0], *output[1:]))


def test_trace_skips_an_output_with_other_users_and_a_module_called_twice():
    class TwoUses(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            h = self.first(x)
            y = F.relu(self.second(h))
            return F.relu(h) + self.second(y)  # h used twice; second called twice, once without activation

    torch.manual_seed(0)
    eager = TwoUses()
    patched = imggen_fast.patch(eager, trace=True)
    report = imggen_fast.patch_report(patched)
    assert not report.fused and len(report.skipped) == 2
    reasons = " ".join(entry.reason for entry in report.skipped)
    assert "other uses" in reasons and "called 2 times" in reasons
    x = torch.randn(4, 3)
    torch.testing.assert_close(patched(x), eager(x))


def test_trace_refuses_an_untraceable_model_with_torch_fx_reason():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(x) if x.sum() > 0 else x

    with pytest.raises(CannotTrace, match="torch.fx cannot trace DataDependent.forward: TraceError: symbolically "
                                          "traced variables cannot be used as inputs to control flow"):
        imggen_fast.patch(DataDependent(), trace=True)


def test_trace_refuses_hooks_that_tracing_would_inline():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    model[0].register_forward_hook(lambda module, args, output: None)
    with pytest.raises(CannotTrace, match="0 .Sequential. has hooks"):
        imggen_fast.patch(model, trace=True)


def test_a_traced_copy_follows_train_and_eval_where_forward_passes_self_training():
    class PassesTheFlag(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)
            self.register_buffer("running_mean", torch.zeros(4))
            self.register_buffer("running_var", torch.ones(4))

        def forward(self, x):
            h = F.batch_norm(self.linear(x), self.running_mean, self.running_var, training=self.training)
            return F.dropout(F.relu(h), 0.5, self.training)

    torch.manual_seed(0)
    eager = PassesTheFlag()
    patched = imggen_fast.patch(eager, trace=True)
    assert "batch_norm_leaky_relu" in patched.code and "self.training" in patched.code
    x = torch.randn(6, 4)
    for mode in ("train", "eval", "train"):
        getattr(eager, mode)(), getattr(patched, mode)()
        torch.manual_seed(1)
        expected = eager(x)
        torch.manual_seed(1)
        torch.testing.assert_close(patched(x), expected)
        torch.testing.assert_close(patched.running_mean, eager.running_mean)


def test_a_traced_copy_of_a_forward_branching_on_self_training_refuses_the_other_mode():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            h = F.relu(self.linear(x))
            return h + torch.randn_like(h) if self.training else h

    eager = Branches().eval()
    patched = imggen_fast.patch(eager, trace=True)
    assert "train() / eval()" in str(imggen_fast.patch_report(patched))
    x = torch.randn(3, 4)
    torch.testing.assert_close(patched(x), eager(x))
    with pytest.raises(RuntimeError, match="traced in eval mode.*branches on self.training"):
        patched.train()(x)


def test_a_traced_copy_cannot_be_unpatched():
    patched = imggen_fast.patch(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), trace=True)
    with pytest.raises(TypeError, match="traced copy"):
        imggen_fast.unpatch(patched)


# --- channels_last ----------------------------------------------------------------------


def test_channels_last_converts_the_4d_parameters_once_and_keeps_them_shared():
    torch.manual_seed(0)
    eager = models.Discriminator("dcgan", image_size=16, channels=1, width=4)
    model = copy.deepcopy(eager)
    parameters = list(model.parameters())
    imggen_fast.patch(model, channels_last=True)
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    four_d = [p for p in model.parameters() if p.dim() == 4]
    assert four_d and all(p.is_contiguous(memory_format=torch.channels_last) for p in four_d)
    assert imggen_fast.patch_report(model).of("converted")
    x = torch.randn(3, 1, 16, 16)  # NCHW input: converted by the first layer
    torch.testing.assert_close(model(x), eager(x), rtol=1e-5, atol=1e-5)
    channels_last_input = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(channels_last_input), eager(x), rtol=1e-5, atol=1e-5)


# --- the fused BatchNorm modules ------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dims", [1, 2])
def test_fused_batch_norm_reproduces_torch_batch_norm_then_leaky_relu(momentum, track_running_stats, affine, dims):
    torch.manual_seed(0)
    eager_type, fused_type = ((nn.BatchNorm1d, fused_nn.BatchNorm1dLeakyReLU) if dims == 1
                              else (nn.BatchNorm2d, fused_nn.BatchNorm2dLeakyReLU))
    arguments = dict(momentum=momentum, track_running_stats=track_running_stats, affine=affine)
    eager, fused = eager_type(3, **arguments), fused_type(3, **arguments, negative_slope=0.2)
    if affine:
        nn.init.normal_(eager.weight), nn.init.normal_(eager.bias)
    fused.load_state_dict(eager.state_dict())
    assert fused.state_dict().keys() == eager.state_dict().keys()
    shapes = [(5, 3), (5, 3, 7)] if dims == 1 else [(5, 3, 4, 6)]
    for shape in shapes * 3:
        x = torch.randn(shape, requires_grad=True)
        expected = F.leaky_relu(eager(x), 0.2)
        actual = fused(x)
        torch.testing.assert_close(actual, expected)
        grad = torch.randn(shape)
        torch.testing.assert_close(torch.autograd.grad(actual, x, grad)[0], torch.autograd.grad(expected, x, grad)[0])
    torch.testing.assert_close(fused.state_dict(), eager.state_dict())
    eager.eval(), fused.eval()
    x = torch.randn(shapes[0])
    torch.testing.assert_close(fused(x), F.leaky_relu(eager(x), 0.2))


def test_fused_batch_norm_checks_its_input_dims_and_repr():
    with pytest.raises(ValueError, match="expected 4D input"):
        fused_nn.BatchNorm2dLeakyReLU(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        fused_nn.BatchNorm1dLeakyReLU(3)(torch.randn(2, 3, 4, 4))
    assert repr(fused_nn.BatchNorm2dLeakyReLU(3, negative_slope=0.0, inplace=True)).endswith(
        "negative_slope=0.0, inplace=True)")
    with pytest.raises(ValueError, match="negative_slope must be finite and >= 0"):
        fused_nn.BatchNorm2dLeakyReLU(3, negative_slope=-0.1)


# --- whole models trained patched against eager ---------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_patched_dcgan_trains_like_eager(channels_last):
    torch.manual_seed(0)
    generator = models.Generator(image_size=16, channels=1, noise_dim=8, kind="dcgan", width=4)
    discriminator = models.Discriminator("dcgan", image_size=16, channels=1, width=4)
    patched = [imggen_fast.patch(copy.deepcopy(m), channels_last=channels_last) for m in (generator, discriminator)]
    assert len(fused_layers(patched[0])) == 2 and len(fused_layers(patched[1])) == 2
    pairs = [(generator, discriminator), tuple(patched)]
    optimizers = [[torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in pair] for pair in pairs]
    for step in range(4):
        real, noise = torch.rand(6, 1, 16, 16) * 2 - 1, torch.randn(6, 8)
        losses = [steps.gan_step(*pair, *optimizer_pair, real, noise) for pair, optimizer_pair in zip(pairs, optimizers)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
        for eager_model, patched_model in zip(*pairs):
            for (name, want), got in zip(eager_model.named_parameters(), patched_model.parameters()):
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    for eager_model, patched_model in zip(*pairs):
        torch.testing.assert_close(dict(patched_model.named_parameters()), dict(eager_model.named_parameters()),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dict(patched_model.named_buffers()), dict(eager_model.named_buffers()),
                                   rtol=1e-4, atol=1e-5)
    # The fused convolutions round differently from eager's (oneDNN post-op), and Adam's
    # first steps move a parameter by about lr whatever its gradient's size, so the
    # parameters differ by about 1e-5 after the steps; a batch norm in training mode can
    # scale that up where a channel's batch variance is small.
    noise = torch.randn(6, 8)
    for mode in ("train", "eval"):
        for model in (*pairs[0], *pairs[1]):
            getattr(model, mode)()
        torch.testing.assert_close(patched[0](noise), generator(noise), rtol=1e-3, atol=1e-3)
        images = generator(noise).detach()
        torch.testing.assert_close(patched[1](images), discriminator(images), rtol=1e-3, atol=1e-3)


def saved_tensor_bytes(model, inputs):
    """Bytes autograd keeps for backward over one forward of ``model``: each storage
    counted once, parameters (and their views) excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*inputs)
    return sum(storages.values())


@pytest.mark.parametrize("build,inputs,strictly_less", [
    (lambda: models.Discriminator("dcgan", image_size=32, channels=3, width=8), lambda: (torch.randn(4, 3, 32, 32),),
     False),
    (lambda: models.Generator(image_size=32, channels=3, kind="dcgan", width=8), lambda: (torch.randn(4, 100),), False),
    (lambda: models.Generator(image_size=32, channels=3), lambda: (torch.randn(4, 100),), True),
])
def test_patched_models_keep_no_more_for_backward_than_eager(build, inputs, strictly_less):
    torch.manual_seed(0)
    eager = build()
    arguments = inputs()
    eager_bytes = saved_tensor_bytes(eager, arguments)
    patched_bytes = saved_tensor_bytes(imggen_fast.patch(copy.deepcopy(eager)), arguments)
    print(f"saved for backward: eager {eager_bytes}, patched {patched_bytes}, ratio {patched_bytes / eager_bytes:.3f}")
    assert patched_bytes < eager_bytes if strictly_less else patched_bytes <= eager_bytes
