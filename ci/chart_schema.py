"""Write helm/splitfed/values.schema.json: the chart's values, closed everywhere (an unknown key
is an error), with each role's `settings` derived from its declaration in
splitfed.roles.registry, so the chart accepts exactly the options `splitfed serve ROLE` has.

    python ci/chart_schema.py           # write the schema
    python ci/chart_schema.py --check   # exit 1 if the committed schema is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from splitfed.cluster.values import FAMILIES, MANAGED, ROLE_KEYS
from splitfed.config import Option
from splitfed.roles.registry import ROLES

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "helm" / "splitfed" / "values.schema.json"

# MANAGED: options the chart sets itself, never in `settings`; ROLE_KEYS: the values key of
# each role; FAMILIES: the roles each family's shared settings reach. They live with the run
# options -> values mapping of `splitfed launch`.
TORCH_ROLES = {"split-client", "split-server", "fedavg-server", "fedavg-worker", "p2p-peer", "smpl-peer"}  # the others: no gpu
SINGLETONS = {"relay", "split-server", "split-fed", "p2p-tracker"}  # one pod per session (fedavg-server: active + standbys)
AT_LEAST_ONE = {"split-client", "p2p-peer", "smpl-peer"}  # their replicas are the run's --clients, --peers (declared min 1)
JOBS = {"split-client", "split-server", "split-fed", "fedavg-server", "p2p-tracker", "p2p-peer", "smpl-peer"}  # the p2p roles with the tracker's expect-peers > 0
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
# A writer's volume: ReadOnlyMany would not do.
ACCESS_MODES = {"type": "array", "uniqueItems": True, "items": {"enum": ["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]}}
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
    properties = {
        "enabled": BOOLEAN,
        "image": IMAGE,
        "replicas": {**COUNT, **({"maximum": 1} if role in SINGLETONS else {}), **({"minimum": 1} if role in AT_LEAST_ONE else {})},
        "resources": RESOURCES,
        "nodeSelector": string_map(),
        "tolerations": TOLERATIONS,
        "affinity": AFFINITY,
        "extraEnv": ENV_VARS,
        "settings": settings_schema(role),
        "probes": PROBES,
    }
    if role in TORCH_ROLES:
        properties["gpu"] = GPU
    if role in JOBS:
        properties["backoffLimit"] = COUNT
    if role == "fedavg-server":
        properties["antiAffinity"] = ANTI_AFFINITY
        properties["persistence"] = closed({"enabled": BOOLEAN, "size": QUANTITY, "storageClass": STRING,
                                            "accessModes": ACCESS_MODES, "existingClaim": SECRET_NAME}, ["enabled"])
    return closed(properties, ["enabled", "image", "replicas", "resources"])


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
            "data": closed({
                "dataset": {"enum": list(settings_enum("dataset"))},
                "volume": VOLUME_SOURCE,
                "mountPath": {"type": "string", "pattern": "^/"},
            }),
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
            **{key: role_schema(role) for role, key in ROLE_KEYS.items()},
        }),
    }


def settings_enum(name: str) -> tuple[str, ...]:
    for option in ROLES["fedavg-worker"].options():
        if option.name == name and option.choices:
            return option.choices
    raise LookupError(f"no choices declared for {name}")


def render() -> str:
    return json.dumps(schema(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH.name} is out of date: run python ci/chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
