"""Frame layout: b"SF1" + version byte, u32 big-endian header length, JSON header, safetensors body.

The header carries kind, session, sender, seq, round and JSON metadata; tensors travel in the
body as numpy arrays (torch-free, so the relay and tracker stay small). A signature, when
present, covers the header without its `sig` field followed by the body's SHA-256; a signed
frame also states that digest in its header (`digest`, outside what is signed), so a receiver can
check the signature from the first chunk of a large frame, before it holds the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

MAGIC = b"SF1\x01"
MAX_MESSAGE_BYTES = 2 * 1024**3
MAX_HEADER_BYTES = 64 * 1024
# uint16 carries bfloat16 (numpy has no such dtype): its 16 bits, checked for finiteness as bfloat16
ALLOWED_DTYPES = {"float32", "float64", "float16", "int64", "int32", "uint32", "uint8", "uint16", "bool"}  # uint32: secure aggregation's field
FLOAT_KINDS = "f"
BFLOAT16_EXPONENT = np.uint16(0x7F80)  # all ones: infinity or NaN


class ProtocolError(ValueError):
    """A message that must be rejected; `reason` is the metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Message:
    kind: str
    session: str
    sender: str
    seq: int = 0
    round: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    sig: str | None = None
    digest: str | None = None  # hex SHA-256 of the body, as the frame states it (signed frames)

    def header(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "session": self.session,
            "sender": self.sender,
            "seq": self.seq,
            "round": self.round,
            "meta": self.meta,
        }


def body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def signed_bytes(message: Message, body: bytes) -> bytes:
    """What a signature covers: the canonical header (without `sig`) and the body's SHA-256."""
    return signed_header(message, body_digest(body))


def signed_header(message: Message, digest: bytes) -> bytes:
    """`signed_bytes` for a body known only by its digest (a frame whose first chunk is here)."""
    return json.dumps(message.header(), sort_keys=True, separators=(",", ":")).encode() + digest


def encode_body(tensors: dict[str, np.ndarray]) -> bytes:
    return st_save({name: np.ascontiguousarray(array) for name, array in tensors.items()}) if tensors else b""


def encode(message: Message, body: bytes | None = None, digest: bytes | None = None) -> bytes:
    """Frame `message`; pass `body` (and its `digest`) when they were already made, to sign it."""
    if body is None:
        body = encode_body(message.tensors)
    header = message.header()
    if message.sig is not None:
        header["sig"] = message.sig
        header["digest"] = (digest or body_digest(body)).hex()
    raw_header = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return MAGIC + struct.pack(">I", len(raw_header)) + raw_header + body


_HEADER_TYPES = {"kind": str, "session": str, "sender": str, "seq": int, "round": int, "meta": dict}


def split_frame(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[dict[str, Any], bytes]:
    """Check the framing and header fields; return (header, body) without touching tensors.
    `frame` may be a frame's first part only: then the body returned is as much as is there."""
    if len(frame) > max_bytes:
        raise ProtocolError("oversized", f"{len(frame)} bytes > limit {max_bytes}")
    if len(frame) < 8 or frame[:4] != MAGIC:
        raise ProtocolError("malformed", "not a splitfed frame (bad magic)")
    (header_len,) = struct.unpack(">I", frame[4:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(frame):
        raise ProtocolError("malformed", f"header length {header_len} does not fit the frame")
    try:
        header = json.loads(frame[8 : 8 + header_len], parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: "[[[[..." nested past the stack
        raise ProtocolError("malformed", f"header is not JSON: {exc!r:.200}") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header is not an object")
    for name, kind in _HEADER_TYPES.items():
        value = header.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProtocolError("malformed", f"header field {name!r} missing or not {kind.__name__}")
    for name in ("sig", "digest"):
        if name in header and not isinstance(header[name], str):
            raise ProtocolError("malformed", f"header field {name!r} is not a string")
    return header, frame[8 + header_len :]


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def decode(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Parse and structurally validate a frame. Semantic checks (session, sender, shapes) follow
    in `check_tensors` and in the receiving role, which knows what it expects."""
    return decode_with_body(frame, max_bytes)[0]


def decode_with_body(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[Message, bytes]:
    """`decode`, also returning the raw body (what a signature check needs)."""
    message, body = decode_header(frame, max_bytes)
    message.tensors = decode_tensors(body)
    return message, body


def decode_header(frame: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[Message, bytes]:
    """The message without its tensors, and the raw body: all a signature check needs, so a
    receiver can refuse an unsigned frame before it spends anything on the body."""
    header, body = split_frame(frame, max_bytes)
    for value in header["meta"].values():
        if isinstance(value, float) and not math.isfinite(value):
            raise ProtocolError("nonfinite", "metadata holds NaN or Inf")
    message = Message(
        kind=header["kind"],
        session=header["session"],
        sender=header["sender"],
        seq=header["seq"],
        round=header["round"],
        meta=header["meta"],
        sig=header.get("sig"),
        digest=header.get("digest"),
    )
    return message, body


def decode_tensors(body: bytes) -> dict[str, np.ndarray]:
    """The tensors of a body, each of an allowed dtype and, if floating, finite."""
    tensors: dict[str, np.ndarray] = {}
    if body:
        try:
            tensors = st_load(body)
        except Exception as exc:  # safetensors raises its own error type for every malformed body
            raise ProtocolError("malformed", f"body is not valid safetensors: {exc}") from None
    for name, array in tensors.items():
        if array.dtype.name not in ALLOWED_DTYPES:
            raise ProtocolError("dtype", f"tensor {name!r} has dtype {array.dtype.name}")
        finite = np.isfinite(array).all() if array.dtype.kind in FLOAT_KINDS else array.dtype != np.uint16 or not ((array & BFLOAT16_EXPONENT) == BFLOAT16_EXPONENT).any()
        if not finite:
            raise ProtocolError("nonfinite", f"tensor {name!r} holds NaN or Inf")
    return tensors


@dataclass(frozen=True)
class TensorSpec:
    """Expected dtype and shape; `None` in the shape matches any size (the batch dimension)."""

    dtype: str
    shape: tuple[int | None, ...]

    def check(self, name: str, array: np.ndarray) -> None:
        if array.dtype.name != self.dtype:
            raise ProtocolError("dtype", f"tensor {name!r} is {array.dtype.name}, expected {self.dtype}")
        if len(array.shape) != len(self.shape) or any(
            want is not None and want != got for want, got in zip(self.shape, array.shape)
        ):
            raise ProtocolError("shape", f"tensor {name!r} has shape {array.shape}, expected {self.shape}")


def check_tensors(message: Message, specs: dict[str, TensorSpec]) -> None:
    """Exactly the named tensors, each with its dtype and shape, and one common batch size."""
    if set(message.tensors) != set(specs):
        raise ProtocolError("shape", f"{message.kind} carries tensors {sorted(message.tensors)}, expected {sorted(specs)}")
    batch_sizes = set()
    for name, spec in specs.items():
        spec.check(name, message.tensors[name])
        if spec.shape and spec.shape[0] is None:
            batch_sizes.add(message.tensors[name].shape[0])
    if len(batch_sizes) > 1 or 0 in batch_sizes:
        raise ProtocolError("shape", f"{message.kind} has inconsistent or empty batch sizes {sorted(batch_sizes)}")
