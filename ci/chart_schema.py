"""Write the chart's files derived from the role declarations (splitfed.roles.registry):
- helm/splitfed/values.schema.json: the chart's values, closed everywhere (an unknown key is an
  error), with each role's `settings` derived from its declaration, so the chart accepts exactly
  the options `splitfed serve ROLE` has, and its replicas, gpu and backoffLimit as declared;
- helm/splitfed/files/roles.json: what the templates need to know of each role (its values key,
  the family whose shared settings it takes, whether it signs, names or reads the data set, owns
  data of its own, takes a task, is a peer), read with `.Files.Get` (templates/_helpers.tpl,
  splitfed.roles).

    python ci/chart_schema.py           # write them
    python ci/chart_schema.py --check   # exit 1 if a committed one is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from splitfed.cluster.values import FAMILIES, MANAGED
from splitfed.config import Option
from splitfed.roles.declaration import Replicas
from splitfed.roles.registry import ROLES

CHART = Path(__file__).resolve().parent.parent / "helm" / "splitfed"
SCHEMA_PATH = CHART / "values.schema.json"
ROLES_PATH = CHART / "files" / "roles.json"

# MANAGED: options the chart sets itself, never in `settings`; FAMILIES: the roles each family's
# shared settings reach. They live with the run options -> values mapping of `splitfed launch`.
REPLICAS = {Replicas.ONE: {"maximum": 1}, Replicas.ANY: {}, Replicas.AT_LEAST_ONE: {"minimum": 1}}
PATTERN_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def closed(properties: dict, required: list[str] | None = None, **extra) -> dict:
    schema = {"type": "object", "additionalProperties": False, "properties": properties, **extra}
    if required:
        schema["required"] = required
    return schema


def string_map() -> dict:
    """labels, node selectors: names to text."""
    return {"type": "object", "additionalProperties": {"type": "string"}}


STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
QUANTITY = {"type": ["string", "number"]}
COUNT = {"type": "integer", "minimum": 0}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}
SECRET_NAME = {"type": "string", "pattern": r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
SECRET_KEY = {"type": "string", "pattern": r"^$|^[-._a-zA-Z0-9]+$"}
K8S_OBJECT = {"type": "object"}  # a Kubernetes structure passed through (the API server checks it)

IMAGE = closed({
    "repository": {"type": "string", "minLength": 1},
    "tag": STRING,
    "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
}, ["repository", "tag", "pullPolicy"])
RESOURCES = closed({
    "requests": {"type": "object", "additionalProperties": QUANTITY},
    "limits": {"type": "object", "additionalProperties": QUANTITY},
})
TOLERATIONS = {"type": "array", "items": closed({
    "key": STRING, "operator": {"enum": ["Exists", "Equal"]}, "value": STRING,
    "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute", ""]}, "tolerationSeconds": {"type": "integer"},
})}
AFFINITY = closed({"nodeAffinity": K8S_OBJECT, "podAffinity": K8S_OBJECT, "podAntiAffinity": K8S_OBJECT})
ENV_VARS = {"type": "array", "items": closed({
    "name": {"type": "string", "pattern": r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"},
    "value": STRING,
    "valueFrom": closed({"secretKeyRef": K8S_OBJECT, "configMapKeyRef": K8S_OBJECT, "fieldRef": K8S_OBJECT,
                         "resourceFieldRef": K8S_OBJECT}),
}, ["name"])}
PROBES = closed({
    "enabled": BOOLEAN,
    "initialDelaySeconds": COUNT,
    "periodSeconds": {"type": "integer", "minimum": 1},
    "failureThreshold": {"type": "integer", "minimum": 1},
}, ["enabled"])
VOLUME_SOURCE = {
    "type": "object", "additionalProperties": False, "maxProperties": 1,
    "properties": {name: K8S_OBJECT for name in (
        "persistentVolumeClaim", "hostPath", "nfs", "csi", "configMap", "emptyDir", "ephemeral", "image")},
}
# A GPU count without gpu.enabled is refused: it would otherwise be silently ignored.
# How pods of one component spread over nodes (the chart's splitfed.affinity).
ANTI_AFFINITY = {"enum": ["preferred", "required", "none"]}
ACCESS_MODE_NAMES = ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]  # a claim's
# A writer's volume: ReadOnlyMany would not do.
ACCESS_MODES = {"type": "array", "uniqueItems": True, "items": {"enum": [mode for mode in ACCESS_MODE_NAMES if mode != "ReadOnlyMany"]}}
DNS_SUBDOMAIN = {"type": "string", "maxLength": 253, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
GPU = {
    **closed({"enabled": BOOLEAN, "count": {"type": ["integer", "null"], "minimum": 1}}, ["enabled"]),
    "if": {"properties": {"count": {"type": "integer"}}, "required": ["count"]},
    "then": {"properties": {"enabled": {"const": True}}},
}


def option_schema(option: Option) -> dict:
    base = {int: "integer", float: "number", bool: "boolean"}.get(option.type, "string")
    schema: dict = {"type": [base, "null"] if option.optional else base, "description": option.help}
    if option.choices:
        schema["enum"] = [*option.choices, *([None] if option.optional else [])]
    if option.min is not None:
        schema["minimum"] = option.min
    if option.max is not None:
        schema["maximum"] = option.max
    if option.pattern:
        schema["pattern"] = f"^(?:{option.pattern})$"
    return schema


def settings_options(role: str) -> dict[str, Option]:
    """A role's options the user may set, by values key (the flag without its dashes)."""
    return {option.flag[2:]: option for option in ROLES[role].options() if option.name not in MANAGED}


def settings_schema(*roles: str) -> dict:
    """The options every one of `roles` accepts (one role: its own settings)."""
    keys = set.intersection(*(set(settings_options(role)) for role in roles))
    first = settings_options(roles[0])
    return {**closed({key: option_schema(first[key]) for key in sorted(keys)}), "default": {}}


def role_schema(role: str) -> dict:
    spec = ROLES[role]
    properties = {
        "enabled": BOOLEAN,
        "image": IMAGE,
        "replicas": {**COUNT, **REPLICAS[spec.replicas]},
        "resources": RESOURCES,
        "nodeSelector": string_map(),
        "tolerations": TOLERATIONS,
        "affinity": AFFINITY,
        "extraEnv": ENV_VARS,
        "settings": settings_schema(role),
        "probes": PROBES,
    }
    if spec.torch:  # only a role that runs torch can use a GPU
        properties["gpu"] = GPU
    if spec.job:
        properties["backoffLimit"] = COUNT
    if role == "fedavg-server":
        properties["antiAffinity"] = ANTI_AFFINITY
        properties["persistence"] = closed({"enabled": BOOLEAN, "size": QUANTITY, "storageClass": STRING,
                                            "accessModes": ACCESS_MODES, "existingClaim": SECRET_NAME}, ["enabled"])
    return closed(properties, ["enabled", "image", "replicas", "resources"])


def data_option(name: str) -> dict:
    """A data option the chart sets from `data:` (empty: the roles' default), as declared."""
    (option,) = [option for option in ROLES["fedavg-worker"].options() if option.name == name]
    schema: dict = {"type": "string", "description": option.help}
    if option.pattern:
        schema["pattern"] = f"^$|^(?:{option.pattern})$"
    return schema


PLACEHOLDERS = "{party} (the party's name: worker-0, split-client-1, p2p-peer-2...) and {index} (its ordinal)"


def data_schema() -> dict:
    """data: the data set and its options, and where each pod's data comes from (templates/_helpers.tpl,
    splitfed.roleData; templates/validate.yaml allows one source and checks the placeholders)."""
    return closed({
        "dataset": {"enum": list(settings_enum("dataset"))},
        "labelColumn": data_option("label_column"),
        "classes": data_option("classes"),
        "imageSize": data_option("image_size"),
        "volume": VOLUME_SOURCE,
        "mountPath": {"type": "string", "pattern": "^/"},
        "perParty": closed({
            "hostPath": {"type": "string", "description": f"A folder on each node with {PLACEHOLDERS} in it, e.g. /srv/data/{{party}}."},
            "existingClaim": {"type": "string",
                              "description": "One existing claim with a folder per party (no placeholders: a pod template cannot name a claim per pod)."},
            "folder": {"type": "string", "minLength": 1, "description": f"The party's folder inside existingClaim, with {PLACEHOLDERS}."},
            "volumeClaimTemplate": {
                **closed({"size": QUANTITY, "storageClassName": STRING,
                          "accessModes": {"type": "array", "uniqueItems": True, "items": {"enum": ACCESS_MODE_NAMES}}}),
                "description": "A claim per pod, for the roles that run as StatefulSets (a Job has no claim templates).",
                # set at all: it needs its size
                "if": {"minProperties": 1}, "then": {"required": ["size"]},
            },
        }),
        "servers": {"type": "boolean", "description": "Give the servers (fedavg-server, split-server) data: false with evaluate parties."},
    })


# A Python identifier path, package.module, as --task takes it.
MODULE = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"


def task_schema() -> dict:
    return closed({
        "file": {"type": "string", "description": "The task file's text (--set-file task.file=my_task.py), in a ConfigMap of the chart's."},
        "configMap": SECRET_NAME,
        "key": {"type": "string", "pattern": r"^[-._a-zA-Z0-9]+\.py$", "description": "The task file's name in the ConfigMap."},
        "module": {"type": "string", "pattern": f"^$|^{MODULE}$", "description": "A module the images carry (package.module)."},
    })


def monitor_schema() -> dict:
    return closed({"enabled": BOOLEAN, "interval": DURATION, "labels": string_map()}, ["enabled"])


# A label's name (optional DNS-subdomain prefix/) and value, as Kubernetes accepts them.
LABEL_KEY = {"type": "string", "maxLength": 316,
             "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"}
LABEL_VALUE = {"type": "string", "maxLength": 63, "pattern": r"^$|^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"}


def metrics_schema() -> dict:
    return closed({
        "port": PORT,
        "podMonitor": monitor_schema(),
        "serviceMonitor": monitor_schema(),
        "prometheusRule": closed({"enabled": BOOLEAN, "labels": string_map()}, ["enabled"]),
        "dashboards": closed({
            "enabled": BOOLEAN,
            "label": LABEL_KEY,
            "labelValue": LABEL_VALUE,
            "annotations": string_map(),
            "namespace": {"type": "string", "maxLength": 63, "pattern": "^$|" + PATTERN_DNS_LABEL},
        }, ["enabled"]),
    })


def schema() -> dict:
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "splitfed chart values (generated by ci/chart_schema.py from the role declarations)",
        **closed({
            "nameOverride": STRING,
            "fullnameOverride": STRING,
            "session": {"type": "string", "pattern": r"^$|^[A-Za-z0-9_.-]{1,64}$"},
            "commonLabels": string_map(),
            "imagePullSecrets": {"type": "array", "items": closed({"name": STRING}, ["name"])},
            "clusterDomain": DNS_SUBDOMAIN,
            "queueType": {"enum": ["", *settings_enum("queue_type")]},
            "serviceAccount": closed({"create": BOOLEAN, "name": STRING}),
            "data": data_schema(),
            "task": task_schema(),
            "metrics": metrics_schema(),
            "networkPolicy": closed({
                "enabled": BOOLEAN,
                "metricsFrom": {"type": "array", "items": K8S_OBJECT},
                "externalBrokerCIDRs": {"type": "array", "items": STRING, "minItems": 1},
            }),
            "gpu": closed({
                "resourceName": {"type": "string", "minLength": 1},
                "imageTagSuffix": STRING,
                "nodeSelector": string_map(),
                "tolerations": TOLERATIONS,
            }),
            "broker": closed({
                "vhost": {"type": "string", "minLength": 1},
                "external": {
                    **closed({
                        "enabled": BOOLEAN,
                        "host": STRING,
                        "port": PORT,
                        "existingSecret": SECRET_NAME,
                        "usernameKey": SECRET_KEY,
                        "passwordKey": SECRET_KEY,
                        "urlKey": SECRET_KEY,
                        "tls": closed({
                            "enabled": BOOLEAN, "existingSecret": SECRET_NAME,
                            "caKey": SECRET_KEY, "certKey": SECRET_KEY, "keyKey": SECRET_KEY,
                        }),
                    }),
                    # An external broker needs its credentials Secret, and a host unless the whole URL is in it.
                    "if": {"properties": {"enabled": {"const": True}}, "required": ["enabled"]},
                    "then": {"properties": {"existingSecret": {"minLength": 1}}},
                },
                "rabbitmq": closed({
                    "replicas": {"type": "integer", "minimum": 1},
                    "antiAffinity": ANTI_AFFINITY,
                    "image": IMAGE,
                    "auth": closed({"existingSecret": SECRET_NAME, "username": {"type": "string", "minLength": 1},
                                    "password": STRING, "erlangCookie": STRING}),
                    "persistence": closed({"size": QUANTITY, "storageClass": STRING}),
                    "resources": RESOURCES,
                    "nodeSelector": string_map(),
                    "tolerations": TOLERATIONS,
                    "affinity": AFFINITY,
                }),
            }),
            "keys": closed({"existingSecret": SECRET_NAME, "keyListKey": SECRET_KEY}),
            **{family: closed({"settings": settings_schema(*roles)}) for family, roles in FAMILIES.items()},
            **{spec.values_key: role_schema(role) for role, spec in ROLES.items()},
        }),
    }


def settings_enum(name: str) -> tuple[str, ...]:
    for option in ROLES["fedavg-worker"].options():
        if option.name == name and option.choices:
            return option.choices
    raise LookupError(f"no choices declared for {name}")


def chart_roles() -> dict:
    """files/roles.json: per role, what the templates do by it (templates/_role.tpl)."""
    return {role: {
        "valuesKey": spec.values_key,
        # the families whose shared settings it takes: none for a role without learning settings
        # (the relay); of several (the p2p-tracker), the one of the release's peers
        "settingsFamilies": list(spec.families) if spec.learning is not None else [],
        "signs": spec.signs,
        "namesData": spec.names_data,
        "readsData": spec.reads_data,
        # a data owner (its replicas are the run's workers, clients or peers), which reads its data
        # whatever data.servers says; a server that reads data only scores the global model on it
        "dataOwner": spec.reads_data and spec.counts is not None,
        # the task is torch code: a role that takes --task and runs torch (not the split-fed)
        "takesTask": spec.torch and any(option.name == "task" for option in spec.options()),
        "peer": spec.counts == "peers",
    } for role, spec in ROLES.items()}


def as_json(document: dict) -> str:
    return json.dumps(document, indent=2) + "\n"


def outputs() -> dict[Path, str]:
    return {SCHEMA_PATH: as_json(schema()), ROLES_PATH: as_json(chart_roles())}


def main(argv: list[str]) -> int:
    written = outputs()
    if argv[1:] == ["--check"]:
        stale = [path for path, text in written.items() if not path.is_file() or path.read_text() != text]
        for path in stale:
            print(f"{path.relative_to(CHART.parent.parent)} is out of date: run python ci/chart_schema.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in written.items():
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
