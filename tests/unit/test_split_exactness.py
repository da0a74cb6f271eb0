"""Synchronous split learning is the same computation as centralized training."""

import pytest

from splitfed.learning.settings import SplitSettings
from splitfed.scenarios import launch, split
from splitfed.scenarios.split import SplitRun
from splitfed.transport import MemoryBroker, MemoryTransport
from tests.conftest import max_param_diff


@pytest.mark.parametrize("mode", ["vanilla", "u-shaped"])
@pytest.mark.parametrize("via", ["relay", "direct"])
def test_split_in_memory_equals_centralized(digits_baseline, tmp_path, mode, via):
    baseline, baseline_model = digits_baseline
    settings = SplitSettings(dataset="digits", epochs=1, batch_size=32, mode=mode)
    result = launch.run(split.SCENARIO, settings, SplitRun(session="exact", via=via, save_model=tmp_path / "split.safetensors"))
    assert max_param_diff(baseline_model, tmp_path / "split.safetensors") == 0  # bit for bit: the same operations in the same order
    assert result["accuracy"] == baseline["accuracy"] and result["accuracy"] > 0.5


def test_u_shaped_labels_never_leave_the_client():
    shared = MemoryBroker()
    sent_by_client: list[dict] = []

    def tap(queue, frame):
        from splitfed.protocol import decode

        message = decode(frame)
        if message.sender == "split-client":
            sent_by_client.append(message)

    shared.taps.append(tap)
    for mode in ("vanilla", "u-shaped"):
        sent_by_client.clear()
        settings = SplitSettings(dataset="digits", epochs=1, limit=256, batch_size=32, mode=mode)
        launch.run(split.SCENARIO, settings, SplitRun(session=mode, via="direct"), connect_as=lambda role: MemoryTransport(shared))
        integer_tensors = [name for m in sent_by_client for name, t in m.tensors.items() if t.dtype.kind in "iub"]
        if mode == "vanilla":
            assert "y" in integer_tensors  # the check below can see labels when they are there
        else:
            assert sent_by_client and integer_tensors == []
            assert all("label" not in key for m in sent_by_client for key in m.meta)


def test_a_cut_that_leaves_a_half_without_weights_names_the_cuts_that_work():
    from torch import nn

    from splitfed.learning.cutting import cut

    with pytest.raises(ValueError, match="leaves the client no weights to train; this model cannot be split"):
        cut(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), 1)
    with pytest.raises(ValueError, match="leaves the server no weights to train; cuts where both do: 1"):
        cut(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.Softmax(dim=1)), 3)
    assert len(cut(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 2).body) == 1
