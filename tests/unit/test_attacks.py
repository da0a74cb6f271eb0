"""splitfed attack: the attacks' maths against independent computations, and the command on
tiny digits runs, where a defence must lower what the server learns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from typer.testing import CliRunner

from splitfed.attack_cli import attack_app
from splitfed.learning import attacks, data
from splitfed.learning.settings import SplitSettings
from splitfed.scenarios import launch, split
from splitfed.scenarios.split import SplitRun


# -- SSIM -----------------------------------------------------------------------------------------


def numpy_ssim(x: np.ndarray, y: np.ndarray, window: int, sigma: float = 1.5) -> float:
    """SSIM of two (H, W) 0..1 images as Wang et al. define it: a Gaussian-weighted window slid
    over the valid positions, K1 = 0.01, K2 = 0.03, the map's mean."""
    coords = np.arange(window) - window // 2
    gauss = np.exp(-coords**2 / (2 * sigma**2))
    kernel = np.outer(gauss, gauss) / gauss.sum() ** 2

    def local(image: np.ndarray) -> np.ndarray:
        return (sliding_window_view(image, (window, window)) * kernel).sum(axis=(-2, -1))

    mx, my = local(x), local(y)
    vx, vy, cxy = local(x * x) - mx**2, local(y * y) - my**2, local(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def digit_pixels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:4] / 16.0  # (4, 8, 8) in 0..1


def test_ssim_of_identical_images_is_one():
    images = torch.rand(5, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(attacks.ssim(images, images), torch.ones(5), atol=1e-6)
    digits = torch.from_numpy(digit_pixels()).float().unsqueeze(1)
    assert torch.allclose(attacks.ssim(digits, digits), torch.ones(4), atol=1e-6)


def test_ssim_window_fits_small_images():
    assert [attacks.ssim_window(*side) for side in ((8, 8), (28, 28), (6, 9), (2, 2), (1, 5))] == [7, 11, 5, 1, 1]


@pytest.mark.parametrize("size", [8, 28])
def test_ssim_agrees_with_a_numpy_ssim(size):
    rng = np.random.default_rng(size)
    if size == 8:
        originals = digit_pixels()
    else:  # smooth images: a blurred random field, so that the structure term matters
        field = rng.random((4, size + 4, size + 4))
        originals = sliding_window_view(field, (5, 5), axis=(1, 2)).mean(axis=(-2, -1))
    noisy = np.clip(originals + rng.normal(0, 0.25, originals.shape), 0, 1)
    ours = attacks.ssim(torch.from_numpy(originals).unsqueeze(1).float(), torch.from_numpy(noisy).unsqueeze(1).float())
    window = 7 if size == 8 else 11
    expected = [numpy_ssim(o.astype(np.float32).astype(np.float64), n.astype(np.float32).astype(np.float64), window) for o, n in zip(originals, noisy)]
    assert np.allclose(ours.numpy(), expected, atol=1e-5)
    assert max(expected) < 0.97  # the pairs differ: the comparison is not of ones


# -- pixels, the decoder and the grid -------------------------------------------------------------


def test_pixel_view_undoes_the_normalisation_of_digits_and_refuses_features():
    samples = data.load("digits", train=True, limit=4)
    pixels = attacks.pixel_view(samples, "digits")
    inputs, _ = samples.batch(slice(0, 4))
    assert np.allclose(pixels(inputs).squeeze(1).numpy(), digit_pixels(), atol=1e-6)
    features = data.Samples(torch.randn(4, 6), torch.zeros(4, dtype=torch.int64))
    assert attacks.pixel_view(features, "csv") is None


def test_the_decoder_learns_a_map_from_any_activation_shape_and_is_seeded():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 1, 5, 5, generator=generator)
    mixing = torch.randn(25, 36, generator=generator)
    activations = (inputs.flatten(1) @ mixing).view(-1, 4, 3, 3)  # a conv-shaped cut that holds the input linearly
    first = attacks.train_decoder(activations, inputs, epochs=30, seed=3)
    second = attacks.train_decoder(activations, inputs, epochs=30, seed=3)
    with torch.no_grad():
        decoded = first(activations)
        assert torch.equal(decoded, second(activations))
    assert decoded.shape == inputs.shape
    assert torch.nn.functional.mse_loss(decoded, inputs) < 0.2 * inputs.var()


def test_a_unit_silent_on_the_public_data_does_not_blow_a_reconstruction_up():
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(256, 1, 4, 4, generator=generator)
    activations = torch.cat([torch.zeros(256, 1), inputs.flatten(1) @ torch.randn(16, 8, generator=generator)], dim=1)  # unit 0: a ReLU that never fired
    decoder = attacks.train_decoder(activations, inputs, epochs=5, seed=0)
    firing = activations[:8].clone()
    firing[:, 0] = activations[:, 1:].abs().mean()  # it fires on a victim, as strongly as a typical unit
    with torch.no_grad():
        assert (decoder(firing) - decoder(activations[:8])).abs().max() < 10 * inputs.std()


def test_grid_puts_originals_above_their_reconstructions():
    originals = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    image = attacks.grid_image(originals, 1 - originals, count=16, min_side=64, gap=2)
    assert image.mode == "L" and image.size == (16 * (64 + 2) + 2, 2 * 64 + 3 * 2)
    canvas = np.asarray(image)
    first = (originals[0, 0].numpy() * 255).round().astype(np.uint8).repeat(8, 0).repeat(8, 1)
    assert np.array_equal(canvas[2:66, 2:66], first)
    assert np.array_equal(canvas[68:132, 2:66], ((1 - originals[0, 0]).numpy() * 255).round().astype(np.uint8).repeat(8, 0).repeat(8, 1))


# -- label attacks on synthetic gradients -------------------------------------------------------------


def pairwise_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """The share of (positive, negative) pairs a score orders rightly, ties counting half."""
    pos, neg = scores[positives][:, None], scores[~positives][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_oriented_auc_on_a_hand_computed_case():
    scores, positives = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])
    assert attacks.oriented_auc(scores, positives) == pytest.approx(0.75)  # 3 of the 4 pairs ordered rightly
    assert attacks.oriented_auc(-scores, positives) == pytest.approx(0.75)  # either way round
    with pytest.raises(ValueError, match="one class only"):
        attacks.oriented_auc(scores, torch.ones(4, dtype=torch.bool))


def binary_gradients(structured: bool, count: int = 2000, dims: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients as a u-shaped client returns them for two classes: the rarer class 1 along +u and
    longer, class 0 along -u and shorter, plus noise; or noise that ignores the labels."""
    generator = torch.Generator().manual_seed(5)
    labels = (torch.rand(count, generator=generator) < 0.3).long()
    noise = torch.randn(count, dims, generator=generator) * 0.3
    if not structured:
        return noise, labels
    direction = torch.nn.functional.normalize(torch.randn(dims, generator=generator), dim=0)
    along = torch.where(labels == 1, 3.0, -1.0).unsqueeze(1) * direction
    return along + noise, labels


def test_norm_and_cosine_attacks_read_labels_from_structured_gradients():
    gradients, labels = binary_gradients(structured=True)
    norm, cosine = attacks.infer_labels(gradients, labels, classes=2, known_per_class=1)
    assert (norm.method, cosine.method) == ("norm", "cosine")
    assert norm.auc > 0.95 and cosine.auc > 0.95 and cosine.accuracy > 0.95
    assert norm.auc == pytest.approx(pairwise_auc(gradients.norm(dim=1).numpy(), labels.numpy() == 1))
    assert cosine.samples == len(labels) - 2 and norm.samples == len(labels)
    assert cosine.chance == pytest.approx(float((labels[2:] == 0).double().mean()), abs=2e-3)


def test_label_attacks_are_at_chance_on_gradients_that_ignore_the_labels():
    gradients, labels = binary_gradients(structured=False)
    norm, cosine = attacks.infer_labels(gradients, labels, classes=2, known_per_class=1)
    scores = gradients.norm(dim=1).numpy()
    assert norm.auc == pytest.approx(max(pairwise_auc(scores, labels.numpy() == 1), 1 - pairwise_auc(scores, labels.numpy() == 1)))
    assert norm.auc < 0.56 and cosine.auc < 0.56


def test_the_cosine_attack_names_one_of_many_classes():
    generator = torch.Generator().manual_seed(7)
    classes, count, dims = 10, 3000, 64
    labels = torch.randint(0, classes, (count,), generator=generator)
    directions = torch.randn(classes, dims, generator=generator)
    structured = directions[labels] + 0.5 * torch.randn(count, dims, generator=generator)
    (guess,) = attacks.infer_labels(structured, labels, classes, known_per_class=2)
    assert guess.method == "cosine" and guess.auc is None and guess.samples == count - 2 * classes
    assert guess.accuracy > 0.9
    (blind,) = attacks.infer_labels(torch.randn(count, dims, generator=generator), labels, classes, known_per_class=2)
    assert abs(blind.accuracy - 1 / classes) < 0.04 and blind.chance < 0.13


def test_the_known_samples_are_the_first_of_each_class():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 1])
    assert attacks.known_samples(labels, 1, 3).tolist() == [True, True, False, True, False, False, False]
    assert attacks.known_samples(labels, 2, 3).tolist() == [True, True, True, True, True, False, True]


def test_a_vanilla_server_is_right_as_often_as_label_dp_leaves_labels_true():
    labels = torch.tensor([0, 0, 0, 1])
    assert attacks.received_labels(None, labels) == attacks.LabelGuess("received", 4, accuracy=1.0, chance=0.75)
    assert attacks.received_labels({"released": 4, "true": 1}, labels).accuracy == 0.25
    with pytest.raises(ValueError, match="released"):
        attacks.received_labels({"released": 0, "true": 0}, labels)


# -- the command, on tiny digits runs -------------------------------------------------------------

RUNS = {
    "plain": {"mode": "u-shaped"},
    "activations": {"mode": "u-shaped", "activation_clip": 1.0, "activation_noise": 5.0},
    "gradients": {"mode": "u-shaped", "gradient_defence": "max-norm"},
    "label-dp": {"mode": "vanilla", "label_dp": 1.0, "limit": 256},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each run's results file and results, as `splitfed run split --save-model --out` writes them."""
    folder = tmp_path_factory.mktemp("attacks")
    made = {}
    for name, settings in RUNS.items():
        result = launch.run(split.SCENARIO, SplitSettings(dataset="digits", epochs=1, batch_size=32, **settings),
                            SplitRun(session=f"attack-{name}", save_model=folder / f"{name}.safetensors"))
        path = folder / f"{name}.json"
        path.write_text(json.dumps(result, default=str))
        made[name] = (path, result)
    return made


def attack(*args: str) -> tuple[object, dict | None]:
    """The command's result, and its JSON where it wrote one (the last argument after --out)."""
    result = CliRunner().invoke(attack_app, list(args))
    written = Path(args[args.index("--out") + 1]) if "--out" in args else None
    return result, json.loads(written.read_text()) if written is not None and result.exit_code == 0 else None


def test_activation_noise_defeats_inversion_that_an_undefended_run_allows(runs, tmp_path):
    figures = {}
    for name in ("plain", "activations"):
        result, figures[name] = attack("inversion", str(runs[name][0]), "--epochs", "10", "--grid", str(tmp_path / f"{name}.png"),
                                       "--out", str(tmp_path / f"{name}.json"))
        assert result.exit_code == 0, result.stderr
        assert "baseline" in result.stdout
    plain, defended = figures["plain"], figures["activations"]
    assert plain["victims"] == 360 and plain["public_samples"] == 1437 and plain["run"]["defences"]["activation_clip"] is None
    assert plain["decoder"]["ssim"] > plain["baseline"]["ssim"] + 0.3 and plain["decoder"]["mse"] < 0.5 * plain["baseline"]["mse"]
    assert defended["decoder"]["ssim"] < plain["decoder"]["ssim"] - 0.3
    assert defended["decoder"]["ssim"] < defended["baseline"]["ssim"] + 0.1  # no better than knowing nothing
    assert plain["baseline"] == defended["baseline"]  # the same victims and public data
    with Image.open(tmp_path / "plain.png") as grid:
        assert grid.size[1] == 2 * 64 + 3 * 2


def test_inversion_gives_the_same_figures_twice(runs):
    settings = launch_settings(runs["activations"][1])
    victim = attacks.rebuild(settings, load_model(runs["activations"][1]))
    test, public = victim.task.data(victim.context, train=False), attacks.public_data(victim)
    first, second = (attacks.invert(victim, public, test, 300, 50, 2, seed=4).as_dict() for _ in range(2))
    assert first == second


def launch_settings(result: dict) -> SplitSettings:
    from splitfed import config

    return config.build(SplitSettings, result["config"])


def load_model(result: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(result["model_file"])


def test_max_norm_lowers_what_the_returned_gradients_tell(runs, tmp_path):
    accuracy = {}
    for name in ("plain", "gradients"):
        result, document = attack("labels", str(runs[name][0]), "--out", str(tmp_path / f"{name}.json"))
        assert result.exit_code == 0, result.stderr
        (guess,) = document["guesses"]
        assert guess["method"] == "cosine" and guess["samples"] == 1437 - 10 and guess["auc"] is None
        accuracy[name] = guess["accuracy"]
    assert accuracy["plain"] > 0.9 and accuracy["gradients"] < accuracy["plain"] - 0.2


def test_a_vanilla_server_scores_the_labels_it_received(runs, tmp_path):
    path, result = runs["label-dp"]
    outcome, document = attack("labels", str(path), "--out", str(tmp_path / "labels.json"))
    assert outcome.exit_code == 0, outcome.stderr
    (guess,) = document["guesses"]
    counts = result["label_dp"]
    assert guess["method"] == "received" and guess["samples"] == counts["released"] == 256
    assert guess["accuracy"] == counts["true"] / counts["released"] < 0.5


TWO_CLASS_TASK = """
from torch import nn


def model(context):
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
"""


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    """A u-shaped run on features (csv) of two classes, the rarer one 30%: its results file."""
    folder = tmp_path_factory.mktemp("two-classes")
    rng = np.random.default_rng(0)
    for part, count in (("train", 600), ("test", 200)):
        labels = (rng.random(count) < 0.3).astype(int)
        features = rng.normal(0, 1, (count, 4)) + labels[:, None] * 1.5
        rows = ["f0,f1,f2,f3,label"] + [",".join(f"{value:.4f}" for value in row) + f",{label}" for row, label in zip(features, labels)]
        (folder / f"{part}.csv").write_text("\n".join(rows) + "\n")
    (folder / "task.py").write_text(TWO_CLASS_TASK)
    settings = SplitSettings(task=str(folder / "task.py"), dataset="csv", data_dir=folder, epochs=2, batch_size=32, mode="u-shaped")
    result = launch.run(split.SCENARIO, settings, SplitRun(session="attack-two-classes", save_model=folder / "model.safetensors"))
    path = folder / "results.json"
    path.write_text(json.dumps(result, default=str))
    return path


def test_two_classes_of_features_get_aucs_and_no_ssim(two_classes, tmp_path):
    result, document = attack("labels", str(two_classes), "--out", str(tmp_path / "labels.json"))
    assert result.exit_code == 0, result.stderr
    assert "AUC" in result.stdout
    norm, cosine = document["guesses"]
    assert (norm["method"], cosine["method"]) == ("norm", "cosine") and norm["samples"] == 600 and cosine["samples"] == 598
    assert cosine["auc"] > 0.9 and 0.5 <= norm["auc"] <= 1 and 0.6 < cosine["chance"] < 0.8
    result, document = attack("inversion", str(two_classes), "--epochs", "5", "--out", str(tmp_path / "inversion.json"))
    assert result.exit_code == 0, result.stderr
    assert document["decoder"]["ssim"] is None and document["baseline"]["ssim"] is None and document["decoder"]["mse"] > 0
    refused = attack("inversion", str(two_classes), "--grid", str(tmp_path / "grid.png"))[0]
    assert "--grid draws images" in one_error_line(refused) and not (tmp_path / "grid.png").exists()


def rewritten(runs, tmp_path: Path, **changes) -> Path:
    """The plain run's results file with `changes` (None: the key removed)."""
    result = {**runs["plain"][1], **changes}
    path = tmp_path / "changed.json"
    path.write_text(json.dumps({key: value for key, value in result.items() if value is not None}, default=str))
    return path


def one_error_line(result) -> str:
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_results_files_are_one_line_and_exit_code_2(runs, tmp_path):
    other = tmp_path / "fedavg.json"
    other.write_text(json.dumps({"scenario": "fedavg", "history": [{"step": 1, "accuracy": 0.5, "loss": 1.0}], "config": {}}))
    assert "a fedavg run's results; attacks read a split run's" in one_error_line(attack("labels", str(other))[0])
    missing = rewritten(runs, tmp_path, model_file=str(tmp_path / "gone.safetensors"))
    assert "gone.safetensors is not there" in one_error_line(attack("inversion", str(missing))[0])
    unsaved = rewritten(runs, tmp_path, model_file=None)
    assert "saved no model" in one_error_line(attack("labels", str(unsaved))[0])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not tensors")
    assert "not a safetensors model file" in one_error_line(attack("labels", str(rewritten(runs, tmp_path, model_file=str(garbage))))[0])
    text = tmp_path / "notes.json"
    text.write_text("not json {")
    assert "not JSON" in one_error_line(attack("inversion", str(text))[0])
    assert "no such file" in one_error_line(attack("inversion", str(tmp_path / "absent.json"))[0])


def test_a_model_file_of_another_model_is_refused(runs, tmp_path):
    tiny = rewritten(runs, tmp_path, config={**runs["plain"][1]["config"], "model": "tiny", "cut_layer": None})
    assert "does not hold this run's model" in one_error_line(attack("inversion", str(tiny))[0])


def test_an_unknown_attack_is_a_usage_error(runs):
    assert CliRunner().invoke(attack_app, ["steal", str(runs["plain"][0])]).exit_code == 2
