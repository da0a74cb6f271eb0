"""torchvision models cut at any top-level child: head -> body is the whole model, and one step of
split training (each side its own optimiser, the gradient passed at the cut as roles.split passes
it) is one step of the whole model, BatchNorm's running statistics included. Bad models and bad
cuts are refused with the reason and the cut points that would work."""

import copy
import functools
import json
import sys

import pytest
import torch
import torchvision  # noqa: F401 (ci/setup.sh installs it: without it these tests fail here rather than pass as skipped)

from splitfed.learning import cutting, models, train
from splitfed.learning.settings import DATASETS, SplitSettings

FASHION, CIFAR = DATASETS["fashion-mnist"], DATASETS["cifar10"]  # 1x28x28, 3x32x32
RESNET18_CHILDREN = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten", "fc"]


@functools.cache
def built(name, dataset):
    return models.build(name, DATASETS[dataset], seed=1)


def batch(meta, size=2):
    generator = torch.Generator().manual_seed(5)
    return torch.randn(size, *meta.shape, generator=generator), torch.randint(0, meta.classes, (size,), generator=generator)  # (B, C, H, W), (B,)


def whole_step(model, images, labels):
    model.train()
    opt = train.optimizer(model.parameters(), "sgd", 0.1)
    loss = train.loss_fn(model(images), labels)
    loss.backward()
    opt.step()


def split_step(parts, images, labels):
    """One vanilla training batch as the split roles compute it."""
    client, server = train.optimizer(parts.head.parameters(), "sgd", 0.1), train.optimizer(parts.body.parameters(), "sgd", 0.1)
    parts.head.train(), parts.body.train()
    activations = parts.head(images)  # (B, *cut_shape): what the client sends
    received = activations.detach().requires_grad_(True)
    train.loss_fn(parts.body(received), labels).backward()
    server.step()
    activations.backward(received.grad)  # the gradient the server sends back
    client.step()


def largest_difference(a, b):
    first, second = a.state_dict(), b.state_dict()
    assert list(first) == list(second)
    return max((first[key].double() - second[key].double()).abs().max().item() for key in first)


def assert_every_cut_is_exact(name, meta, cuts=None):
    model = built(name, meta.name)
    images, labels = batch(meta)
    whole = copy.deepcopy(model)
    with torch.no_grad():
        expected = whole.eval()(images)
    whole_step(whole, images, labels)
    for cut in cuts or cutting.usable_cuts(model):
        halves = copy.deepcopy(model)
        parts = cutting.cut(halves, cut)  # the parts hold the halves' own modules
        with torch.no_grad():
            assert torch.allclose(parts.body.eval()(parts.head.eval()(images)), expected, rtol=0, atol=1e-5), f"{name} cut {cut}"
        split_step(parts, images, labels)
        assert largest_difference(halves, whole) <= 1e-5, f"{name} cut {cut}: the split step is not the whole step"


@pytest.mark.parametrize("meta", [FASHION, CIFAR], ids=["1x28x28", "3x32x32"])
def test_resnet18_at_every_cut_is_the_whole_model(meta):
    model = built("resnet18", meta.name)
    assert list(model._modules) == RESNET18_CHILDREN
    assert isinstance(model.conv1, torch.nn.Conv2d) and model.conv1.in_channels == meta.shape[0] and model.conv1.kernel_size == (3, 3)
    assert isinstance(model.maxpool, torch.nn.Identity)  # the CIFAR stem: 28 and 32 px keep their size into layer1
    assert cutting.usable_cuts(model) == list(range(1, 11))
    assert_every_cut_is_exact("resnet18", meta)


def test_mobilenet_and_vgg_cuts_are_the_whole_model():
    assert list(built("mobilenet_v3_small", "fashion-mnist")._modules) == ["features", "avgpool", "flatten", "classifier"]
    assert_every_cut_is_exact("mobilenet_v3_small", FASHION)
    assert_every_cut_is_exact("vgg11", CIFAR, cuts=[1, "flatten"])


def test_a_cut_by_name_is_after_that_child():
    model = built("resnet18", "fashion-mnist")
    parts = cutting.cut(model, "layer1")
    assert parts.cut_layer == 5 and parts.head[-1] is model.layer1 and parts.body[0] is model.layer2
    assert cutting.cut(model, "5").cut_layer == 5  # digits are an index
    assert next(iter(parts.body.state_dict())).startswith("0."), "parts are indexed from 0, as roles.split.common.save_parts expects"
    assert cutting.cut(model, None).cut_layer == 10  # before the classifier
    assert cutting.cut(model, None, "u-shaped").cut_layer == 7  # the tail takes fc; the server still needs weights: layer4
    assert SplitSettings(model="resnet18", cut_layer="layer1").cut_layer == "layer1"


def test_cut_points_show_each_cut_with_its_activation():
    points = cutting.cut_points(built("resnet18", "cifar10"), CIFAR.shape)
    assert [p.name for p in points] == RESNET18_CHILDREN[:-1]
    layer1 = points[4]
    assert (layer1.index, layer1.shape, layer1.floats) == (5, (64, 32, 32), 64 * 32 * 32)
    total = sum(p.numel() for p in built("resnet18", "cifar10").parameters())
    assert all(p.client_params + p.server_params == total for p in points) and points[-1].server_params == 512 * 10 + 10


def test_bad_cuts_list_the_cut_points():
    model = built("resnet18", "fashion-mnist")
    with pytest.raises(ValueError, match=r"unknown cut 'layer9': give an index in 1\.\.10, or the name of the layer to cut after: conv1, bn1, .*, flatten$"):
        cutting.cut(model, "layer9")
    with pytest.raises(ValueError, match=r"cut layer 11 must be in 1\.\.10 for a 11-layer model in vanilla mode, or the name of the layer to cut after: conv1"):
        cutting.cut(model, 11)
    with pytest.raises(ValueError, match=r"cut layer 9 \(after avgpool\) leaves the server no weights to train; cuts where both do: 1 \(after conv1\), .*7 \(after layer3\)$"):
        cutting.cut(model, "avgpool", "u-shaped")
    with pytest.raises(ValueError, match="unknown cut 'layer1': give an index in 1..11$"):  # cnn's layers have no names
        cutting.cut(built("cnn", "fashion-mnist"), "layer1")


def test_bad_models_say_why():
    with pytest.raises(ValueError, match="unknown model 'nosuchmodel'; choose cnn, tiny or a torchvision classification model such as resnet18"):
        models.build("nosuchmodel", FASHION, 1)
    with pytest.raises(ValueError, match="densenet121 cannot be cut: its forward is not its children in order"):
        models.build("densenet121", CIFAR, 1)  # its forward applies a functional relu after its features
    with pytest.raises(ValueError, match="vgg11 cannot run on fashion-mnist's 28x28 images: it needs images of at least 32x32 px"):
        models.build("vgg11", FASHION, 1)


def test_without_torchvision_cnn_still_builds_and_the_others_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now raises ImportError
    with pytest.raises(ValueError, match="torchvision is not installed: it builds every model but cnn and tiny"):
        models.build("resnet18", FASHION, 1)
    assert len(models.build("cnn", FASHION, 1)) == 12


def test_a_torchvision_model_is_seeded_and_draws_no_random_numbers_in_training():
    a, b = models.build("mobilenet_v3_small", FASHION, seed=3), models.build("mobilenet_v3_small", FASHION, seed=3)
    assert largest_difference(a, b) == 0 and largest_difference(a, models.build("mobilenet_v3_small", FASHION, seed=4)) > 0
    assert not any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in a.modules())  # dropout would differ between the halves' processes


def test_probing_a_part_leaves_batchnorm_statistics_alone():
    model = copy.deepcopy(built("resnet18", "fashion-mnist"))
    before = copy.deepcopy(model.bn1.state_dict())
    assert models.output_shape(model, FASHION.shape) == (10,) and models.forward_flops(model[:3], FASHION.shape) > 0
    assert all(torch.equal(before[key], value) for key, value in model.bn1.state_dict().items()) and model.training


def test_models_cli_lists_cut_points(tmp_path):
    from splitfed.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["models", "--cuts", "resnet18", "--out", str(tmp_path / "cuts.json")])
    assert result.exit_code == 0, result.stderr
    assert "layer1" in result.stdout and "64x28x28" in result.stdout
    document = json.loads((tmp_path / "cuts.json").read_text())
    assert [cut["after"] for cut in document["cuts"]] == RESNET18_CHILDREN[:-1] and document["default"] == 10
    bad = CliRunner().invoke(app, ["models", "--cuts", "nosuchmodel"])
    assert bad.exit_code == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: unknown model 'nosuchmodel'") and "Traceback" not in bad.stderr
