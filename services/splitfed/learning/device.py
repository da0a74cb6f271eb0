"""Where a party computes and in what precision: its device, autocast and gradient scaling, and
the two doors of the wire: a tensor leaves as a host copy in the wire's dtype (`to_numpy`), and
arrives straight on the device (`from_numpy`).

On the CPU in fp32 nothing here changes a bit: no autocast, no scaler, and a wire tensor is the
CPU tensor's own numpy view, as before devices were a setting."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from splitfed.errors import DeviceError
from splitfed.learning.settings import ModelSettings

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def resolve(name: str) -> torch.device:
    """The torch device `name` (auto, cpu, cuda, cuda:N) stands for on this machine; DeviceError
    when it has no such device. `auto` says once which device it took."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("--device auto: computing on %s", _described(device))
    else:
        device = torch.device(name)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(f"--device {name}: torch sees no CUDA device on this machine; use --device cpu or auto")
            if (device.index or 0) >= torch.cuda.device_count():
                raise DeviceError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "cuda":
        _deterministic()
    return device


def _described(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "the CPU (torch sees no GPU)"


def _deterministic() -> None:
    """Torch's deterministic algorithms where it has them (warning where it has none), so that a
    seeded run repeats on the same GPU. cuBLAS reads its workspace setting when it starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    # fp32 means fp32: TF32 would round the inputs of convolutions and matmuls to 10-bit mantissas
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@dataclass(eq=False)
class Compute:
    """A party's device and precision: what its models, batches and averaging run on. fp16 carries
    a gradient scaler (its loss is scaled so that small gradients do not flush to zero)."""

    device: torch.device
    precision: str = "fp32"

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    @classmethod
    def of(cls, settings: ModelSettings) -> Compute:
        """The compute that learning settings ask for."""
        return cls(resolve(settings.device), settings.precision)

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the precision (fp32: none at all, so fp32 runs are unchanged)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, opt: torch.optim.Optimizer) -> None:
        """The optimiser's step; under fp16 skipped when the scaled gradients overflowed."""
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()


CPU = Compute(torch.device("cpu"))


def to_numpy(tensor: torch.Tensor, wire_dtype: str | None = None) -> np.ndarray:
    """`tensor` as numpy (for a frame, or numpy's averaging), in `wire_dtype` (None: its own).
    Cast on the device (half the bytes cross the bus in bf16), then copied into pinned host memory
    without stalling the GPU's stream: only this thread waits, for this copy."""
    tensor = tensor.detach() if wire_dtype is None else tensor.detach().to(DTYPES[wire_dtype])
    if tensor.device.type != "cpu":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
        host.copy_(tensor, non_blocking=True)
        if tensor.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(tensor.device))
            copied.synchronize()
        tensor = host
    tensor = tensor.contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def numpy_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Named tensors (a state dict) as numpy, for a frame (on the CPU, views of the tensors)."""
    return {name: to_numpy(value) for name, value in state.items()}


def state_of(model: nn.Module) -> dict[str, np.ndarray]:
    """A copy of `model`'s state as numpy, on the host: what a party keeps or averages while the model trains on."""
    return {name: array.copy() for name, array in numpy_state(model.state_dict()).items()}


def load_state(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """`state` (numpy) into `model`, wherever its tensors live."""
    model.load_state_dict({name: torch.from_numpy(np.array(value, copy=True)) for name, value in state.items()})


def from_numpy(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An array (a frame's) as a tensor on `device` (and in `dtype`, when given): bf16 from its 16 bits."""
    if array.dtype == np.uint16:
        tensor = torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.to(device, dtype, non_blocking=True)
