"""The simulated accelerator holds what the device plumbing's tests rely on: it computes what the
CPU computes, bit for bit, and refuses what a GPU refuses."""

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

from tests.simulated_device import SimulatedTensor, simulated_accelerator


def on_device(t: torch.Tensor) -> bool:
    return isinstance(t, SimulatedTensor) and t.device == torch.device("meta")


def test_moves_and_factories_put_real_values_on_the_device():
    host = torch.arange(6.0).reshape(2, 3)
    with simulated_accelerator() as device:
        moved = host.to(device)
        made = {
            "to": (host.to(torch.device("meta"), non_blocking=True), host),
            "zeros": (torch.zeros(2, 3, device=moved.device), torch.zeros(2, 3)),
            "zeros_like": (torch.zeros_like(moved), torch.zeros(2, 3)),
            "full": (torch.full((2,), 7.0, device=device), torch.full((2,), 7.0)),
            "arange": (torch.arange(5, device=device), torch.arange(5)),
            "tensor": (torch.tensor([1.5, 2.5], device=device), torch.tensor([1.5, 2.5])),
            "randn": (torch.randn(4, device=device, generator=torch.Generator().manual_seed(3)), torch.randn(4, generator=torch.Generator().manual_seed(3))),
            "op": (moved * 2 + 1, host * 2 + 1),
        }
        for name, (value, expected) in made.items():
            assert on_device(value), name
            assert torch.equal(value.cpu(), expected), name
        assert on_device(torch.empty(3, device=device))
        layer = nn.Linear(3, 2).to(device)
        assert isinstance(layer.weight, nn.Parameter) and on_device(layer.weight) and on_device(layer(moved))


def test_the_context_leaves_torch_as_it_found_it():
    tensor, as_tensor, start = torch.tensor, torch.as_tensor, threading.Thread.start
    with simulated_accelerator():
        pass
    assert torch.tensor is tensor and torch.as_tensor is as_tensor and threading.Thread.start is start
    assert type(torch.zeros(2, device="meta")) is torch.Tensor


@pytest.mark.parametrize("mix", [
    lambda d, h: d + h,
    lambda d, h: h * d,
    lambda d, h: d @ h.T,
    lambda d, h: torch.stack([d, h]),
    lambda d, h: nn.functional.cross_entropy(d, h.argmax(1)),
    lambda d, h: d.sum() + h,  # a device scalar with a host tensor: a GPU refuses it too
    lambda d, h: h[torch.tensor([0], device=d.device)],  # host data, device indices
], ids=["add", "mul", "matmul", "stack", "host-targets", "device-scalar", "device-indices"])
def test_mixing_with_a_host_tensor_is_refused(mix):
    host = torch.ones(2, 3)
    with simulated_accelerator() as device, pytest.raises(RuntimeError, match="Expected all tensors to be on the same device"):
        mix(torch.ones(2, 3, device=device), host)


def test_a_module_left_on_the_host_is_refused():
    with simulated_accelerator() as device, pytest.raises(RuntimeError, match="same device"):
        nn.Linear(3, 2)(torch.ones(4, 3, device=device))


def test_a_meta_tensor_without_data_is_refused():
    empty = torch.empty(2, device="meta")  # made outside the simulation: a shape, no values
    with simulated_accelerator() as device, pytest.raises(RuntimeError, match="without data"):
        torch.ones(2, device=device) + empty


def test_what_a_gpu_allows_with_host_tensors_is_allowed():
    with simulated_accelerator() as device:
        data = torch.arange(12.0).reshape(4, 3).to(device)
        assert torch.equal((data * torch.tensor(2.0)).cpu(), torch.arange(12.0).reshape(4, 3) * 2)  # a host scalar
        assert torch.equal(data[torch.tensor([3, 1])].cpu(), torch.tensor([[9.0, 10, 11], [3, 4, 5]]))  # host indices
        data[torch.tensor([0])] = torch.zeros(3, device=device)
        assert data.sum().item() == sum(range(3, 12))


def test_leaving_the_device_copies():
    with simulated_accelerator() as device:
        on = torch.arange(4.0).to(device)
        into = torch.empty(4)
        leaving = {"cpu": on.cpu(), "to": on.to("cpu"), "copy_": into.copy_(on, non_blocking=True)}
        on.add_(100)
        for name, host in leaving.items():
            assert type(host) is torch.Tensor and host.device.type == "cpu", name
            assert torch.equal(host, torch.arange(4.0)), f"{name} aliases the device tensor"
            assert host.untyped_storage().data_ptr() != on.inner.untyped_storage().data_ptr(), name


def test_arriving_on_the_device_copies():
    array = np.arange(4, dtype=np.float32)
    with simulated_accelerator() as device:
        arrived = torch.from_numpy(array).to(device, non_blocking=True)
        array += 100
        assert torch.equal(arrived.cpu(), torch.arange(4.0))


def test_numpy_is_refused_on_the_device_and_scalars_sync():
    with simulated_accelerator() as device:
        on = torch.tensor([1.5, 2.5], device=device)
        for to_numpy in (lambda t: t.numpy(), np.asarray, lambda t: t.detach().contiguous().numpy()):
            with pytest.raises(TypeError, match="can't convert meta device type tensor to numpy"):
                to_numpy(on)
        assert on.sum().item() == 4.0 and float(on[0]) == 1.5 and on.tolist() == [1.5, 2.5]
        assert np.array_equal(on.cpu().numpy(), [1.5, 2.5])


def test_threads_started_inside_compute_on_the_device():
    made = {}
    with simulated_accelerator() as device:
        worker = threading.Thread(target=lambda: made.update(t=torch.ones(2).to(device) + torch.zeros(2, device=device)))
        worker.start()
        worker.join()
    assert on_device(made["t"]) and made["t"].tolist() == [1.0, 1.0]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 10),
    )


def train(device: torch.device, optimiser: str) -> tuple[dict, list[float], int]:
    """Five steps of a small cnn from one seed; its state on the host, the losses, the correct count."""
    torch.manual_seed(0)  # the weights, and dropout's masks
    model = small_cnn().to(device)
    if optimiser.startswith("adam"):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=optimiser == "adam-foreach" or None)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(5):
        x, y = torch.randn(8, 1, 8, 8, generator=batches), torch.randint(0, 10, (8,), generator=batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if device.type == "meta":
        assert all(on_device(v) for state in opt.state.values() for k, v in state.items() if k != "step")
        assert all(on_device(p.grad) for p in model.parameters())
    model.eval()
    with torch.no_grad():
        correct = torch.stack([(model(x).argmax(1) == y).sum()]).sum().item()
    return {name: value.cpu() for name, value in model.state_dict().items()}, losses, correct


@pytest.mark.parametrize("optimiser", ["adam", "adam-foreach", "sgd-momentum"])
def test_training_on_the_device_is_the_cpus_bit_for_bit(optimiser):
    on_host = train(torch.device("cpu"), optimiser)
    with simulated_accelerator() as device:
        simulated = train(device, optimiser)
    assert simulated[1:] == on_host[1:]
    assert simulated[0].keys() == on_host[0].keys()
    assert all(torch.equal(simulated[0][name], on_host[0][name]) for name in on_host[0])


def test_state_dicts_cross_devices():
    host = small_cnn()
    with simulated_accelerator() as device:
        model = small_cnn().to(device)
        model.load_state_dict(host.state_dict())
        assert all(on_device(v) and torch.equal(v.cpu(), host.state_dict()[k]) for k, v in model.state_dict().items())
        with torch.no_grad():
            model[0].weight.add_(1)
        host.load_state_dict(model.state_dict())
        twin = copy.deepcopy(model)  # the split server's evaluation copy
        with torch.no_grad():
            twin[0].weight.zero_()
        assert on_device(twin[0].weight) and torch.equal(model[0].weight.cpu(), host[0].weight)
        back = model.to("cpu")
    assert all(type(v) is torch.Tensor and torch.equal(v, host.state_dict()[k]) for k, v in back.state_dict().items())
