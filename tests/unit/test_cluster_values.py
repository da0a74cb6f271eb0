"""`splitfed launch`'s run options -> chart values (pure), and the pure pieces of its watch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from splitfed import config
from splitfed.cluster import values
from splitfed.cluster.watch import LogCursor, event_of, parse_line, progress_of, result_in
from splitfed.roles.declaration import Progress
from splitfed.scenarios.registry import SCENARIOS

REPO = Path(__file__).resolve().parents[2]


def run_options(scenario: str) -> list[config.Option]:
    declared = SCENARIOS[scenario]
    return config.options(declared.learning, declared.run_settings)


def test_launch_offers_the_scenarios_with_roles():
    assert values.launchable() == ["split", "splitnn", "fedavg", "p2p", "smpl"]  # centralized has no roles: nothing to deploy


@pytest.mark.parametrize("scenario", ["split", "splitnn", "fedavg", "p2p", "smpl"])
def test_launch_options_are_the_run_options_less_the_documented_exclusions(scenario):
    offered = [option.name for option in values.launch_options(scenario)]
    assert offered == [option.name for option in run_options(scenario) if option.name not in values.NOT_OFFERED]
    assert set(values.NOT_OFFERED) & set(offered) == set()


def test_every_exclusion_is_a_run_option():
    declared = {option.name for scenario in values.launchable() for option in run_options(scenario)}
    assert set(values.NOT_OFFERED) <= declared, "a stale NOT_OFFERED entry"
    assert set(values.CHART_LEVEL) <= declared


@pytest.mark.parametrize("scenario", ["split", "splitnn", "fedavg", "p2p", "smpl"])
def test_every_launch_option_has_a_home_in_the_chart(scenario):
    """A new option in a declaration lands somewhere (a role's settings), or this fails and it
    must be classified: NOT_OFFERED, CHART_LEVEL or LOCAL."""
    roles = values.CHART_SCENARIOS[scenario].roles
    for option in values.launch_options(scenario):
        if option.name in values.CHART_LEVEL or option.name in values.LOCAL:
            continue
        homes = values.settings_home(scenario, option.name, roles)
        assert homes, option.name
        assert option.type is not Path, f"--{option.name} names a file on this machine: a pod cannot read it"


def test_the_launch_commands_take_exactly_the_launch_options_and_launchs_own():
    from splitfed.cli import app
    from typer.main import get_command

    launch = get_command(app).commands["launch"]
    for scenario in values.launchable():
        flags = {opt for param in launch.commands[scenario].params for opt in param.opts}
        wanted = {option.flag for option in values.launch_options(scenario)}
        own = {"--name", "--namespace", "--set", "--values", "--detach", "--wait-timeout", "--pending-timeout", "--kube-context", "--chart", "--dry-run"}
        assert flags - {"-n", "-f", "--help"} == wanted | own
        assert not {option.flag for option in run_options(scenario) if option.name in values.NOT_OFFERED} & flags


def test_fedavg_options_become_shared_role_and_chart_level_values():
    chosen = {"workers": 2, "partition": "iid", "rounds": 2, "lr": 0.01, "dataset": "digits", "session": "s1", "min_workers": 1,
              "timeout": 90.0, "log_level": "debug", "out": Path("r.json")}
    assert values.chart_values("fedavg", chosen) == {
        "relay": {"enabled": False}, "splitClient": {"enabled": False}, "splitServer": {"enabled": False}, "splitFed": {"enabled": False},
        "fedavgServer": {"enabled": True, "settings": {"rounds": 2, "min-workers": 1}},
        "fedavgWorker": {"enabled": True, "replicas": 2},
        "p2pTracker": {"enabled": False}, "p2pPeer": {"enabled": False}, "smplPeer": {"enabled": False},
        "fedavg": {"settings": {"partition": "iid", "lr": 0.01, "timeout": 90.0, "log-level": "debug"}},
        "data": {"dataset": "digits"}, "session": "s1",
    }


def test_secure_aggregation_and_dp_are_the_fedavg_familys_shared_settings():
    """The server and every worker must run the same secure aggregation and DP (a worker refuses a
    server that runs otherwise): every such option lands in fedavg.settings, which reaches both."""
    privacy = [option.name for option in values.launch_options("fedavg") if option.name.startswith(("secure_aggregation", "secagg_", "dp"))]
    assert {"secure_aggregation", "secagg_neighbours", "secagg_threshold", "dp", "dp_delta", "dp_target_epsilon"} <= set(privacy)
    for name in privacy:
        assert values.settings_home("fedavg", name, values.CHART_SCENARIOS["fedavg"].roles) == ["fedavg"], name
    chosen = values.chart_values("fedavg", {"secure_aggregation": "secagg+", "secagg_neighbours": 4, "dp": "central", "dp_delta": 1e-6,
                                            "dp_target_epsilon": 8.0, "dp_adaptive_clip": True, "workers": 5})
    assert chosen["fedavg"] == {"settings": {"secure-aggregation": "secagg+", "secagg-neighbours": 4, "dp": "central", "dp-delta": 1e-6,
                                             "dp-target-epsilon": 8.0, "dp-adaptive-clip": True}}
    assert "settings" not in chosen["fedavgServer"] and "settings" not in chosen["fedavgWorker"]
    assert "dp-adaptive-clip" not in values.chart_values("fedavg", {"dp": "central", "dp_adaptive_clip": False})["fedavg"]["settings"]  # the default


def test_split_options_and_the_relay():
    through_relay = values.chart_values("split", {"epochs": 2, "mode": "u-shaped", "timeout": 60.0})
    assert through_relay["relay"] == {"enabled": True, "settings": {"timeout": 60.0}}
    assert through_relay["split"] == {"settings": {"epochs": 2, "mode": "u-shaped", "timeout": 60.0}}
    assert through_relay["splitClient"] == {"enabled": True} and through_relay["fedavgServer"] == {"enabled": False}
    direct = values.chart_values("split", {"via": "direct", "timeout": 60.0})
    assert direct["relay"] == {"enabled": False} and direct["split"] == {"settings": {"timeout": 60.0}}


def test_splitnn_options_clients_schedule_and_the_fed():
    """--clients is the split-client Job's pods; the fed runs exactly when several clients train
    in parallel; the server leads whatever the number of clients."""
    chosen = values.chart_values("splitnn", {"clients": 3, "schedule": "splitfed-v1", "partition": "iid", "min_clients": 2,
                                             "client_timeout": 30.0, "epochs": 2, "timeout": 60.0})
    assert chosen["splitClient"] == {"enabled": True, "replicas": 3, "settings": {"progress-events": False}}
    assert chosen["splitServer"] == {"enabled": True, "settings": {"progress-events": True}}
    assert chosen["splitFed"] == {"enabled": True}
    assert chosen["relay"] == {"enabled": False} and chosen["fedavgServer"] == {"enabled": False}
    assert chosen["split"] == {"settings": {"schedule": "splitfed-v1", "partition": "iid", "min-clients": 2, "client-timeout": 30.0,
                                            "epochs": 2, "timeout": 60.0}}
    for given in ({"clients": 3, "schedule": "round-robin"}, {"clients": 1}, {"schedule": "splitfed-v2"}):
        assert values.chart_values("splitnn", given)["splitFed"] == {"enabled": False}, given
    assert values.chart_values("splitnn", {"clients": 2})["splitFed"] == {"enabled": True}  # splitfed-v2 is the default
    assert values.chart_values("split", {})["splitFed"] == {"enabled": False}
    assert values.CHART_SCENARIOS["splitnn"].lead == "split-server" and values.LEADS["split-server"] == ("splitnn",)
    assert values.split_lead(1) == "split-client" and values.split_lead(3) == "split-server"


def test_p2p_options_peers_the_family_and_the_tracker_that_ends():
    """--peers is the peers' replicas and what the tracker expects (so it ends with the run, as a
    Job, the peers as an Indexed Job, and prints the result); what tracker and peers both take is
    the family's."""
    chosen = values.chart_values("p2p", {"peers": 3, "epochs": 2, "partition": "iid", "max_staleness": 1, "seed": 4, "peer_timeout": 30.0,
                                         "timeout": 60.0, "log_level": "debug", "dataset": "digits"})
    assert chosen["p2pTracker"] == {"enabled": True, "settings": {"expect-peers": 3}}
    assert chosen["p2pPeer"] == {"enabled": True, "replicas": 3, "settings": {"epochs": 2, "partition": "iid", "max-staleness": 1}}
    assert chosen["p2p"] == {"settings": {"seed": 4, "peer-timeout": 30.0, "timeout": 60.0, "log-level": "debug"}}
    assert chosen["smplPeer"] == {"enabled": False} and chosen["fedavgServer"] == {"enabled": False} and "smpl" not in chosen
    assert chosen["data"] == {"dataset": "digits"}
    # nothing given: the declared number of peers, which the tracker expects all the same
    declared = values.declared_default("p2p", "peers")
    assert values.chart_values("p2p", {})["p2pTracker"] == {"enabled": True, "settings": {"expect-peers": declared}}
    assert "replicas" not in values.chart_values("p2p", {})["p2pPeer"]  # the chart's default, the declared one (tests/chart)


def test_smpl_options_share_the_hyperedges_with_the_tracker():
    chosen = values.chart_values("smpl", {"peers": 6, "hyperedge_size": 3, "max_hyperedges": 2, "epsilon": 0.5, "sparsity": 0.9,
                                          "hyperepochs": 4, "local_parallel": "hogwild"})
    assert chosen["smpl"] == {"settings": {"hyperedge-size": 3, "max-hyperedges": 2, "epsilon": 0.5}}
    assert chosen["smplPeer"] == {"enabled": True, "replicas": 6, "settings": {"sparsity": 0.9, "hyperepochs": 4, "local-parallel": "hogwild"}}
    assert chosen["p2pTracker"] == {"enabled": True, "settings": {"expect-peers": 6}} and chosen["p2pPeer"] == {"enabled": False}


def test_p2p_and_smpl_share_their_lead_and_are_told_apart_by_their_peers():
    assert values.CHART_SCENARIOS["p2p"].lead == values.CHART_SCENARIOS["smpl"].lead == "p2p-tracker"
    assert values.LEADS["p2p-tracker"] == ("p2p", "smpl")
    assert values.scenario_of("p2p-tracker", {"p2p-tracker", "smpl-peer"}) == "smpl"
    assert values.scenario_of("p2p-tracker", {"p2p-tracker", "p2p-peer"}) == "p2p"
    assert values.scenario_of("p2p-tracker", {"p2p-tracker"}) == "p2p"  # no peers (yet): the first
    assert values.scenario_of("fedavg-server", {"fedavg-worker"}) == "fedavg"


def test_scenarios_that_share_a_lead_each_run_a_role_of_their_own():
    """status tells runs of one lead apart by the roles only one of them runs."""
    for lead, names in values.LEADS.items():
        if len(names) > 1:
            for name in names:
                assert values.own_roles(name), f"{name} shares its lead {lead} and runs no role of its own"


def test_the_charts_role_facts_are_the_declarations():
    from splitfed.roles.registry import ROLES

    assert values.ROLE_KEYS == {role: spec.values_key for role, spec in ROLES.items()}
    for family, roles in values.FAMILIES.items():
        assert roles and all(family in ROLES[role].families and ROLES[role].learning for role in roles)
    assert values.FAMILIES["smpl"] == ("p2p-tracker", "smpl-peer") and "relay" not in values.FAMILIES["split"]
    for scenario in ("p2p", "smpl"):
        assert values.peer_role(scenario) == f"{scenario}-peer"
    assert {count: values.counting_role(scenario, count) for scenario, count in (("fedavg", "workers"), ("splitnn", "clients"))} == \
        {"workers": "fedavg-worker", "clients": "split-client"}


def key_folder(folder, *parties: str):
    """A key list and each party's key file in `folder` (their contents do not matter here); the key list's path."""
    (folder / "key-list.json").write_text("{}")
    for party in parties:
        (folder / f"{party}.key").write_text(party)
    return folder / "key-list.json"


def test_p2p_keys_are_the_trackers_and_every_peers(tmp_path):
    given = {"key_list": key_folder(tmp_path, "p2p-tracker", "smpl-peer-0", "smpl-peer-1"), "peers": 2}
    assert sorted(values.key_files("smpl", given)) == ["key-list.json", "p2p-tracker.key", "smpl-peer-0.key", "smpl-peer-1.key"]
    assert values.parties("p2p", {"peers": 2}) == ["p2p-tracker", "p2p-peer-0", "p2p-peer-1"]
    with pytest.raises(ValueError, match="p2p-peer-0.key, p2p-peer-1.key missing"):
        values.key_files("p2p", given)


def test_splitnn_keys_are_every_clients_the_servers_and_the_feds(tmp_path):
    given = {"key_list": key_folder(tmp_path, "split-server", "split-fed", "split-client-0", "split-client-1"), "clients": 2}
    assert sorted(values.key_files("splitnn", given)) == ["key-list.json", "split-client-0.key", "split-client-1.key", "split-fed.key",
                                                          "split-server.key"]
    assert values.parties("splitnn", {**given, "schedule": "round-robin"}) == ["split-server", "split-client-0", "split-client-1"]
    assert values.parties("splitnn", {"clients": 1}) == ["split-server", "split-client"]  # one client: named as in split
    with pytest.raises(ValueError, match="split-client-2.key missing"):
        values.key_files("splitnn", {**given, "clients": 3})


def test_the_queue_type_is_one_chart_value_for_every_role():
    """Every party of a session must use the same queue type, and the chart picks it from the
    broker's size unless told: --queue-type becomes queueType, never a role's setting."""
    for scenario in values.launchable():
        chosen = values.chart_values(scenario, {"queue_type": "quorum"})
        assert chosen["queueType"] == "quorum"
        # (splitnn names its lead: the server prints the progress events, the clients do not; p2p
        # and smpl tell the tracker how many peers to expect)
        assert not [key for key, section in chosen.items()
                    if isinstance(section, dict) and set(section.get("settings", {})) - {"progress-events", "expect-peers"}]
    assert "queue_type" in values.MANAGED and values.CHART_LEVEL["queue_type"] == "queueType"


def test_nothing_given_is_nothing_written():
    """Options not given are left out: the chart's and the roles' defaults apply, as with run."""
    assert values.chart_values("fedavg", {}) == {key: {"enabled": key in ("fedavgServer", "fedavgWorker")} for key in values.ROLE_KEYS.values()}


def test_the_key_list_becomes_a_secret_of_its_folder(tmp_path):
    given = {"key_list": key_folder(tmp_path, "fedavg-server", "worker-0", "worker-1"), "workers": 2}
    assert sorted(values.key_files("fedavg", given)) == ["fedavg-server.key", "key-list.json", "worker-0.key", "worker-1.key"]
    assert values.chart_values("fedavg", given, keys_secret="fl-keys")["keys"] == {"existingSecret": "fl-keys", "keyListKey": "key-list.json"}
    with pytest.raises(ValueError, match="worker-2.key missing"):
        values.key_files("fedavg", {**given, "workers": 3})
    with pytest.raises(ValueError, match="split-client.key, split-server.key missing"):
        values.key_files("split", given)


def test_options_launch_does_not_take_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match=r"--broker is not an option of splitfed launch: the chart's own RabbitMQ"):
        values.chart_values("fedavg", {"broker": "amqp://guest:guest@h/"})


@pytest.mark.parametrize("name", ["fl", "fedavg-3f2a1c", "a" * 53])
def test_release_names_helm_takes(name):
    assert values.check_release_name(name) == name


@pytest.mark.parametrize("name", ["Fl", "-fl", "fl-", "f_l", "a" * 54, ""])
def test_release_names_helm_refuses(name):
    with pytest.raises(ValueError, match="--name"):
        values.check_release_name(name)


def test_the_readme_says_what_launch_does_not_take():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Run on Kubernetes"):text.index("## Design")]
    for name in values.NOT_OFFERED:
        assert f"--{name.replace('_', '-')}" in section, name


def test_the_cli_does_not_import_the_kubernetes_client():
    code = "import sys, splitfed.cli; assert 'kubernetes' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


# -- the watch's pure pieces --------------------------------------------------------------------


def test_log_lines_with_timestamps_are_taken_once_and_in_order():
    cursor = LogCursor()
    first = "2025-05-06T09:14:01Z a\n2025-05-06T09:14:01.5Z b\n"
    assert cursor.new(first) == ["a", "b"]  # 01Z sorts before 01.5Z (no fraction: .000000000)
    assert cursor.new(first + "2025-05-06T09:14:01.5Z c\n2025-05-06T09:14:02.000000001Z d\n") == ["c", "d"]
    assert cursor.new("2025-05-06T09:14:02.000000001Z d\n") == []


def test_events_and_results_from_a_log():
    record = {"step": 1, "accuracy": 0.5, "loss": 1.0, "train_loss": 1.1, "seconds": 2.0}
    log = "\n".join([
        "2025-05-06 09:14:10,231 INFO splitfed: waiting",
        '{"event": "round", "done": 1, "total": 4, "loss": 1.1, "record": %s}' % __import__("json").dumps(record),
        '{"not": "an event"}', "{broken",
        '{"event": "result", "done": 0, "total": 0, "loss": 0.0, "record": {"accuracy": 0.5, "history": [], "contributors": {}}}',
    ])
    assert parse_line("2025-05-06T09:14:10.231Z hello") == (("2025-05-06T09:14:10", 231000000), "hello")
    assert event_of("{broken") is None and event_of('{"not": "an event"}') is None
    assert result_in(log) == {"accuracy": 0.5, "history": [], "contributors": {}}
    assert progress_of([Progress("round", 1, 4, 1.1, record)]) == ("round 1/4", 0.5)
    assert progress_of([Progress("epoch", 1, 3, 1.1, record), Progress("batch", 10, 938, 0.9)]) == ("epoch 2 batch 10/938", 0.5)
    assert progress_of([]) == ("starting", None)


def test_values_merge_as_helm_merges_them():
    base = {"a": {"b": 1, "c": {"d": 2}}, "e": [1], "f": "x"}
    assert values.merged(base, {"a": {"c": {"d": 3}}, "e": [2], "f": None}) == {"a": {"b": 1, "c": {"d": 3}}, "e": [2]}
    assert base["a"]["c"]["d"] == 2  # untouched


def test_plain_set_assignments_are_read_others_are_not():
    assert values.set_values(["fedavgWorker.resources.limits.memory=1Gi,fedavgWorker.replicas=4", "relay.enabled=true", "x=01"]) == {
        "fedavgWorker": {"resources": {"limits": {"memory": "1Gi"}}, "replicas": 4}, "relay": {"enabled": True}, "x": "01"}
    assert values.set_values(["fedavgWorker.tolerations[0].key=gpu"]) is None
    assert values.set_values(["no-equals-sign"]) is None
