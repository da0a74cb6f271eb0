"""Run options -> chart values, for `splitfed launch`: pure (no cluster, no helm).

`splitfed launch SCENARIO` takes the options of `splitfed run SCENARIO`, derived from the same
declarations, minus the few that name something on this machine (NOT_OFFERED, each with the
reason and what to use instead). Every other option lands in the chart: a handful at chart level
(CHART_LEVEL), the rest in the `settings` of the roles that declare it: the family's shared
`fedavg.settings` / `split.settings` / `p2p.settings` / `smpl.settings` when every role of the
family takes it, else each role's own.
Only options given on the command line are written, so the chart's and the roles' defaults
apply to the others, as they do for `splitfed run`.

MANAGED (the options the chart sets itself) and FAMILIES (the roles a family's shared settings
reach) are the chart's own facts; ci/chart_schema.py imports them from here. What each role is in
the chart (values key, replicas, family) is its declaration's (roles.registry).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitfed import config
from splitfed.roles.registry import FAMILIES as ROLE_FAMILIES, ROLES
from splitfed.scenarios.registry import SCENARIOS

# Options the chart sets itself, from other values (session, broker, keys, metrics, data and
# task, worker, split-client and peer identity, worker, split-client and peer counts, checkpoint
# volume, relay or direct, the queue type that follows the broker's size): never in `settings`.
MANAGED = {
    "session", "broker", "broker_file", "broker_credentials", "tls_ca", "tls_cert", "tls_key", "key_list", "private_key", "metrics_port",
    "dataset", "data_dir", "label_column", "classes", "image_size", "task",
    "worker_id", "index", "workers", "checkpoint_dir", "via", "queue_type",
    "clients", "client_index", "peers", "peer_index",
}
# The data options that are values under `data:` (option -> key): every party reads its data alike.
DATA_VALUES = {"dataset": "dataset", "label_column": "labelColumn", "classes": "classes", "image_size": "imageSize"}

# The roles a family's shared `settings` (split.settings, fedavg.settings, ...) reach: those of
# the family with learning settings (not the relay). The chart accepts there only what every one
# of them takes (ci/chart_schema.py), since each gets it. The p2p-tracker belongs to both
# decentralized families: it takes p2p.settings, or smpl.settings when the release runs smpl peers
# (templates/_helpers.tpl, splitfed.peerFamily).
FAMILIES = {family: tuple(role for role in roles if ROLES[role].learning is not None) for family, roles in ROLE_FAMILIES.items()}
ROLE_KEYS = {role: spec.values_key for role, spec in ROLES.items()}  # values key of each role
# The run settings that are a role's replicas (workers, clients, peers): chart-level values.
COUNTS = {spec.counts for spec in ROLES.values() if spec.counts}


@dataclass(frozen=True)
class ChartScenario:
    """How a scenario runs in the chart: the roles it turns on, the lead (a Job whose log carries
    the progress events and, last, the result), and the values key of the family's shared settings."""

    roles: tuple[str, ...]
    lead: str
    family: str


# centralized is not here: it has no roles, it trains in one process (nothing to deploy).
# split and splitnn share the split roles; what tells them apart in a cluster is the lead: the
# one client of split, the server of splitnn (which closes the epochs of several clients).
# p2p and smpl share their lead, the tracker (it hears every peer's reports and prints the run's
# result); what tells them apart is their peers' role.
CHART_SCENARIOS = {
    "fedavg": ChartScenario(("fedavg-server", "fedavg-worker"), "fedavg-server", "fedavg"),
    "split": ChartScenario(("split-client", "split-server", "relay"), "split-client", "split"),
    "splitnn": ChartScenario(("split-client", "split-server", "split-fed"), "split-server", "split"),
    "p2p": ChartScenario(("p2p-tracker", "p2p-peer"), "p2p-tracker", "p2p"),
    "smpl": ChartScenario(("p2p-tracker", "smpl-peer"), "p2p-tracker", "smpl"),
}
# lead role -> the scenarios it leads (most lead one scenario of their own)
LEADS = {lead: tuple(name for name, s in CHART_SCENARIOS.items() if s.lead == lead) for lead in dict.fromkeys(s.lead for s in CHART_SCENARIOS.values())}


def own_roles(name: str) -> set[str]:
    """The roles of scenario `name` that no other scenario of its lead runs."""
    others = [CHART_SCENARIOS[other].roles for other in LEADS[CHART_SCENARIOS[name].lead] if other != name]
    return set(CHART_SCENARIOS[name].roles).difference(*others)


def scenario_of(lead: str, roles: set[str]) -> str:
    """The scenario a release runs, from its lead's role and the roles of its pods: status tells
    runs apart by them (a lead of its own, or, where scenarios share a lead, the roles only one of
    them runs: smpl-peer pods make an smpl run)."""
    names = LEADS[lead]
    return next((name for name in names if own_roles(name) & roles), names[0])


# The setting that makes a role print progress events and its result (the chart turns it on for
# the lead roles; status and logs find the lead by it: cluster.commands._lead_pods).
PROGRESS_EVENTS = "progress-events"

# Options of `splitfed run` that `splitfed launch` does not take: each names something on this
# machine that a pod cannot use. The reason is the help text's replacement in the README.
NOT_OFFERED = {
    "broker": "the chart's own RabbitMQ, or an external one with --set broker.external.* "
              "(its credentials come from a Secret, never from a command line)",
    "launch": "every role is a pod",
    "broker_file": "the chart mounts the broker Secret and points every role at it",
    "broker_credentials": "the chart mounts the broker Secret and points every role at it",
    "tls_ca": "broker TLS material comes from a Secret: --set broker.external.tls.*",
    "tls_cert": "broker TLS material comes from a Secret: --set broker.external.tls.*",
    "tls_key": "broker TLS material comes from a Secret: --set broker.external.tls.*",
    "metrics_port": "every role serves /metrics on the chart's metrics.port (--set metrics.port=N)",
    "checkpoint_dir": "the fedavg-server keeps its checkpoint on a volume (fedavgServer.persistence)",
    "save_model": "the model stays in the pods; nothing brings model files back",
    "data_dir": "a volume with the data: --set data.volume.* (one data set for all), or data.perParty.* (each party its own "
                "folder); the chart sets SPLITFED_DATA_DIR",
}
# Options that become chart-level values rather than role settings.
CHART_LEVEL = {
    "session": "session",
    "dataset": "data.dataset",
    "label_column": "data.labelColumn",
    "classes": "data.classes",
    "image_size": "data.imageSize",
    "task": "task.file (a PATH.py: its text, which the chart puts in a ConfigMap) or task.module (package.module: in the images)",
    "workers": "fedavgWorker.replicas",
    "clients": "splitClient.replicas (the split-client Job's pods, one per client)",
    "peers": "p2pPeer.replicas or smplPeer.replicas (the peers' Indexed Job, one pod per peer); the tracker's expect-peers too",
    "via": "relay.enabled (relay: true, direct: false)",
    # Every party of a session must use the same queue type, so it is one value for all roles
    # (empty there: quorum on a chart broker of 3 or more nodes, else classic).
    "queue_type": "queueType",
    "key_list": "keys.existingSecret: a Secret launch makes from the key list's folder",
}
LOCAL = {"out", "plot"}  # used by launch itself, on this machine, as by `splitfed run`

RELEASE_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"  # helm: a DNS-1123 label of at most 53 characters
KEYS_SECRET_SUFFIX = "-keys"
# A ConfigMap holds at most 1 MiB; a bigger task belongs in the images (ci/images.sh --task).
TASK_FILE_LIMIT = 1024 * 1024
TASK_KEY = re.compile(r"[-._a-zA-Z0-9]+\.py")  # a ConfigMap key that still names a Python file
TASK_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # package.module, as the roles import it


def launchable() -> list[str]:
    """Scenarios `splitfed launch` offers, in registry order."""
    return [name for name in SCENARIOS if name in CHART_SCENARIOS]


def launch_options(scenario: str) -> list[config.Option]:
    """The options of `splitfed run SCENARIO` that `splitfed launch SCENARIO` takes."""
    declared = SCENARIOS[scenario]
    return [option for option in config.options(declared.learning, declared.run_settings) if option.name not in NOT_OFFERED]


def settings_options(role: str) -> dict[str, config.Option]:
    """A role's options the chart's `settings` may set, by field name."""
    return {option.name: option for option in ROLES[role].options() if option.name not in MANAGED}


def declared_default(scenario: str, name: str) -> Any:
    declared = SCENARIOS[scenario]
    (option,) = [o for o in config.options(declared.learning, declared.run_settings) if o.name == name]
    return option.default


def enabled_roles(scenario: str, given: dict[str, Any]) -> tuple[str, ...]:
    roles = CHART_SCENARIOS[scenario].roles
    if scenario == "split" and given.get("via", declared_default("split", "via")) != "relay":
        roles = tuple(role for role in roles if role != "relay")
    if scenario == "splitnn" and not has_fed(given.get("clients", declared_default("splitnn", "clients")),
                                             given.get("schedule", declared_default("splitnn", "schedule"))):
        roles = tuple(role for role in roles if role != "split-fed")
    return roles


def split_lead(clients: int) -> str:
    """The lead the chart gives a split run of `clients` clients unless its settings say otherwise
    (templates/_helpers.tpl, splitfed.splitLead): the one client, or the server among several."""
    return "split-server" if clients > 1 else "split-client"


def has_fed(clients: int, schedule: str) -> bool:
    """Whether a splitnn run has a split-fed: several clients in parallel (splitfed-v1, v2) do;
    round-robin hands the layers from client to client, and one client has nothing to average.
    The chart refuses splitFed.enabled otherwise, and its absence here (templates/validate.yaml)."""
    return clients > 1 and schedule != "round-robin"


def settings_home(scenario: str, name: str, roles: tuple[str, ...]) -> list[str]:
    """Where option `name` goes: values keys whose `settings` get it (the family's shared
    settings stand for all of its roles that take it)."""
    chart = CHART_SCENARIOS[scenario]
    takers = [role for role in roles if name in settings_options(role)]
    if not takers:
        raise LookupError(f"{scenario}: no role of the chart takes --{name.replace('_', '-')}; add it to NOT_OFFERED or CHART_LEVEL")
    family = [role for role in roles if role != "relay"]
    homes = []
    # Shared when every role of the run takes it, and the family's settings may hold it (every
    # role they reach takes it, the run's or not: the split-fed gets split.settings too).
    if set(family) <= set(takers) and all(name in settings_options(role) for role in FAMILIES[chart.family]):
        homes.append(chart.family)
        takers = [role for role in takers if role not in family]
    return homes + [ROLE_KEYS[role] for role in takers]


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def chart_values(scenario: str, given: dict[str, Any], keys_secret: str | None = None) -> dict:
    """Chart values for a run of `scenario` with the options `given` (by field name, parsed and
    checked); `keys_secret`: the Secret with the key list and private keys (with --key-list)."""
    roles = enabled_roles(scenario, given)
    values: dict[str, Any] = {key: {"enabled": role in roles} for role, key in ROLE_KEYS.items()}
    settings: dict[str, dict[str, Any]] = {}
    for name, value in given.items():
        if name in LOCAL or name == "via":
            continue
        # An on/off flag has a value whether it was given or not: at its declared default it is
        # left out, as an option not given is, so that the chart's and the roles' defaults apply.
        if isinstance(value, bool) and value == declared_default(scenario, name):
            continue
        if name in NOT_OFFERED:
            raise ValueError(f"--{name.replace('_', '-')} is not an option of splitfed launch: {NOT_OFFERED[name]}")
        if name == "session":
            values["session"] = value
        elif name in DATA_VALUES:
            values.setdefault("data", {})[DATA_VALUES[name]] = value
        elif name == "task":
            values["task"] = task_values(value)
        elif name in COUNTS:
            values[ROLE_KEYS[counting_role(scenario, name)]]["replicas"] = value
        elif name == "queue_type":
            values["queueType"] = value
        elif name == "key_list":
            if not keys_secret:
                raise ValueError("--key-list needs the Secret made from its folder")
            values["keys"] = {"existingSecret": keys_secret, "keyListKey": Path(value).name}
        else:
            flag = name.replace("_", "-")
            for home in settings_home(scenario, name, roles):
                settings.setdefault(home, {})[flag] = _plain(value)
    if scenario == "splitnn":
        # The server leads splitnn, whatever the number of clients; the chart's own choice
        # (the one client with one, the server with several) would make the client lead a
        # splitnn run of one client.
        settings.setdefault(ROLE_KEYS["split-server"], {})[PROGRESS_EVENTS] = True
        settings.setdefault(ROLE_KEYS["split-client"], {})[PROGRESS_EVENTS] = False
    if scenario in ("p2p", "smpl"):
        # A run with an end, as `splitfed run` makes it: the tracker finishes once every peer has
        # registered and left, and prints the result (the chart makes it a Job then, and the peers
        # an Indexed Job whose finished pods stay finished, not the Deployment and StatefulSet of a
        # session that serves until uninstalled).
        settings.setdefault(ROLE_KEYS["p2p-tracker"], {})["expect-peers"] = given.get("peers", declared_default(scenario, "peers"))
    if given.get("evaluate") == "parties":
        # The parties score the model on their own test sets: the servers read no data at all.
        values.setdefault("data", {})["servers"] = False
    for home, chosen in settings.items():
        values.setdefault(home, {})["settings"] = chosen
    return values


def task_values(task: str) -> dict[str, str]:
    """--task as chart values, told apart as the roles tell them: a Python file (PATH.py) travels
    in the chart's task ConfigMap (task.file: its text, under its own name where that is a
    ConfigMap key); package.module is a module the images carry (task.module)."""
    if not task.endswith(".py"):
        if not TASK_MODULE.fullmatch(task):
            raise ValueError(f"--task {task}: give a file PATH.py or a module package.module")
        return {"module": task}
    path = Path(task)
    if not path.is_file():
        raise ValueError(f"--task {task}: no such file")
    raw = path.read_bytes()
    if len(raw) > TASK_FILE_LIMIT:
        raise ValueError(f"--task {task}: {len(raw)} bytes, more than a ConfigMap holds ({TASK_FILE_LIMIT}): "
                         "install it into the images instead (ci/images.sh --task DIR) and give --task package.module")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--task {task}: not UTF-8 text (byte {exc.start})") from None
    return {"file": text, **({"key": path.name} if TASK_KEY.fullmatch(path.name) else {})}


def counting_role(scenario: str, count: str) -> str:
    """The role of `scenario` whose replicas are the run's `count` (workers, clients or peers)."""
    (role,) = [role for role in CHART_SCENARIOS[scenario].roles if ROLES[role].counts == count]
    return role


def peer_role(scenario: str) -> str:
    """The peers' role of a decentralized scenario (p2p: p2p-peer, smpl: smpl-peer)."""
    return counting_role(scenario, "peers")


def parties(scenario: str, given: dict[str, Any]) -> list[str]:
    """The parties whose private keys the chart mounts (the relay signs nothing)."""
    if scenario == "fedavg":
        workers = given.get("workers", declared_default("fedavg", "workers"))
        return ["fedavg-server", *(f"worker-{index}" for index in range(workers))]
    if scenario == "splitnn":
        from splitfed.roles.split.common import client_name

        clients = given.get("clients", declared_default("splitnn", "clients"))
        fed = ["split-fed"] if "split-fed" in enabled_roles(scenario, given) else []
        return ["split-server", *fed, *(client_name(index, clients) for index in range(clients))]
    if scenario in ("p2p", "smpl"):
        from splitfed.roles.p2p.common import TRACKER, peer_name

        peers = given.get("peers", declared_default(scenario, "peers"))
        return [TRACKER, *(peer_name(peer_role(scenario), index) for index in range(peers))]
    return ["split-client", "split-server"]


def key_files(scenario: str, given: dict[str, Any]) -> dict[str, Path]:
    """Secret key -> file for the keys Secret: the key list and each party's private key, from
    the key list's folder (as `splitfed keys generate` wrote them)."""
    key_list = Path(given["key_list"])
    if not key_list.is_file():
        raise ValueError(f"--key-list {key_list}: no such file")
    files = {key_list.name: key_list}
    missing = []
    for party in parties(scenario, given):
        path = key_list.parent / f"{party}.key"
        if path.is_file():
            files[path.name] = path
        else:
            missing.append(path.name)
    if missing:
        raise ValueError(f"--key-list {key_list}: {', '.join(missing)} missing beside it (splitfed keys generate --out {key_list.parent} ...)")
    return files


def check_release_name(name: str) -> str:
    if len(name) > 53 or not re.fullmatch(RELEASE_NAME, name):
        raise ValueError(f"--name {name[:80]!r}: a release name is lower-case letters, digits and '-', at most 53 characters, "
                         "starting and ending with a letter or digit")
    return name


def learning_config(scenario: str, given: dict[str, Any]) -> dict[str, Any]:
    """The learning settings of the run (given options over the declared defaults), for the
    results' `config`, as `splitfed run` records them. Building them also checks them (a
    partition that does not fit the workers fails here, before anything is installed)."""
    declared = SCENARIOS[scenario]
    return config.values_of(config.build(declared.learning, given))


# -- the values helm will use: for the memory check before installing -------------------------------


def merged(*layers: dict | None) -> dict:
    """Values files merged as helm merges them: maps key by key, a later value replacing an
    earlier one, null removing it."""
    out: dict = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def _typed(text: str) -> Any:
    """A --set value as helm types it: true, false, null, whole numbers; the rest is text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "null":
        return None
    if re.fullmatch(r"-?(0|[1-9][0-9]*)", text):
        return int(text)
    return text


def set_values(assignments: list[str]) -> dict | None:
    """--set KEY=VALUE[,KEY=VALUE] as values, for the plain form (dotted keys, scalar values);
    None when one uses what this does not read (list indices, escapes, {a,b} lists)."""
    out: dict = {}
    for assignment in assignments:
        if any(mark in assignment for mark in ("[", "\\", "{")):
            return None
        for pair in assignment.split(","):
            key, equals, text = pair.partition("=")
            if not equals or not key:
                return None
            out = merged(out, _nested(key.split("."), _typed(text)))
    return out


def _nested(path: list[str], value: Any) -> dict:
    return {path[0]: value} if len(path) == 1 else {path[0]: _nested(path[1:], value)}


# -- a role asked for a GPU it does not request: for the warning before installing ----------------

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"  # the chart's gpu.resourceName unless the values name another


def asked_device(values: dict, role: str) -> Any:
    """The device `role`'s settings ask for in the chart's (merged) `values`: its own, else its
    family's shared settings' (templates/_role.tpl); None where neither names one."""
    own = (values.get(ROLE_KEYS[role]) or {}).get("settings") or {}
    if "device" in own:
        return own["device"]
    shared = [(values.get(family) or {}).get("settings") or {} for family in ROLES[role].families]
    return next((settings["device"] for settings in shared if "device" in settings), None)


def devices_without_gpus(values: dict) -> dict[str, list[str]]:
    """GPU device (cuda, cuda:N) -> the torch roles the merged `values` run that are asked to compute
    on it but request no GPU: neither gpu.enabled (which also gives them the CUDA image) nor a limit
    of gpu.resourceName of their own."""
    resource = (values.get("gpu") or {}).get("resourceName") or DEFAULT_GPU_RESOURCE
    found: dict[str, list[str]] = {}
    for role, spec in ROLES.items():
        section = values.get(spec.values_key) or {}
        if not spec.torch or not section.get("enabled") or section.get("replicas", 1) == 0:
            continue
        limits = (section.get("resources") or {}).get("limits") or {}
        if (section.get("gpu") or {}).get("enabled") or limits.get(resource):
            continue
        device = asked_device(values, role)
        if isinstance(device, str) and device.startswith("cuda"):
            found.setdefault(device, []).append(role)
    return found


def device_warnings(values: dict) -> list[str]:
    """One line per GPU device asked of roles that request no GPU (devices_without_gpus): their
    pods would run the CPU image, whose torch has no CUDA, and stop at the start."""
    return [f"device {device} asked of {', '.join(roles)} with no GPU requested: the CPU image's torch has no CUDA, so the pods "
            f"stop at the start; --set {','.join(f'{ROLE_KEYS[role]}.gpu.enabled=true' for role in roles)} requests one, with the -cuda image"
            for device, roles in devices_without_gpus(values).items()]
