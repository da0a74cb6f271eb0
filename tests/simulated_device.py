"""An accelerator that runs on the CPU, so that the device plumbing is tested where there is no GPU.

Inside `simulated_accelerator()`, `torch.device("meta")` stands for a GPU that really holds data.
A tensor put there (`.to(device)`, `module.to(device)`, a factory with `device=`) reports that
device, keeps a CPU tensor inside and computes every op with the CPU's own kernels, so results are
bit for bit the CPU's. What a GPU refuses, it refuses: an op that mixes its tensors with a CPU
tensor that is not 0-dim raises "Expected all tensors to be on the same device", and `.numpy()`
raises, so a tensor left on the wrong side, or taken to the wire without a copy, fails the test.
Leaving it (`.cpu()`, `.to("cpu")`, `host.copy_(t)`) always copies, as leaving a GPU does.

Random draws (factories, dropout) come from the CPU's generators, where a GPU would use its own:
that is what keeps results the CPU's. Optimisers take their single-tensor path by default (a
subclass is no foreach type; `foreach=True` works too, `fused=True` is refused). Threads started
inside the context see the device too.

Not simulated: autocast and gradient scaling (`torch.autocast("meta")` is refused: fp32 only),
pinned memory, streams and events (production uses them only when `device.type == "cuda"`), roles
in other processes, and `Tensor.new_tensor` from Python data (its tensor has no data, and is
refused when it meets a simulated one).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest.mock import patch

import numpy as np
import torch
from torch._ops import OpOverload
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing

SIMULATED = torch.device("meta")
CPU = torch.device("cpu")
aten = torch.ops.aten

# Ops that take tensors from both sides on a GPU too: the copies between them, and indexing,
# whose indices (the second argument) may stay on the host.
COPIES = {aten._to_copy.default, aten.copy_.default}
HOST_INDICES = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class SimulatedTensor(torch.Tensor):
    """A tensor on the simulated device: a shell on the meta device around the CPU tensor `inner`
    that holds its values."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> SimulatedTensor:
        shell = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, layout=inner.layout, device=SIMULATED, requires_grad=False,
        )
        shell.inner = inner
        return shell

    # The default would make every result an instance of this class, `.cpu()`'s included.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"SimulatedTensor({self.inner!r})"

    def numpy(self, *, force: bool = False) -> np.ndarray:
        if force:
            return self.cpu().numpy()
        raise TypeError("can't convert meta device type tensor to numpy. Use Tensor.cpu() to copy the tensor to host memory first.")

    def tolist(self) -> list:  # a GPU copies to the host for it too
        return self.cpu().tolist()

    @classmethod
    def __torch_dispatch__(cls, func: OpOverload, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in COPIES:
            refuse_host_tensors(func, (args[0], *args[2:], *kwargs.values()) if func in HOST_INDICES else (*args, *kwargs.values()))
        if func is aten.copy_.default:  # either side may be the host's
            target, source, *rest = args
            (target.inner if isinstance(target, SimulatedTensor) else target).copy_(
                source.inner if isinstance(source, SimulatedTensor) else source, *rest)
            return target
        out = func(*mapped(args, lambda t: t.inner if isinstance(t, SimulatedTensor) else t), **on_host(kwargs))
        if kwargs.get("device") == CPU:  # asked for on the host (`.cpu()`): a new host tensor, as from a GPU
            return out
        return return_and_correct_aliasing(func, args, kwargs, simulated(out))


def mapped(values: tuple | list, change: Callable[[Any], Any]) -> tuple | list:
    """`change` applied to every value, and to every value of a list among them (an op's arguments
    and results are nested no deeper than that)."""
    return type(values)(type(v)(map(change, v)) if isinstance(v, (list, tuple)) else change(v) for v in values)


def leaves(values: Iterable) -> Iterator:
    for v in values:
        yield from v if isinstance(v, (list, tuple)) else (v,)


def refuse_host_tensors(func: OpOverload, values: Iterable) -> None:
    """Raise as a GPU does when an op mixes its tensors with a host tensor that is not a scalar
    (or with a meta tensor that has no data, made where this simulation does not reach)."""
    for t in leaves(values):
        if isinstance(t, torch.Tensor) and not isinstance(t, SimulatedTensor) and (t.dim() > 0 or t.is_meta):
            where = "meta (a tensor without data, made outside the simulation)" if t.is_meta else t.device.type
            raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"meta and {where}! ({func} on the simulated accelerator)")


def on_host(kwargs: dict) -> dict:
    return {k: (CPU if k == "device" and v == SIMULATED else v) for k, v in kwargs.items()}


def simulated(out: Any) -> Any:
    """An op's results (a tensor, or a tuple or list of them) put on the simulated device."""

    def wrap(t: Any) -> Any:
        return SimulatedTensor(t) if type(t) is torch.Tensor else t

    return mapped(out, wrap) if isinstance(out, (list, tuple)) else wrap(out)


class Accelerator(TorchDispatchMode):
    """Puts on the simulated device what is asked for there without a simulated tensor in hand:
    factories (`torch.zeros(..., device=...)`) and moves from the host (`.to(device)`)."""

    def __torch_dispatch__(self, func: OpOverload, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if kwargs.get("device") == SIMULATED and not any(isinstance(t, SimulatedTensor) for t in leaves((*args, *kwargs.values()))):
            return simulated(func(*args, **on_host(kwargs)))
        return func(*args, **kwargs)


def built_on_host(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`torch.tensor(data, device=...)` builds from Python data out of the dispatch modes' reach:
    build it on the host and move it."""

    def build(data: Any, *args: Any, device: torch.device | str | None = None, **kwargs: Any) -> torch.Tensor:
        if isinstance(data, torch.Tensor) or device is None or torch.device(device) != SIMULATED:
            return original(data, *args, device=device, **kwargs)
        requires_grad = kwargs.pop("requires_grad", False)
        return original(data, *args, **kwargs).to(SIMULATED).requires_grad_(requires_grad)

    return build


def started_on_device(original_start: Callable[[threading.Thread], None]) -> Callable[[threading.Thread], None]:
    """Dispatch modes are per thread: a thread started in the context runs in one of its own."""

    def start(thread: threading.Thread) -> None:
        run = thread.run

        def run_on_device() -> None:
            with Accelerator():
                run()

        thread.run = run_on_device
        original_start(thread)

    return start


@contextmanager
def simulated_accelerator() -> Iterator[torch.device]:
    """Within it, `torch.device("meta")` (the value it yields) is an accelerator that holds data."""
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        # load_state_dict warns that copying into a meta tensor does nothing; here it copies.
        warnings.filterwarnings("ignore", message="for .*: copying from a non-meta parameter")
        stack.enter_context(patch.object(torch, "tensor", built_on_host(torch.tensor)))
        stack.enter_context(patch.object(torch, "as_tensor", built_on_host(torch.as_tensor)))
        stack.enter_context(patch.object(threading.Thread, "start", started_on_device(threading.Thread.start)))
        stack.enter_context(Accelerator())
        yield SIMULATED
