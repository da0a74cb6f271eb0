"""How large a frame can be, from the tensors it carries: the arithmetic behind each role's
message-size limit (`Endpoint(max_message_bytes=...)`). Every role declares the largest message it
can legitimately receive, worked out from its settings and its model where it builds its endpoint,
and its transport refuses anything larger at the first chunk (a chunked message announcing more
chunks than that) or as a whole frame. Torch-free: the relay, the split-fed and the tracker use it too.

A frame is the magic, the header's length and the JSON header (at most MAX_HEADER_BYTES, whatever
its metadata), then a safetensors body: its header's length, a JSON entry per tensor (name, dtype,
shape, offsets), padding, and the tensors' bytes. The bound below allows each part at its largest,
so a message of metadata alone (a hello, a heartbeat) takes at most FRAME_HEADER_BYTES."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from splitfed.protocol.codec import ALLOWED_DTYPES, MAGIC, MAX_HEADER_BYTES, MAX_MESSAGE_BYTES, TensorSpec

FRAME_HEADER_BYTES = len(MAGIC) + 4 + MAX_HEADER_BYTES  # magic, the header's length, the header at its largest
BODY_HEADER_BYTES = 8 + 2 + 7  # the safetensors header's length, its braces and its padding to 8 bytes
TENSOR_ENTRY_BYTES = 64  # a tensor's entry beside its name and numbers: quotes, keys, punctuation, dtype
NUMBER_BYTES = 21  # a number in an entry (a side, an offset): at most 20 digits and a comma


def message_bytes(tensors: Mapping[str, TensorSpec]) -> int:
    """The largest frame of a message carrying `tensors` (every side known) beside any metadata."""
    if not tensors:
        return FRAME_HEADER_BYTES  # encode_body({}) is empty
    return FRAME_HEADER_BYTES + BODY_HEADER_BYTES + sum(
        len(name.encode()) + TENSOR_ENTRY_BYTES + NUMBER_BYTES * (len(spec.shape) + 2) + np.dtype(spec.dtype).itemsize * math.prod(spec.shape)
        for name, spec in tensors.items()
    )


STATED_RANGE = f"{FRAME_HEADER_BYTES}..{MAX_MESSAGE_BYTES}"  # what a stated size may be, as a refusal says it


def stated_bytes(value: object) -> int | None:
    """A size in bytes that a party states in a hello (the largest message a split half accepts),
    if it is one a frame can have; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and FRAME_HEADER_BYTES <= value <= MAX_MESSAGE_BYTES:
        return value
    return None


MAX_STATED_TENSORS = 4096  # more tensors than any model's part has: a hello's metadata stays small
MAX_STATED_DIMS = 8


def layout_meta(tensors: Mapping[str, TensorSpec]) -> dict[str, list]:
    """Tensors' names, dtypes and shapes (every side known) as a hello states them: name -> [dtype, shape]."""
    return {name: [spec.dtype, list(spec.shape)] for name, spec in tensors.items()}


def stated_layout(value: object) -> dict[str, TensorSpec] | None:
    """The tensors a hello states (`layout_meta`), if every entry is one a frame can carry and a
    message of them fits in a frame; None for anything else."""
    if not isinstance(value, dict) or not 1 <= len(value) <= MAX_STATED_TENSORS:
        return None
    layout = {}
    for name, entry in value.items():
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in ALLOWED_DTYPES and isinstance(entry[1], list)
                and len(entry[1]) <= MAX_STATED_DIMS and all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in entry[1])):
            return None
        layout[name] = TensorSpec(entry[0], tuple(entry[1]))
    return layout if stated_bytes(message_bytes(layout)) is not None else None
