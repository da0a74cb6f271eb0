"""Which roles launch warns about: asked for a GPU device (cuda, cuda:N) in the values helm will use,
with no GPU requested (cluster.values.devices_without_gpus). Pure: no cluster, no helm."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from splitfed.cluster.values import device_warnings, devices_without_gpus, merged

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[2] / "helm" / "splitfed" / "values.yaml").read_text())


def asked(*layers: dict) -> dict[str, list[str]]:
    return devices_without_gpus(merged(DEFAULTS, *layers))


def test_the_defaults_ask_for_no_gpu():
    assert asked() == {}


@pytest.mark.parametrize(("layer", "expected"), [
    ({"fedavg": {"settings": {"device": "cuda"}}}, {"cuda": ["fedavg-server", "fedavg-worker"]}),  # the family's shared settings
    ({"fedavgWorker": {"settings": {"device": "cuda:1"}}}, {"cuda:1": ["fedavg-worker"]}),  # a role's own
    ({"fedavg": {"settings": {"device": "cuda"}}, "fedavgServer": {"settings": {"device": "cpu"}}}, {"cuda": ["fedavg-worker"]}),
    ({"fedavg": {"settings": {"device": "cuda"}}, "fedavgServer": {"gpu": {"enabled": True}},
      "fedavgWorker": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}, {}),  # gpu.enabled, or a GPU limit of its own
    ({"fedavg": {"settings": {"device": "auto"}}}, {}),
    ({"fedavgWorker": {"replicas": 0, "settings": {"device": "cuda"}}}, {}),  # no pod
    ({"splitClient": {"enabled": True}, "splitServer": {"enabled": True}, "splitFed": {"enabled": True},
      "split": {"settings": {"device": "cuda"}}}, {"cuda": ["split-client", "split-server"]}),  # the split-fed runs no torch
])
def test_roles_asked_for_a_gpu_they_do_not_request(layer, expected):
    assert asked(layer) == expected


def test_a_gpu_limit_under_another_resource_name_counts():
    layer = {"gpu": {"resourceName": "amd.com/gpu"}, "fedavgWorker": {"settings": {"device": "cuda"}, "resources": {"limits": {"amd.com/gpu": 1}}}}
    assert asked(layer) == {}
    assert asked({**layer, "gpu": {"resourceName": "nvidia.com/gpu"}}) == {"cuda": ["fedavg-worker"]}


def test_one_line_per_device_names_the_roles_and_the_values_that_give_them_a_gpu():
    (line,) = device_warnings(merged(DEFAULTS, {"fedavg": {"settings": {"device": "cuda"}}}))
    assert "\n" not in line
    assert line.startswith("device cuda asked of fedavg-server, fedavg-worker with no GPU requested")
    assert line.endswith("--set fedavgServer.gpu.enabled=true,fedavgWorker.gpu.enabled=true requests one, with the -cuda image")
