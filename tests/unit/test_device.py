"""The device setting and the wire's dtypes, on a machine without a GPU: devices it lacks are
refused in one line, auto takes the CPU and says so once, and what a tensor becomes on the wire
comes back as the same bits (bf16 as its 16 bits, which the codec checks as bf16)."""

import logging

import numpy as np
import pytest
import torch

from splitfed.errors import DeviceError
from splitfed.learning import device
from splitfed.learning.settings import SplitNNSettings, SplitSettings, TrainSettings
from splitfed.protocol import Message, ProtocolError, decode, encode

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these check what a machine without a GPU says")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_device_this_machine_lacks_is_one_line(name):
    with pytest.raises(DeviceError, match=rf"^--device {name}: torch sees no CUDA device on this machine; use --device cpu or auto$"):
        device.resolve(name)


def test_auto_takes_the_cpu_and_says_so_once(caplog):
    device.resolve.cache_clear()
    with caplog.at_level(logging.INFO, logger="splitfed.learning.device"):
        assert device.resolve("auto") == torch.device("cpu")
        assert device.resolve("auto") == torch.device("cpu")
    assert [record.getMessage() for record in caplog.records] == ["--device auto: computing on the CPU (torch sees no GPU)"]


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "mps", "CPU"])
def test_the_device_setting_takes_only_auto_cpu_and_cuda(bad):
    from splitfed import config

    with pytest.raises(ValueError, match="--device"):
        config.build(TrainSettings, {"device": bad})


def test_fp16_is_refused_for_split_learning_in_one_line():
    with pytest.raises(ValueError, match="^--precision fp16 needs its loss scaled.*use --precision bf16"):
        SplitSettings(precision="fp16")
    with pytest.raises(ValueError, match="^--precision fp16"):
        SplitNNSettings(precision="fp16", clients=2)
    assert SplitSettings(precision="bf16", wire_dtype="bf16").wire_dtype == "bf16"


def test_fp32_on_the_cpu_is_the_tensors_own_memory():
    """Nothing changes for CPU runs in fp32: the wire array is a view, not a copy, and no autocast runs."""
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    array = device.to_numpy(tensor, "fp32")
    assert np.shares_memory(array, tensor.numpy())
    assert device.Compute(torch.device("cpu")).scaler is None
    with device.Compute(torch.device("cpu")).autocast():
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16"])
def test_a_wire_tensor_comes_back_as_the_same_bits_through_a_frame(wire):
    values = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)) * 100
    sent = device.to_numpy(values, wire)
    received = decode(encode(Message("activations", "s", "c", seq=1, tensors={"x": sent}))).tensors["x"]
    back = device.from_numpy(received, torch.device("cpu"))
    assert back.dtype == device.DTYPES[wire]
    assert torch.equal(back, values.to(device.DTYPES[wire]))  # one rounding, on the sender, and none after
    assert received.nbytes == values.numel() * (4 if wire == "fp32" else 2)
    assert device.from_numpy(received, torch.device("cpu"), torch.float32).dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_bf16_bits_that_are_not_finite_are_rejected_by_the_codec(bad):
    bits = device.to_numpy(torch.tensor([1.0, bad]), "bf16")
    with pytest.raises(ProtocolError) as caught:
        decode(encode(Message("activations", "s", "c", seq=1, tensors={"x": bits})))
    assert caught.value.reason == "nonfinite"


def test_every_finite_bf16_passes_the_codec():
    every = np.arange(2**16, dtype=np.uint16)
    finite = every[torch.isfinite(torch.from_numpy(every.view(np.int16)).view(torch.bfloat16)).numpy()]
    assert len(finite) == 2**16 - 2 * (2**7 + 1) + 2  # all but the exponent-all-ones patterns (NaNs and the two infinities)
    assert np.array_equal(decode(encode(Message("x", "s", "c", seq=1, tensors={"x": finite}))).tensors["x"], finite)


def test_batches_cross_to_the_device_as_raw_pixels_and_normalise_there_to_the_same_bits():
    from splitfed.learning.data import Images, Samples

    raw = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    samples = Samples(Images(raw, 72.9, 90.0), torch.arange(10))
    images, labels = samples.on(torch.device("cpu"), whole=True).batch(torch.tensor([3, 1]))
    assert torch.equal(images, (raw[[3, 1]].float() - 72.9) / 90.0)
    assert torch.equal(labels, torch.tensor([3, 1]))


def test_bf16_on_the_wire_halves_split_learnings_bytes_per_batch():
    import splitfed

    runs = {wire: splitfed.run("split", limit=256, test_limit=64, wire_dtype=wire) for wire in ("fp32", "bf16")}
    fp32, bf16 = (runs[wire]["traffic"] for wire in ("fp32", "bf16"))
    assert fp32["messages"] == bf16["messages"]
    assert 0.45 < bf16["bytes"] / fp32["bytes"] < 0.55  # the activations and gradients halve; headers and labels do not
    assert abs(runs["bf16"]["accuracy"] - runs["fp32"]["accuracy"]) <= 0.1
