"""Tasks: what the parties train, on what. A task is a Python file or module the user writes and
names with --task; it defines

    model(context) -> torch.nn.Module          the whole model (every party builds it, seeded)
    data(context, train) -> Dataset | (x, y)   this party's training (train=True) or test data
    loss(context) -> (logits, labels) -> loss  optional: the batch's mean loss (default: cross-entropy)
    classes                                    optional: the class names, in label order
    input_shape                                optional: one sample's shape, for a party that holds no data

and may leave either function out: the model then comes from --model, the data from --dataset
(a built-in set shared out by --partition, or the party's own imagefolder, csv or npz files).
The built-in models and data sets are served by the same `Task`, so every scenario has one path
from settings to model and data. Task code never travels: each party runs its own copy, and the
parties compare fingerprints of what it builds (`fingerprint`) when they meet.

Every failure of the task's code is a TaskError naming the file and the function, raised while
the party is being built: before it joins anyone.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from splitfed.errors import DataError, TaskError
from splitfed.learning import data, local_data, models, train, vision
from splitfed.learning.device import Compute
from splitfed.learning.context import Context, has_placeholders
from splitfed.learning.settings import DATASETS, LOCAL_FORMATS, DataShape, ModelSettings

MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
FUNCTIONS = ("model", "data", "loss")


def import_task(spec: str) -> ModuleType:
    """The module --task names: a file PATH.py, or an importable package.module."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise TaskError(f"--task {spec}: no such file")
        stat = path.stat()  # a file edited since (in a notebook, say) is loaded afresh
        name = "splitfed_task_" + hashlib.sha256(f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]
        if name in sys.modules:  # several roles of one `splitfed run` share the module
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as exc:
            raise TaskError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
        except Exception as exc:  # noqa: BLE001 (whatever the user's module raises, one line names it)
            raise TaskError(f"{path}: importing it raised {_error(exc)}") from None
        sys.modules[name] = module
    elif MODULE_NAME.fullmatch(spec):
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            raise TaskError(f"--task {spec}: no module named {exc.name!r} (a file must end in .py)") from None
        except SyntaxError as exc:
            raise TaskError(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from None
        except Exception as exc:  # noqa: BLE001
            raise TaskError(f"--task {spec}: importing it raised {_error(exc)}") from None
    else:
        raise TaskError(f"--task {spec!r}: give a file PATH.py or a module package.module")
    where = getattr(module, "__file__", None) or spec
    if not any(callable(getattr(module, function, None)) for function in FUNCTIONS):
        raise TaskError(f"{where}: defines none of model(context), data(context, train), loss(context)")
    for function in FUNCTIONS:
        if hasattr(module, function) and not callable(getattr(module, function)):
            raise TaskError(f"{where}: {function} is not a function")
    return module


def _error(exc: BaseException) -> str:
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class Task:
    """The model and data every party of a run builds from the same settings."""

    def __init__(self, settings: ModelSettings):
        self.settings = settings
        self.module = import_task(settings.task) if settings.task else None
        self.origin = (getattr(self.module, "__file__", None) or settings.task) if self.module else None
        self.loaded: dict[tuple[Path | None, bool], tuple[data.Samples, tuple[str, ...] | None]] = {}

    @functools.cached_property
    def compute(self) -> Compute:
        """The device and precision this party computes in (DeviceError for a device not here)."""
        return Compute.of(self.settings)

    def defines(self, function: str) -> bool:
        return self.module is not None and callable(getattr(self.module, function, None))

    @property
    def own_data(self) -> bool:
        """Each party reads data of its own (the task's, local files, or a folder per party),
        rather than its share of one data set that --partition shares out."""
        return self.defines("data") or self.settings.dataset in LOCAL_FORMATS or has_placeholders(self.settings.data_dir)

    def check_partition(self) -> None:
        """--partition shares out one data set; with data of each party's own it is refused."""
        partition = getattr(self.settings, "partition", None)
        default = next((field.default for field in dataclasses.fields(self.settings) if field.name == "partition"), None)
        if self.own_data and partition != default:
            raise TaskError(f"--partition {partition}: each party reads its own data here ({self._data_source()}); --partition shares out one data set among them")

    def training_share(self, context: Context) -> data.Samples:
        """This party's training samples: its own, or its share of the one data set."""
        self.check_partition()
        samples = self._load(context, train=True)[0]
        if not self.own_data:
            samples = data.share_of(samples, self.settings.partition, context.parties, context.seed, context.index)
        return self._placed(samples)

    def _data_source(self) -> str:
        if self.defines("data"):
            return f"{self.origin}'s data()"
        if self.settings.dataset in LOCAL_FORMATS:
            return f"--dataset {self.settings.dataset}"
        return f"--data-dir {self.settings.data_dir}"

    # -- data -----------------------------------------------------------------------------

    def data(self, context: Context, train: bool) -> data.Samples:
        """This party's training or test samples (--limit / --test-limit applied), their batches
        taken to the device (the whole set moved there with --data-on-device)."""
        return self._placed(self._load(context, train)[0])

    def _placed(self, samples: data.Samples) -> data.Samples:
        return samples.on(self.compute.device, whole=self.settings.data_on_device)

    def _load(self, context: Context, train: bool) -> tuple[data.Samples, tuple[str, ...] | None]:
        key = (context.data_dir, train)
        if key not in self.loaded:
            self.loaded[key] = self._read(context, train)
        return self.loaded[key]

    def _read(self, context: Context, train: bool) -> tuple[data.Samples, tuple[str, ...] | None]:
        limit = self.settings.limit if train else self.settings.test_limit
        if self.defines("data"):
            samples, names = self._user_data(context, train), None
        elif self.settings.dataset in LOCAL_FORMATS:
            if context.data_dir is None:
                raise DataError(f"--dataset {self.settings.dataset} reads {context.party}'s own files: give it --data-dir")
            loaded = local_data.load_local(self.settings.dataset, context.data_dir, train, self.local_options())
            samples, names = loaded.samples, loaded.classes
        else:
            return data.load(self.settings.dataset, train=train, data_dir=context.data_dir, limit=limit), None
        if limit is not None:
            samples = samples.subset(slice(0, limit))
        return samples, names

    def local_options(self) -> local_data.LocalOptions:
        s = self.settings
        return local_data.LocalOptions(
            label_column=s.label_column, classes=self.named_classes(),
            image_size=tuple(int(side) for side in s.image_size.split(",")) if s.image_size else None,
            mean=_floats(s.mean, "--mean"), std=_floats(s.std, "--std"),
        )

    def _user_data(self, context: Context, train: bool) -> data.Samples:
        where = f"{self.origin}: data(context, train={train})"
        result = self._call("data", context, train)
        if isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(part, torch.Tensor) for part in result):
            inputs, labels = result
        elif hasattr(result, "__getitem__") and hasattr(result, "__len__") and not isinstance(result, (str, bytes, dict)):
            inputs, labels = _stacked(result, where)
        else:
            raise TaskError(f"{where} returned {type(result).__name__}; return a Dataset of (input, label) pairs or a pair of tensors (inputs, labels)")
        if len(inputs) != len(labels):
            raise TaskError(f"{where} returned {len(inputs)} inputs and {len(labels)} labels")
        if len(labels) == 0:
            raise TaskError(f"{where} returned no samples")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dim() != 1:
            raise TaskError(f"{where} returned labels of {labels.dtype} {tuple(labels.shape)}; labels are class indices: integers, one per sample")
        if not inputs.dtype.is_floating_point:
            inputs = inputs.to(torch.float32)
        if int(labels.min()) < 0:
            raise TaskError(f"{where} returned the label {int(labels.min())}; labels are class indices from 0")
        return data.Samples(inputs, labels.to(torch.int64))

    # -- classes and shape ----------------------------------------------------------------

    def named_classes(self) -> tuple[str, ...] | None:
        """The class list the settings or the task give, if either does."""
        if self.settings.classes:
            return tuple(name.strip() for name in self.settings.classes.split(","))
        if self.module is not None and getattr(self.module, "classes", None) is not None:
            return tuple(str(name) for name in self.module.classes)
        return None

    def shares_built_in_set(self) -> bool:
        """The parties share one built-in data set out, whose shape and classes are declared."""
        return not self.own_data and self.settings.dataset in DATASETS

    def declared_classes(self) -> tuple[str, ...] | None:
        """The class list as far as it is known without reading data: the settings', the task's,
        or a built-in data set's."""
        if named := self.named_classes():
            return named
        if self.shares_built_in_set():
            return tuple(str(label) for label in range(DATASETS[self.settings.dataset].classes))
        return None

    def declared_shape(self) -> tuple[int, ...] | None:
        """One sample's shape as far as it is known without reading data: a built-in data set's,
        or the task's input_shape."""
        if self.shares_built_in_set():
            return DATASETS[self.settings.dataset].shape
        declared = getattr(self.module, "input_shape", None) if self.module is not None else None
        return tuple(int(side) for side in declared) if declared is not None else None

    def classes(self, context: Context) -> tuple[str, ...]:
        """The class names, in label order, as this party sees them."""
        if declared := self.declared_classes():
            return declared
        samples, names = self._load(context, True)
        return names or tuple(str(label) for label in range(int(samples.labels.max()) + 1))

    def data_shape(self, context: Context) -> DataShape:
        """What a built-in model is built for: the data set's, or this party's data's."""
        if self.shares_built_in_set():
            return DATASETS[self.settings.dataset]
        shape, classes = self.declared_shape(), self.declared_classes()
        if shape is not None and classes is not None:
            return DataShape(self.settings.dataset, shape, len(classes))
        if context.data_dir is None and not self.defines("data"):
            raise TaskError(f"--model {self.settings.model} is built for the data's shape, and {context.party} has no --data-dir to read it from: "
                            "give it the data, or a --task whose model(context) builds the model")
        samples = self.data(context, True)
        return DataShape(self.settings.dataset, tuple(samples.images.shape[1:]), len(self.classes(context)))

    # -- the model ------------------------------------------------------------------------

    def model(self, context: Context) -> nn.Module:
        """The whole model, initialised from the run's seed (every party builds the same one), on the device."""
        return self._built(context).to(self.compute.device)

    def _built(self, context: Context) -> nn.Module:
        """The whole model, on the CPU where it is initialised (so the device never changes its values)."""
        if not self.defines("model"):
            return models.build(self.settings.model, self.data_shape(context), context.seed)
        torch.manual_seed(context.seed)
        model = self._call("model", context)
        if not isinstance(model, nn.Module):
            raise TaskError(f"{self.origin}: model(context) returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def loss(self, context: Context) -> train.Loss:
        """The loss every party trains and scores with: the task's, or cross-entropy."""
        if not self.defines("loss"):
            return train.loss_fn
        loss_of = self._call("loss", context)
        if not callable(loss_of):
            raise TaskError(f"{self.origin}: loss(context) returned {type(loss_of).__name__}; return a function (logits, labels) -> the batch's mean loss")
        return loss_of

    def sequential(self, context: Context) -> nn.Sequential:
        """The model as an `nn.Sequential`, for a cut: as it is, or its children in order when
        its forward is exactly that (checked on a probe of the data's shape)."""
        model = self._built(context)
        if not isinstance(model, nn.Sequential):
            try:
                model = vision.sequential_of(model, self.data_shape(context).shape, name=f"{self.origin}'s model()")
            except ValueError as exc:
                raise TaskError(str(exc)) from None
        return model.to(self.compute.device)

    def _call(self, function: str, context: Context, *args: Any) -> Any:
        """The task's `function`, told the device this party computes on."""
        try:
            return getattr(self.module, function)(dataclasses.replace(context, device=str(self.compute.device)), *args)
        except (TaskError, DataError):
            raise
        except Exception as exc:  # noqa: BLE001 (whatever the user's code raises, one line names it)
            raise TaskError(f"{self.origin}: {function}() raised {_error(exc)}") from None


def preflight(parties: list[tuple[ModelSettings, Context]]) -> None:
    """Each party's task loaded, its data read and its model tried on it, and the parties' class
    lists compared: what would fail in a party fails here, in one line, before any party starts.
    A party with no data of its own to read (a server given none) is left out. A built-in data set
    is not read here (its shape and classes are declared; each party reads it, and says what is
    missing, before it joins anyone): the model is tried on zeros of its shape, once."""
    first: tuple[Context, tuple[str, ...]] | None = None
    shared_checked = False
    for settings, context in parties:
        task = Task(settings)
        task.check_partition()
        if task.own_data and context.data_dir is None and not task.defines("data"):
            continue
        if not task.own_data and shared_checked:
            continue
        shared_checked = shared_checked or not task.own_data
        if task.shares_built_in_set():
            samples = data.Samples(torch.zeros(2, *task.declared_shape()), torch.zeros(2, dtype=torch.int64), task.compute.device)
        else:
            samples = task.data(context, train=True)
            task.data(context, train=False)
        classes = task.classes(context)
        if first is None:
            check_model_takes_data(task, task.model(context), samples, len(classes), task.loss(context))
            first = (context, classes)
        elif classes != first[1]:
            raise TaskError(f"{context.party}'s classes {_listed(list(classes))} differ from {first[0].party}'s {_listed(list(first[1]))}: "
                            "give every party the same --classes (or classes in the task)")


def check_model_takes_data(task: Task, model: nn.Module, samples: data.Samples, classes: int, loss_of: train.Loss = train.loss_fn) -> None:
    """A model that cannot take the data, gives the wrong number of outputs, or a loss that
    cannot be learned from, fails now with one line, not in the first batch of training."""
    probe, labels = samples.batch(slice(0, 2))
    who = f"{task.origin}'s model()" if task.defines("model") else f"--model {task.settings.model}"
    try:
        with models.evaluating(model):
            logits = model(probe)
    except Exception as exc:  # noqa: BLE001 (one line names it)
        raise TaskError(f"{who} does not take the data's inputs {tuple(probe.shape)}: {_error(exc)}") from None
    if not isinstance(logits, torch.Tensor) or logits.shape != (len(probe), classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TaskError(f"{who} gives {shape} for inputs {tuple(probe.shape)}; it must give ({len(probe)}, {classes}): one logit per class")
    if task.defines("loss"):
        logits = logits.detach().requires_grad_()
        try:
            value = loss_of(logits, labels)
        except Exception as exc:  # noqa: BLE001 (one line names it)
            raise TaskError(f"{task.origin}: the function loss(context) returns raised {_error(exc)}") from None
        if not isinstance(value, torch.Tensor) or value.dim() != 0 or not value.requires_grad or not torch.isfinite(value):
            raise TaskError(f"{task.origin}: the function loss(context) returns gave {value!r:.80}; it must give the batch's loss as a finite scalar tensor, "
                            "computed from the logits (so that it has a gradient)")


def fingerprint(model: nn.Module, classes: tuple[str, ...]) -> dict[str, Any]:
    """What the parties compare when they meet: the model's tensors (names, shapes, dtypes) and the
    class list. Small and free of values, so it reveals nothing of the data or the weights."""
    tensors = [f"{name}:{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}" for name, value in model.state_dict().items()]
    return {
        "model": hashlib.sha256("\n".join(tensors).encode()).hexdigest()[:16],
        "tensors": len(tensors),
        "parameters": sum(value.numel() for value in model.state_dict().values()),
        "classes": list(classes),
    }


def fingerprint_difference(mine: dict[str, Any], theirs: Any) -> str | None:
    """None if `theirs` agrees with `mine`, else one line saying how they differ."""
    if not isinstance(theirs, dict) or set(theirs) != set(mine):
        return "it sent no fingerprint of its model and classes (an older splitfed, or not a party of this run)"
    problems = []
    if theirs["model"] != mine["model"]:
        problems.append(f"model {theirs['model']} ({theirs['tensors']} tensors, {theirs['parameters']} values) against {mine['model']} "
                        f"({mine['tensors']} tensors, {mine['parameters']} values)")
    if theirs["classes"] != mine["classes"]:
        problems.append(f"classes {_listed(theirs['classes'])} against {_listed(mine['classes'])}")
    return "; ".join(problems) or None


def _listed(classes: Any) -> str:
    names = [str(name) for name in classes] if isinstance(classes, list) else [repr(classes)]
    return "[" + ", ".join(names[:12]) + (f", ... {len(names)} in all" if len(names) > 12 else "") + "]"


def _stacked(dataset: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, labels = [], []
    for position in range(len(dataset)):
        item = dataset[position]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TaskError(f"{where}: item {position} is {type(item).__name__}, not an (input, label) pair")
        x, y = item
        if not isinstance(x, torch.Tensor):
            raise TaskError(f"{where}: item {position}'s input is {type(x).__name__}, not a tensor")
        inputs.append(x)
        labels.append(int(y) if isinstance(y, int) or (isinstance(y, torch.Tensor) and y.numel() == 1 and not y.dtype.is_floating_point)
                      else _bad_label(where, position, y))
    try:
        return torch.stack(inputs), torch.tensor(labels, dtype=torch.int64)
    except RuntimeError as exc:
        raise TaskError(f"{where}: its inputs differ in shape ({_error(exc)})") from None


def _bad_label(where: str, position: int, label: Any) -> int:
    raise TaskError(f"{where}: item {position}'s label is {label!r}; a label is a class index (an int)")


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(value) for value in text.split(","))
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give numbers, comma-separated") from None
