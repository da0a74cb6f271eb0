"""Sizes read with torch: the model a task builds (--task, or a torchvision --model) as the `Layer`s
that shapes.py's walk gives the built-in models, and what a party's own data holds. `estimators`
imports this module only for such settings (`estimators.reads_with_torch`): sizing the built-in models on
the built-in data sets stays torch-free.

The model is built as the role's first party builds it (worker-0, split-client or split-client-0,
p2p-peer-0, a server itself; the relay and the split-fed take the first client's) and probed with
one sample of the data's shape, in eval mode and without autograd: an `nn.Sequential` child by
child, any other model as one layer, or, for a split role, as `Task.sequential`'s children, cut as
`learning.cutting.cut` cuts them. A layer's activations are the outputs of the modules it runs (a
block's inner modules included); tensors a forward makes with functions (F.relu, x + y) are not
seen, so a model whose forward does much of that is sized low.

The party's own data is read as the role reads it (the parts it keeps), its sizes taken and the
data dropped before the next part is read. Whatever cannot be read, built or probed here is
`NotSized`, with the reason in one line; settings a run would refuse stay ValueErrors.
"""

from __future__ import annotations

import dataclasses

from dataclasses import fields

import torch
from torch import nn

from splitfed import config
from splitfed.errors import DataError, TaskError
from splitfed.learning import cutting, models, vision
from splitfed.learning.context import Context
from splitfed.learning.data import Images, Samples
from splitfed.learning.settings import LOCAL_FORMATS, MODELS, ModelSettings, SplitSettings, worker_ids
from splitfed.learning.tasks import Task
from splitfed.roles.registry import ROLES
from splitfed.sizing.measured import OWN_DATA_READ_BYTES, TASK_DATA_READ_COPIES
from splitfed.sizing.shapes import CannotSplit, Layer, NotSized, OwnData, Sized

# The parts of its own data each role reads and keeps (train, test); the others read none.
OWN_DATA_PARTS = {
    "fedavg-worker": (True, False), "fedavg-server": (False, True), "split-client": (True, True), "p2p-peer": (True, True),
    "smpl-peer": (True, True),
}
FIRST_SPLIT_CLIENT = "split-client"  # whose model the relay and the split-fed are sized from: they build none
FIRST_REPLICA = {"session": "size", "worker_id": worker_ids(1)[0], "index": 0}  # deployment fields the first replica has; the rest default

MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
# In eval mode dropout hands its input on; in training it makes an output (and a mask) of its own.
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def size_task(role: str, settings: ModelSettings) -> Sized:
    """What `role`'s estimate needs of `settings`' task: its model as layers (and its cut, for a
    split role) and its party's own data. NotSized for what cannot be read, built or probed;
    CannotSplit for a model a split run could not cut; ValueError for an unknown --model."""
    context = first_party(role, settings)
    try:
        task = Task(dataclasses.replace(settings, device="cpu"))  # measured on the CPU: the sizes are the same on any device
    except TaskError as exc:
        raise NotSized(str(exc)) from None
    if not task.defines("model") and settings.model not in MODELS and settings.model not in vision.names():
        # bad input, as in a run (vision.names: ValueError without torchvision, as there)
        raise ValueError(f"--model {settings.model!r}: choose {', '.join(MODELS)} or a torchvision classification model (splitfed models lists them)")
    split = isinstance(settings, SplitSettings)
    who = f"{task.origin}'s model()" if task.defines("model") else f"--model {settings.model}"
    try:
        task.check_partition()
        model = task.model(context)
        shape = tuple(task.data_shape(context).shape)
        own = _own_data(task, context, role, settings) if task.own_data else None
    except (TaskError, DataError) as exc:
        raise NotSized(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 (a built-in model that cannot take the data's shape, say: one line, not a trace)
        raise NotSized(f"{who} on {context.party}'s data: {_error(exc)}") from None
    if split and not isinstance(model, nn.Sequential):
        try:
            model = task.sequential(context)
        except TaskError as exc:
            raise CannotSplit(str(exc)) from None
    layers, notes = layers_of(model, shape, who)
    cut = _cut(model, settings) if split else None
    return Sized(shape, tuple(layers), own, cut, notes)


def first_party(role: str, settings: ModelSettings) -> Context:
    """The context the role's first replica is given (`RoleSpec.context`); for the relay and the
    split-fed, which build no model, the first split client's."""
    owner = ROLES[role] if ROLES[role].reads_data else ROLES[FIRST_SPLIT_CLIENT]
    learning = settings
    if not isinstance(settings, owner.learning):  # the relay's split session: one client
        given = {field.name: getattr(settings, field.name) for field in fields(settings)}
        learning = owner.learning(**{field.name: given[field.name] for field in fields(owner.learning) if field.name in given})
    return owner.context(learning, config.build(owner.deployment, FIRST_REPLICA))


def _own_data(task: Task, context: Context, role: str, settings: ModelSettings) -> OwnData:
    """The sizes of the parts of its own data the role keeps, each read, measured and dropped."""
    reads_train, reads_test = OWN_DATA_PARTS.get(role, (False, False))
    if role == "fedavg-server" and getattr(settings, "holdout", 0):  # it scores the model on its held-out training samples
        reads_train, reads_test = True, False
    counts: dict[bool, int | None] = {True: None, False: None}
    held = read = 0.0
    source = "task" if task.defines("data") else settings.dataset  # until a part read says more (npz: pixels or features)
    for train, reads in ((True, reads_train), (False, reads_test)):
        if not reads:
            continue
        samples = task.data(context, train)
        source = _source(task, settings, samples)
        counts[train] = len(samples)  # --limit applied: what the role uses
        kept = _stored_bytes(samples)  # all that was read: --limit keeps a view of it
        held += kept
        read += kept * TASK_DATA_READ_COPIES if source in ("task", "files") else _values(samples) * OWN_DATA_READ_BYTES[source]
        del samples
        task.loaded.clear()  # the Task keeps what it read for the party's next call: sizing needs only its sizes
    task.loaded.clear()
    return OwnData(source, counts[True], counts[False], held, read)


def _source(task: Task, settings: ModelSettings, samples: Samples) -> str:
    """How the party's own data is read: a key of OWN_DATA_READ_BYTES, task (its data()), or files
    (a built-in data set's files in a folder of the party's own)."""
    if task.defines("data"):
        return "task"
    if settings.dataset == "npz":
        return "npz pixels" if isinstance(samples.images, Images) else "npz features"
    return settings.dataset if settings.dataset in LOCAL_FORMATS else "files"


def _stored_bytes(samples: Samples) -> float:
    inputs = samples.images.raw if isinstance(samples.images, Images) else samples.images
    return float(inputs.untyped_storage().nbytes() + samples.labels.untyped_storage().nbytes())


def _values(samples: Samples) -> int:
    inputs = samples.images.raw if isinstance(samples.images, Images) else samples.images
    return inputs.untyped_storage().nbytes() // inputs.element_size()


# -- the model as layers ------------------------------------------------------------------------


def layers_of(model: nn.Module, shape: tuple[int, ...], who: str) -> tuple[list[Layer], tuple[str, ...]]:
    """`model` as the layers the walk gives: an `nn.Sequential` child by child, any other module as
    one layer, each from a probe of one sample. NotSized if a probe fails."""
    children = list(model) if isinstance(model, nn.Sequential) else [model]
    if not children:
        raise NotSized(f"{who} has no layers")
    layers, seen = [], set()
    x = torch.zeros(1, *shape)
    with models.evaluating(model):
        for index, child in enumerate(children):
            try:
                x, layer = _probe(child, x, seen)
            except NotSized:
                raise
            except Exception as exc:  # noqa: BLE001 (whatever the user's forward raises: one line names it)
                raise NotSized(f"{who}: layer {index} ({type(child).__name__}) cannot be probed with one sample of shape {shape}: {_error(exc)}") from None
            layers.append(layer)
    blocks = [layer.kind for layer, child in zip(layers, children) if any(True for _ in child.children())]
    notes = ((f"{who}: the activations of {', '.join(sorted(set(blocks)))} are the outputs of the modules inside; what a forward computes "
              "with functions (F.relu, x + y) is not counted"),) if blocks else ()
    return layers, notes


def _probe(child: nn.Module, x: torch.Tensor, seen: set[int]) -> tuple[torch.Tensor, Layer]:
    """`child`'s output for `x` (one sample), and `child` as a Layer: its parameters (those no
    earlier layer holds), its output shape, the floats its modules output, the indices its max
    pools keep."""
    leaves = [module for module in child.modules() if not any(True for _ in module.children())]
    made: list[torch.Tensor] = []
    floats = int64s = 0

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal floats, int64s
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if not isinstance(out, torch.Tensor):
                continue
            made.append(out)
            if isinstance(module, DROPOUTS) or not _shares_memory(out, inputs):
                floats += out.numel()
            if isinstance(module, MAX_POOLS):
                int64s += out.numel()

    handles = [leaf.register_forward_hook(record) for leaf in leaves]
    try:
        out = child(x)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or len(out) != 1:
        described = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NotSized(f"{type(child).__name__} gives {described} for one sample; sizing follows one tensor of (1, ...) through the layers")
    if not any(out is output for output in made) and not _shares_memory(out, (x,)):
        floats += out.numel()  # made by the forward itself, not by a module inside it
    params = 0
    for parameter in child.parameters():
        if id(parameter) not in seen:  # a parameter shared between layers is held once
            seen.add(id(parameter))
            params += parameter.numel()
    return out, Layer(type(child).__name__, params, tuple(out.shape[1:]), floats, int64s)


def _shares_memory(out: torch.Tensor, inputs: tuple) -> bool:
    """Whether `out` is a view of an input (a flatten, an in-place activation): no memory of its own."""
    pointer = out.untyped_storage().data_ptr()
    return any(isinstance(given, torch.Tensor) and given.untyped_storage().data_ptr() == pointer for given in inputs)


def _cut(model: nn.Sequential, settings: SplitSettings) -> tuple[int, int]:
    """Where `learning.cutting.cut` cuts the model: the head's end and the tail's start."""
    try:
        parts = cutting.cut(model, settings.cut_layer, settings.mode)
    except ValueError as exc:
        raise CannotSplit(str(exc)) from None
    return parts.cut_layer, parts.tail_start


def _error(exc: BaseException) -> str:
    message = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__

