"""``torchrun --nproc_per_node=2 -m imggen_fast.train``: DDP over gloo on this CPU.

Two processes with batch 8 each must train the GAN to the parameters one process
reaches with the global batch of 16: the same data (DistributedSampler's interleaved
split of the same permutation), the same noise (each process keeps its slice of the
global batch's noise), gradients averaged by DDP. The two differ only by the order of
float32 sums (DDP averages two half-batch means), which Adam can turn into a step of
the learning rate's size in an element whose gradient is near zero: measured, the
difference is 9e-5 relative to how far the 4 steps moved the parameters (largest element 1.3e-5)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from imggen_fast import data, train

STEPS = 4
# The seed GAN has no BatchNorm: under DDP each process normalizes over its own slice of
# the batch (torch's DDP does the same), so a DCGAN run does not equal one process.
COMMON = ["--data", "digits", "--image-size", "8", "--steps", str(STEPS), "--no-quality", "--sample-every", "0",
          "--seed", "3"]
SEED_GAN = ["gan", "--arch", "seed"]


def _flat(checkpoint: dict, name: str) -> torch.Tensor:
    model, key = name.split(".", 1)
    return checkpoint["models"][model][key]


def _initial_parameters(options: list[str]) -> dict[str, torch.Tensor]:
    """The parameters a run of ``train gan`` with ``options`` starts from."""
    arguments = train.parse_arguments([*SEED_GAN, *options])
    processes = train.Processes(0, 1, torch.device("cpu"))
    train_set = data.load(arguments.data, arguments.image_size, arguments.channels, "train")
    torch.manual_seed(arguments.seed)
    task = train.GANTask(train._config(arguments, train_set, processes), arguments, processes)
    return {f"{model}.{key}": value.detach().clone() for model, module in task.modules.items()
            for key, value in module.state_dict().items()}


def _torchrun(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "imggen_fast.train", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    result = _torchrun(*SEED_GAN, *COMMON, "--batch-size", "8", "--out", str(tmp_path / "ddp"))
    # Rank 0 alone reports and writes.
    assert result.stderr.count(f"gan: {STEPS} steps") == 1
    assert train.main([*SEED_GAN, *COMMON, "--batch-size", "16", "--out", str(tmp_path / "single")]) == 0

    distributed = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    single = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    assert distributed["config"]["world_size"] == 2 and distributed["step"] == STEPS
    # Adam turns a near-zero gradient into a full-size step whatever its rounding, so a
    # few elements may differ by up to about the learning rate: the parameters are
    # compared by the size of their difference relative to how far training moved them.
    initial = _initial_parameters(COMMON)
    names = list(initial)
    moved = torch.cat([(_flat(single, name) - initial[name]).flatten() for name in names])
    difference = torch.cat([(_flat(distributed, name) - _flat(single, name)).flatten() for name in names])
    assert moved.abs().max() > 1e-4
    assert difference.norm() / moved.norm() < 1e-3
    assert difference.abs().max() < 2e-4
    # The logged losses are the global batch's: the mean over the processes.
    for name, values in single["metrics"]["losses"].items():
        torch.testing.assert_close(torch.tensor(distributed["metrics"]["losses"][name]), torch.tensor(values),
                                   rtol=1e-5, atol=0)
    # Each process's random streams are saved; their own torch streams differ.
    assert len(distributed["rng"]) == 2
    assert not torch.equal(distributed["rng"][0]["torch"], distributed["rng"][1]["torch"])
    # The parameters moved: equality is not that of two untouched models.
    first_step = json.loads((tmp_path / "single" / "metrics.json").read_text())["losses"]["d_loss"]
    assert len(first_step) == STEPS and len(set(first_step)) == STEPS


@pytest.mark.slow
def test_vae_with_the_fused_reparameterize_trains_under_ddp(tmp_path):
    result = _torchrun("vae", *COMMON, "--batch-size", "8", "--out", str(tmp_path / "vae"))
    assert result.stderr.count(f"vae: {STEPS} steps") == 1
    checkpoint = torch.load(tmp_path / "vae" / "checkpoint.pt", weights_only=True)
    losses = torch.tensor(checkpoint["metrics"]["losses"]["loss"])
    assert losses.shape == (STEPS,) and torch.isfinite(losses).all() and losses[-1] < losses[0]
    assert (tmp_path / "vae" / "samples.png").is_file()
