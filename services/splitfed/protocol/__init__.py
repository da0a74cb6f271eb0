"""Typed messages and their wire encoding: a small JSON header plus a safetensors body.

Never pickle, never torch.load: decoding only parses JSON and safetensors, and checks every field.
"""

from splitfed.protocol.codec import (
    MAX_MESSAGE_BYTES,
    Message,
    ProtocolError,
    TensorSpec,
    body_digest,
    decode,
    decode_header,
    decode_tensors,
    decode_with_body,
    encode,
    encode_body,
    check_tensors,
    signed_bytes,
    signed_header,
)

__all__ = ["MAX_MESSAGE_BYTES", "Message", "ProtocolError", "TensorSpec", "body_digest", "decode", "decode_header", "decode_tensors", "decode_with_body", "encode", "encode_body", "check_tensors", "signed_bytes", "signed_header"]
