"""Cases of whole training steps (forward, backward, optimizer) at batch 64, timing the
step functions the training loop runs (:mod:`imggen_fast.steps`).

Models: ``gan`` (the seed Generator + the conv Discriminator, at 32x32 and 64x64),
``dcgan`` (the classic DCGAN, ``kind="dcgan"``, at 32x32 and 64x64, once the models
accept that kind; until then it is listed as skipped), ``vae`` (32x32) and ``cnn`` (on
32x32 digits). Optimizer: Adam (the GAN's lr 2e-4, betas (0.5, 0.999); 1e-3 otherwise).

Providers: ``eager``; ``eager_channels_last`` (models and images in channels_last);
``imggen_fast`` (``imggen_fast.patch(model)``, and the fused GAN losses
``FUSED_GAN_LOSSES``) and ``imggen_fast_channels_last``; ``compile`` (torch.compile of
the eager models, and of the eager losses / ``VAE.loss``) and ``compile_imggen_fast``
(torch.compile of the patched models). The optimizer step is eager in every provider.

Kept for backward: the bytes autograd keeps over one forward of each network (each
storage once, parameters excluded). Check: one step of each side with a learning rate
of 0 (both sides keep the same parameters at every optimizer step), comparing the losses
(max norm) and every parameter's gradient at every optimizer step (Frobenius norm, see
``common.STEP_GRADIENT_TOLERANCE``) with eager's; the VAE's noise is given.
``eager_channels_last`` is checked too: it shows how far torch's own rounding moves a
step's gradients."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import data, models, patch, steps
from .common import (COMPILE, COMPILE_IMGGEN_FAST, EAGER, EAGER_CHANNELS_LAST, IMGGEN_FAST,
                     IMGGEN_FAST_CHANNELS_LAST, STEP, STEP_GRADIENT_TOLERANCE, Case, compare, compiled, count_flops,
                     device, saved_bytes)

BATCH = 64
PROVIDERS = (EAGER, EAGER_CHANNELS_LAST, IMGGEN_FAST, IMGGEN_FAST_CHANNELS_LAST, COMPILE, COMPILE_IMGGEN_FAST)
_PATCHED = (IMGGEN_FAST, IMGGEN_FAST_CHANNELS_LAST, COMPILE_IMGGEN_FAST)
_CHANNELS_LAST = (EAGER_CHANNELS_LAST, IMGGEN_FAST_CHANNELS_LAST)
_COMPILED = (COMPILE, COMPILE_IMGGEN_FAST)
GAN_LEARNING_RATE, GAN_BETAS = 2e-4, (0.5, 0.999)
LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Model:
    """A model case: ``name`` (gan, dcgan, vae, cnn) at ``image_size``; ``quick``: in the
    report's quick mode."""

    name: str
    image_size: int
    quick: bool

    @property
    def size(self) -> str:
        return f"{self.image_size}x{self.image_size}"


# Quick mode (the report's default, under 10 minutes on 2 cores with compile time) takes
# the seed GAN and the VAE at 32x32; --full adds the rest.
MODELS = (Model("gan", 32, True), Model("gan", 64, False), Model("dcgan", 32, False), Model("dcgan", 64, False),
          Model("vae", 32, True), Model("cnn", 32, False))


@dataclasses.dataclass
class Training:
    """A built training setup: ``step()`` runs one optimisation step and returns its
    losses; ``networks`` maps a network's name to one forward of it as the step runs it
    (for the bytes kept for backward); ``parameters`` are every trained parameter."""

    step: Callable[[], object]
    optimizers: list[torch.optim.Optimizer]
    networks: dict[str, Callable[[], object]]
    parameters: list[torch.Tensor]


def _prepare(module: nn.Module, provider: str) -> nn.Module:
    """The module as the provider runs it (patched, channels_last), on the benchmark device."""
    module = module.to(device())
    if provider in _PATCHED:
        patch(module)
    if provider in _CHANNELS_LAST:
        module = module.to(memory_format=torch.channels_last)
    return module


def _images(shape: tuple[int, ...], provider: str, generator: torch.Generator) -> torch.Tensor:
    images = (torch.rand(shape, generator=generator) * 2 - 1).to(device())
    return images.contiguous(memory_format=torch.channels_last) if provider in _CHANNELS_LAST else images


def _gan_models(model: Model) -> tuple[nn.Module, nn.Module]:
    if model.name == "dcgan":
        return (models.Generator(kind="dcgan", image_size=model.image_size),
                models.Discriminator(kind="dcgan", image_size=model.image_size))
    return models.Generator(image_size=model.image_size), models.Discriminator(kind="conv", image_size=model.image_size)


def _build_gan(model: Model, provider: str, learning_rate: float | None, generator: torch.Generator) -> Training:
    net_g, net_d = (_prepare(module, provider) for module in _gan_models(model))
    rate = GAN_LEARNING_RATE if learning_rate is None else learning_rate
    optimizer_g = torch.optim.Adam(net_g.parameters(), lr=rate, betas=GAN_BETAS)
    optimizer_d = torch.optim.Adam(net_d.parameters(), lr=rate, betas=GAN_BETAS)
    real = _images((BATCH, net_g.channels, model.image_size, model.image_size), provider, generator)
    noise = torch.randn(BATCH, net_g.noise_dim, generator=generator).to(device())
    losses = steps.FUSED_GAN_LOSSES if provider in _PATCHED else steps.EAGER_GAN_LOSSES
    run_g, run_d = net_g, net_d
    if provider in _COMPILED:
        run_g, run_d = compiled(net_g), compiled(net_d)
        if provider == COMPILE:
            losses = steps.GANLosses(compiled(losses.d_loss), compiled(losses.g_loss))
    parameters = [*net_g.parameters(), *net_d.parameters()]
    return Training(lambda: steps.gan_step(run_g, run_d, optimizer_g, optimizer_d, real, noise, losses),
                    [optimizer_d, optimizer_g],
                    {"generator": lambda: run_g(noise), "discriminator": lambda: run_d(real)}, parameters)


def _build_vae(model: Model, provider: str, learning_rate: float | None, generator: torch.Generator,
               eps_given: bool = False) -> Training:
    vae = _prepare(models.VAE(image_size=model.image_size), provider)
    optimizer = torch.optim.Adam(vae.parameters(), lr=LEARNING_RATE if learning_rate is None else learning_rate)
    images = _images((BATCH, vae.channels, model.image_size, model.image_size), provider, generator)
    eps = torch.randn(BATCH, vae.latent_dim, generator=generator).to(device()) if eps_given else None
    if provider in _COMPILED:
        # vae_step calls vae.loss, not forward: compile that method (an instance attribute shadows it).
        vae.loss = compiled(vae.loss)
    return Training(lambda: steps.vae_step(vae, optimizer, images, eps=eps), [optimizer],
                    {"vae (loss)": lambda: vae.loss(images, eps=eps)}, list(vae.parameters()))


@functools.cache
def _digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = data.digits(image_size=image_size, channels=1, split="train")
    return dataset.images[:BATCH], dataset.labels[:BATCH]


def _build_cnn(model: Model, provider: str, learning_rate: float | None, generator: torch.Generator) -> Training:
    classifier = _prepare(models.CNN(image_size=model.image_size, channels=1), provider)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=LEARNING_RATE if learning_rate is None else learning_rate)
    images, labels = (tensor.to(device()) for tensor in _digits(model.image_size))
    if provider in _CHANNELS_LAST:
        images = images.contiguous(memory_format=torch.channels_last)
    run = compiled(classifier) if provider in _COMPILED else classifier
    return Training(lambda: steps.cnn_step(run, optimizer, images, labels), [optimizer],
                    {"classifier (loss)": lambda: F.cross_entropy(run(images), labels)}, list(classifier.parameters()))


def build(model: Model, provider: str, learning_rate: float | None = None, eps_given: bool = False) -> Training:
    """The provider's training setup, seeded: every provider starts from the same
    parameters and data. ``learning_rate`` overrides the optimizers' (0 for the check);
    ``eps_given``: the VAE's noise is a fixed tensor instead of drawn each step."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if model.name in ("gan", "dcgan"):
        return _build_gan(model, provider, learning_rate, generator)
    if model.name == "vae":
        return _build_vae(model, provider, learning_rate, generator, eps_given)
    if model.name == "cnn":
        return _build_cnn(model, provider, learning_rate, generator)
    raise ValueError(f"unknown model {model.name!r}")


def _make(model: Model, provider: str):
    training = build(model, provider)
    training.step()  # compiles (torch.compile), builds the kernels, makes the optimizer state
    return training.step


def _results(model: Model, provider: str) -> dict[str, torch.Tensor]:
    """The losses of one step with a learning rate of 0, and every parameter's gradient
    at every optimizer step of it."""
    training = build(model, provider, learning_rate=0.0, eps_given=True)
    recorded: dict[str, torch.Tensor] = {}
    for optimizer_index, optimizer in enumerate(training.optimizers):
        def record(optimizer, args, kwargs, optimizer_index=optimizer_index) -> None:
            parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
            for index, parameter in enumerate(parameters):
                if parameter.grad is not None:
                    recorded[f"grad of optimizer {optimizer_index}'s parameter {index}"] = parameter.grad.clone()

        optimizer.register_step_pre_hook(record)
    losses = training.step()
    losses = losses if isinstance(losses, tuple) else (losses,)
    return {**{f"loss{index}": loss for index, loss in enumerate(losses)}, **recorded}


@functools.lru_cache(maxsize=1)
def _reference_results(model: Model, device_name: str) -> dict[str, torch.Tensor]:
    # Every provider's check of a model compares with the same eager step: computed once.
    return _results(model, EAGER)


def check(model: Model, provider: str):
    """The provider's losses and gradients of one step against eager's (NCHW)."""
    return compare(_results(model, provider), _reference_results(model, str(device())),
                   gradient_tolerance=STEP_GRADIENT_TOLERANCE)


def kept_for_backward(model: Model, provider: str) -> dict[str, int]:
    """Bytes kept for backward over one forward of each network, parameters excluded."""
    training = build(model, provider)
    return {name: saved_bytes(forward, exclude=training.parameters) for name, forward in training.networks.items()}


@functools.cache
def step_flops(model: Model) -> int:
    """Floating-point operations of one eager step (matmuls and convolutions)."""
    training = build(model, EAGER)
    return count_flops(training.step)


@functools.cache
def unavailable(model: Model) -> str | None:
    """Why the models cannot build ``model`` (a kind they do not accept yet), or None."""
    if model.name != "dcgan":
        return None
    try:
        _gan_models(Model(model.name, 8, False))
    except (TypeError, ValueError) as error:
        return f"imggen_fast.models does not build it yet: {error}"
    return None


def cases(selected: tuple[Model, ...] = MODELS) -> list[Case]:
    """Every (model, provider) case of the models that can be built."""
    return [Case(model.name, model.size, provider, STEP, functools.partial(_make, model, provider),
                 flops=functools.partial(step_flops, model), elements=BATCH * model.image_size ** 2,
                 quick=model.quick, kind="model", measure_memory=True,
                 check=functools.partial(check, model, provider) if provider not in (EAGER, COMPILE) else None,
                 kept_for_backward=functools.partial(kept_for_backward, model, provider))
            for model in selected if unavailable(model) is None for provider in PROVIDERS]


CASES = cases()
SKIPPED = [(f"{model.name} {model.size}", unavailable(model)) for model in MODELS if unavailable(model)]
