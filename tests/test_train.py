"""``imggen-fast train`` and ``imggen-fast sample``: outputs, resume, quality, errors.

Runs are tiny (8 x 8 digits, a few steps) and in-process through the same entry points
as the commands (``train.main``, ``cli.main``)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPOSITORY
from PIL import Image

from imggen_fast import cli, train

TINY = ["--data", "digits", "--image-size", "8", "--no-quality", "--sample-every", "0"]


def _checkpoint(folder) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=True)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A small CNN checkpoint for the classifier-FID of 8 x 8 digits (2 epochs)."""
    out = tmp_path_factory.mktemp("classifier")
    assert train.main(["cnn", "--data", "digits", "--image-size", "8", "--epochs", "2", "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def test_gan_run_writes_checkpoint_metrics_plot_grids_and_a_score(tmp_path, classifier):
    out = tmp_path / "gan"
    assert train.main(["gan", "--data", "digits", "--image-size", "8", "--steps", "20", "--batch-size", "32",
                       "--sample-every", "10", "--checkpoint-every", "10", "--quality-samples", "300",
                       "--classifier", str(classifier), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["losses"]) == {"d_loss", "g_loss"}
    assert all(len(values) == 20 and all(np.isfinite(values)) for values in metrics["losses"].values())
    # The untrained generator's score, then one per sample grid; the last is the quality.
    assert [evaluation["step"] for evaluation in metrics["evaluations"]] == [0, 10, 20]
    final = metrics["evaluations"][-1]
    assert metrics["quality"] == {key: value for key, value in final.items() if key != "step"}
    assert all(evaluation["classifier_fid"] > 0 for evaluation in metrics["evaluations"])
    assert sum(final["class_spread"]["histogram"]) == pytest.approx(1, abs=1e-3)
    assert final["real_images"] == 360 and final["generated_images"] == 300
    assert metrics["config"]["arch"] == "dcgan" and metrics["eager"] is False and metrics["steps_per_second"] > 0
    assert metrics["quality_note"] == f"classifier: {classifier}"
    # An 8 x 8 grid of 8-pixel images with 2-pixel gaps, drawn 2 x 2 per pixel.
    for name in ("samples/step_000010.png", "samples/step_000020.png", "samples.png"):
        with Image.open(out / name) as grid:
            assert grid.size == (2 * (8 * 10 + 2), 2 * (8 * 10 + 2)) and grid.mode == "L"
    with Image.open(out / "losses.png") as plot:
        assert plot.size[0] > 300
    checkpoint = _checkpoint(out)
    assert checkpoint["step"] == 20 and set(checkpoint["models"]) == {"generator", "discriminator"}
    assert set(checkpoint["optimizers"]) == {"generator", "discriminator"}


def test_trained_vae_scores_better_than_untrained(tmp_path, classifier):
    out = tmp_path / "vae"
    assert train.main(["vae", "--data", "digits", "--image-size", "8", "--steps", "40", "--batch-size", "32",
                       "--sample-every", "0", "--quality-samples", "300", "--classifier", str(classifier),
                       "--out", str(out)]) == 0
    untrained, trained = json.loads((out / "metrics.json").read_text())["evaluations"]
    assert (untrained["step"], trained["step"]) == (0, 40)
    assert trained["classifier_fid"] < 0.95 * untrained["classifier_fid"]
    assert trained["class_spread"]["classes_seen"] >= 5


def _assert_same_run(expected_folder, resumed_folder) -> None:
    """Both runs' checkpoints hold the same parameters, optimizer moments and losses."""
    expected, resumed = _checkpoint(expected_folder), _checkpoint(resumed_folder)
    assert expected["step"] == resumed["step"]
    for name, state in expected["models"].items():
        for key, value in state.items():
            assert torch.equal(resumed["models"][name][key], value), f"{name}.{key}"
    for name, state in expected["optimizers"].items():
        for index, moments in state["state"].items():
            for key, value in moments.items():
                assert torch.equal(resumed["optimizers"][name]["state"][index][key], value), f"{name} {key}"
    assert resumed["metrics"]["losses"] == expected["metrics"]["losses"]


@pytest.mark.parametrize("kind,options", [
    ("gan", ["--batch-size", "16"]),
    # The VAE's fused noise comes from torch's generator, the CNN's shifts (16 x 16
    # images: 1 pixel) from its own; the CNN's learning rate follows the cosine schedule.
    # Batches of 256 give 5 per epoch: the 8 steps cross an epoch boundary after the resume.
    ("vae", ["--batch-size", "256"]),
    ("cnn", ["--batch-size", "256", "--image-size", "16"]),
])
def test_resume_after_an_interruption_gives_the_numbers_of_an_uninterrupted_run(tmp_path, monkeypatch, kind,
                                                                                 options):
    steps = 4 if kind == "gan" else 8
    arguments = [kind, *TINY, *options, "--steps", str(steps)]
    assert train.main([*arguments, "--out", str(tmp_path / "whole")]) == 0
    save = train._save_checkpoint

    def save_then_stop(*checkpoint_arguments):
        save(*checkpoint_arguments)
        raise KeyboardInterrupt("stopped after the first checkpoint")

    monkeypatch.setattr(train, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main([*arguments, "--checkpoint-every", str(steps // 2), "--out", str(tmp_path / "stopped")])
    monkeypatch.undo()
    assert _checkpoint(tmp_path / "stopped")["step"] == steps // 2
    assert train.main([*arguments, "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "stopped")


def test_resume_extends_a_finished_run(tmp_path):
    options = ["vae", *TINY, "--batch-size", "256"]
    assert train.main([*options, "--steps", "8", "--out", str(tmp_path / "whole")]) == 0
    assert train.main([*options, "--steps", "3", "--out", str(tmp_path / "extended")]) == 0
    assert train.main([*options, "--steps", "8", "--out", str(tmp_path / "extended"), "--resume"]) == 0
    _assert_same_run(tmp_path / "whole", tmp_path / "extended")


def test_eager_and_patched_runs_agree(tmp_path):
    options = [*TINY, "--steps", "3", "--batch-size", "16"]
    assert train.main(["gan", *options, "--out", str(tmp_path / "patched")]) == 0
    assert train.main(["gan", *options, "--eager", "--out", str(tmp_path / "eager")]) == 0
    patched, eager = _checkpoint(tmp_path / "patched"), _checkpoint(tmp_path / "eager")
    assert not patched["metrics"]["eager"] and eager["metrics"]["eager"]
    for name in ("d_loss", "g_loss"):
        torch.testing.assert_close(torch.tensor(patched["metrics"]["losses"][name]),
                                   torch.tensor(eager["metrics"]["losses"][name]), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_compiled_run_agrees_and_saves_plain_weights(tmp_path):
    options = ["cnn", *TINY, "--steps", "3", "--batch-size", "16"]
    assert train.main([*options, "--out", str(tmp_path / "patched")]) == 0
    assert train.main([*options, "--compile", "--out", str(tmp_path / "compiled")]) == 0
    patched, compiled = _checkpoint(tmp_path / "patched"), _checkpoint(tmp_path / "compiled")
    assert compiled["metrics"]["compile"] and compiled["models"]["classifier"].keys() == patched["models"][
        "classifier"].keys()
    torch.testing.assert_close(torch.tensor(compiled["metrics"]["losses"]["loss"]),
                               torch.tensor(patched["metrics"]["losses"]["loss"]), rtol=1e-5, atol=0)


def test_cnn_learns_the_digits(tmp_path):
    out = tmp_path / "cnn"
    assert train.main(["cnn", "--data", "digits", "--image-size", "8", "--epochs", "3", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    accuracies = [evaluation["test_accuracy"] for evaluation in metrics["evaluations"]]
    assert len(accuracies) == 3  # one per epoch, the last at the end
    # A short run; the full recipe's figures are in the README.
    assert metrics["quality"]["test_accuracy"] == accuracies[-1] > 0.8


@pytest.fixture(scope="module")
def vae_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    assert train.main(["vae", *TINY, "--steps", "3", "--batch-size", "16", "--out", str(out)]) == 0
    return out


def test_vae_grids_show_samples_and_reconstructions(vae_checkpoint):
    with Image.open(vae_checkpoint / "samples" / "reconstructions_step_000003.png") as grid:
        # 4 pairs of rows (held-out images, then their reconstructions), 8 columns.
        assert grid.size == (2 * (8 * 10 + 2), 2 * (8 * 10 + 2))
        pixels = np.asarray(grid, dtype=np.int64)
    with Image.open(vae_checkpoint / "samples" / "step_000003.png") as grid:
        assert grid.size == (2 * (8 * 10 + 2), 2 * (8 * 10 + 2))
    # The first row holds held-out digits spread over the split: 8 x 8 tiles at offset 2,
    # every 10 pixels (times the scale 2); the first and the last are the split's ends.
    from imggen_fast import data

    held_out = data.digits(8, 1, "test").images
    spread = torch.linspace(0, len(held_out) - 1, 32).long()
    for column in (0, 1, 7):
        tile = pixels[4:20, 4 + 20 * column:20 + 20 * column][::2, ::2]
        expected = ((held_out[spread[column], 0] + 1) / 2 * 255).round().numpy()
        np.testing.assert_allclose(tile, expected, atol=1)


@pytest.mark.parametrize("eager", [False, True])
def test_sample_draws_a_grid_from_gan_and_vae_checkpoints(tmp_path, vae_checkpoint, eager):
    gan = tmp_path / "gan"
    assert train.main(["gan", *TINY, "--steps", "1", "--batch-size", "8", "--out", str(gan)]) == 0
    for source in (gan, vae_checkpoint):
        grid = tmp_path / f"{source.name}.png"
        assert cli.main(["sample", str(source / "checkpoint.pt"), "--n", "10", "--out", str(grid),
                         *(["--eager"] if eager else [])]) == 0
        with Image.open(grid) as picture:
            # 10 images: 4 columns, 3 rows.
            assert picture.size == (2 * (4 * 10 + 2), 2 * (3 * 10 + 2))


def test_sample_fused_equals_eager(tmp_path, vae_checkpoint):
    grids = {}
    for mode in ("fused", "eager"):
        path = tmp_path / f"{mode}.png"
        assert cli.main(["sample", str(vae_checkpoint / "checkpoint.pt"), "--n", "16", "--seed", "5",
                         "--out", str(path), *(["--eager"] if mode == "eager" else [])]) == 0
        with Image.open(path) as picture:
            grids[mode] = np.asarray(picture, dtype=np.int64)
    assert np.abs(grids["fused"] - grids["eager"]).max() <= 1


def test_sample_rejects_a_classifier(tmp_path, classifier, capsys):
    assert cli.main(["sample", str(classifier), "--out", str(tmp_path / "x.png")]) == 2
    assert "holds a cnn classifier" in capsys.readouterr().err
    assert cli.main(["sample", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("arguments,message", [
    (["gan", "--r1", "1", "--compile"], "torch.compile does not support the double backward"),
    (["vae", "--arch", "dcgan"], "--arch dcgan applies to gan"),
    (["cnn", "--arch", "seed"], "--arch seed applies to gan"),
    (["gan", "--image-size", "12"], "needs a power of two >= 8"),
    (["cnn", "--image-size", "10"], "needs a multiple of 4"),
    (["vae", "--r1", "1"], "--r1 applies to gan"),
    (["gan", "--data", "/no/such/folder"], "not digits, mnist5k, or an existing folder"),
    (["gan", "--resume"], "does not exist"),
    (["gan", "--image-size", "8", "--batch-size", "2000"], "larger than this process's share"),
])
def test_bad_arguments_are_named(tmp_path, capsys, arguments, message):
    assert train.main([*arguments, "--out", str(tmp_path / "run"), "--no-quality"]) == 2
    assert message in capsys.readouterr().err


def test_argparse_rejects_steps_with_epochs_and_negative_numbers():
    for arguments in (["gan", "--steps", "3", "--epochs", "1"], ["gan", "--steps", "0"], ["gan", "--r1", "-1"]):
        with pytest.raises(SystemExit) as raised:
            train.main(arguments)
        assert raised.value.code == 2


def test_resume_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["cnn", *TINY, "--steps", "1", "--out", str(out)]) == 0
    assert train.main(["cnn", *TINY, "--steps", "2", "--seed", "7", "--out", str(out), "--resume"]) == 2
    assert "trained with seed = 0, this run asks for 7" in capsys.readouterr().err
    assert train.main(["cnn", *TINY, "--steps", "2", "--batch-size", "16", "--out", str(out),
                       "--resume", str(out / "checkpoint.pt")]) == 2
    assert "batch_size = 32, this run asks for 16" in capsys.readouterr().err
    # The cosine schedule spans the run: resuming may not change its length.
    assert train.main(["cnn", *TINY, "--steps", "2", "--out", str(out), "--resume"]) == 2
    assert "spans the run's 1 steps" in capsys.readouterr().err
    assert train.main(["cnn", *TINY, "--steps", "2", "--lr-schedule", "constant", "--out", str(out),
                       "--resume"]) == 2
    assert "lr_schedule = 'cosine', this run asks for 'constant'" in capsys.readouterr().err


def test_cosine_learning_rate():
    assert train.learning_rate(0.1, "constant", 5, 10) == 0.1
    assert train.learning_rate(0.1, "cosine", 0, 10) == 0.1
    assert train.learning_rate(0.1, "cosine", 5, 10) == pytest.approx(0.05)
    assert train.learning_rate(0.1, "cosine", 9, 10) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.9)))


def test_image_folder_data(tmp_path):
    folder = tmp_path / "images"
    generator = np.random.default_rng(0)
    for index in range(20):
        (folder / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(generator.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
            folder / f"class{index % 2}" / f"{index}.png")
    out = tmp_path / "run"
    assert train.main(["gan", "--data", str(folder), "--image-size", "8", "--steps", "2", "--batch-size", "4",
                       "--no-quality", "--out", str(out)]) == 0
    config = _checkpoint(out)["config"]
    assert config["channels"] == 3 and config["num_classes"] == 2
    with Image.open(out / "samples.png") as grid:
        assert grid.mode == "RGB"


def test_seed_arch_trains_and_resumes(tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    options = ["gan", *TINY, "--arch", "seed", "--batch-size", "16"]
    assert train.main([*options, "--steps", "4", "--out", str(whole)]) == 0
    assert train.main([*options, "--steps", "2", "--out", str(halves)]) == 0
    assert train.main([*options, "--steps", "4", "--out", str(halves), "--resume"]) == 0
    _assert_same_run(whole, halves)


def test_module_entry_point_and_cli_help():
    result = subprocess.run([sys.executable, "-m", "imggen_fast.train", "--help"], capture_output=True, text=True,
                            cwd=REPOSITORY, timeout=300)
    assert result.returncode == 0 and "torchrun" in result.stdout
    with pytest.raises(SystemExit) as raised:
        cli.main(["train", "--help"])
    assert raised.value.code == 0


def test_save_image_grid_places_each_image(tmp_path):
    images = torch.stack([torch.full((3, 2, 2), value) for value in (-1.0, 0.0, 1.0)])
    images[1, 0] = 1.0  # the second image is (255, 128, 128)
    path = train.save_image_grid(images, tmp_path / "grid.png", columns=2, scale=1)
    with Image.open(path) as grid:
        pixels = np.asarray(grid)
    assert pixels.shape == (2 * 4 + 2, 2 * 4 + 2, 3)
    assert (pixels[2:4, 2:4] == 0).all() and (pixels[2:4, 6:8] == [255, 128, 128]).all()
    assert (pixels[6:8, 2:4] == 255).all() and (pixels[6:8, 6:8] == 128).all()  # empty cell: the gap grey
    with pytest.raises(ValueError, match="images must be"):
        train.save_image_grid(torch.zeros(2, 2, 4, 4), tmp_path / "bad.png")
