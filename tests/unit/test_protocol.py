import json
import struct

import numpy as np
import pytest

from splitfed.protocol import Message, ProtocolError, TensorSpec, check_tensors, decode, encode
from splitfed.protocol.codec import MAGIC


def message(**tensors) -> Message:
    return Message("activations", "s1", "split-client", seq=3, meta={"train": True}, tensors=tensors)


def reason(frame: bytes, **kwargs) -> str:
    with pytest.raises(ProtocolError) as caught:
        decode(frame, **kwargs)
    return caught.value.reason


def test_round_trip_keeps_header_and_tensors_exactly():
    x = np.random.default_rng(0).standard_normal((4, 3, 2)).astype(np.float32)
    y = np.arange(4, dtype=np.int64)
    decoded = decode(encode(message(x=x, y=y)))
    assert (decoded.kind, decoded.session, decoded.sender, decoded.seq, decoded.meta) == ("activations", "s1", "split-client", 3, {"train": True})
    assert np.array_equal(decoded.tensors["x"], x) and decoded.tensors["x"].dtype == np.float32
    assert np.array_equal(decoded.tensors["y"], y)


def test_message_without_tensors_has_an_empty_body():
    frame = encode(Message("done", "s1", "split-server", seq=1))
    assert decode(frame).tensors == {}


@pytest.mark.parametrize(
    "frame",
    [b"", b"\x80\x04\x95garbage-pickle", b"SF1\x01" + struct.pack(">I", 10**6) + b"{}", MAGIC + struct.pack(">I", 3) + b"[1]", MAGIC + struct.pack(">I", 4) + b"nope"],
)
def test_garbage_is_malformed(frame):
    assert reason(frame) == "malformed"


def test_truncated_body_is_malformed():
    frame = encode(message(x=np.ones((8, 8), np.float32)))
    assert reason(frame[:-10]) == "malformed"


def test_missing_header_field_is_malformed():
    header = json.dumps({"kind": "x", "session": "s", "sender": "a", "seq": "1", "round": 0, "meta": {}}).encode()
    assert reason(MAGIC + struct.pack(">I", len(header)) + header) == "malformed"


def test_oversized_frame_is_refused_before_parsing():
    frame = encode(message(x=np.ones(1000, np.float32)))
    assert reason(frame, max_bytes=100) == "oversized"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_values_are_refused(bad):
    x = np.ones((2, 2), np.float32)
    x[1, 1] = bad
    assert reason(encode(message(x=x))) == "nonfinite"


def test_dtype_outside_the_whitelist_is_refused():
    assert reason(encode(message(x=np.ones(3, np.int16)))) == "dtype"


def test_check_tensors_enforces_names_dtypes_shapes_and_one_batch_size():
    specs = {"x": TensorSpec("float32", (None, 3)), "y": TensorSpec("int64", (None,))}
    check_tensors(message(x=np.ones((2, 3), np.float32), y=np.zeros(2, np.int64)), specs)
    cases = {
        "shape": [message(x=np.ones((2, 4), np.float32), y=np.zeros(2, np.int64)), message(x=np.ones((2, 3), np.float32)),
                  message(x=np.ones((2, 3), np.float32), y=np.zeros(3, np.int64))],
        "dtype": [message(x=np.ones((2, 3), np.float64), y=np.zeros(2, np.int64))],
    }
    for expected, messages in cases.items():
        for bad in messages:
            with pytest.raises(ProtocolError) as caught:
                check_tensors(bad, specs)
            assert caught.value.reason == expected


def test_relay_and_cli_do_not_import_torch():
    """The relay's image carries no torch; importing its code path must not need it."""
    import subprocess
    import sys

    code = "import sys, splitfed.cli, splitfed.roles.split.relay, splitfed.roles.registry, splitfed.scenarios.registry, splitfed.transport.rabbitmq; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_the_relay_command_reports_bad_input_without_torch():
    """As in the relay's image, where importing torch fails: a bad value still gets its one-line
    error (the CLI's error types are torch-free), not a ModuleNotFoundError."""
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; from splitfed.cli import app; app(['serve', 'relay', '--session', 's', '--timeout', 'nan'])"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert "error:" in run.stderr and "--timeout" in run.stderr and "Traceback" not in run.stderr


def test_deeply_nested_header_is_malformed_not_a_crash():
    header = b"[" * 60000
    assert reason(MAGIC + struct.pack(">I", len(header)) + header) == "malformed"
