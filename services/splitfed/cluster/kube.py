"""The `kubernetes` client, connected and checked: one short request decides whether a cluster
answers, so that every command without one fails within seconds with one line, never a hang or
a traceback. The client is the `cluster` extra, imported here only."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE_TIMEOUT = (3.0, 5.0)  # (connect, read) seconds of the first request
REQUEST_TIMEOUT = (5.0, 30.0)  # every later request
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HINT = "check KUBECONFIG / --kube-context"


class ClusterError(RuntimeError):
    """No usable cluster, or no client to reach one; the message is one line."""


def client() -> Any:
    """The kubernetes package, or one line that names the extra."""
    try:
        import kubernetes
    except ImportError:
        raise ClusterError("the Kubernetes client is not installed: pip install 'splitfed[cluster]' (the kubernetes package)") from None
    return kubernetes


def why(exc: BaseException) -> str:
    """A short reason from whatever urllib3 or the client raised."""
    text = str(getattr(exc, "reason", None) or exc)
    for pattern in (r"\[Errno -?\d+\] ([^'\")\]]+)", r"(timed out)", r"(certificate verify failed[^'\")]*)", r"(Name or service not known)"):
        if found := re.search(pattern, text):
            return found.group(1).strip().rstrip(".").lower()
    return text.splitlines()[0][:200] if text else type(exc).__name__


@dataclass
class Kube:
    """A checked connection: the core API, the namespace to use, and the context's name."""

    core: Any  # kubernetes.client.CoreV1Api
    namespace: str
    server: str
    context: str | None

    def api_error(self, exc: BaseException) -> ClusterError:
        return ClusterError(f"the cluster at {self.server} failed a request: {describe(exc)}")


def describe(exc: BaseException) -> str:
    """An ApiException's status and the API server's message, or a connection problem."""
    status, body = getattr(exc, "status", None), getattr(exc, "body", None)
    if status:
        message = ""
        if body:
            import json

            try:
                message = json.loads(body).get("message", "")
            except (ValueError, AttributeError):
                message = str(body)[:200]
        return f"{status} {getattr(exc, 'reason', '') or ''}".strip() + (f": {message}" if message else "")
    return why(exc)


def connect(context: str | None = None, namespace: str | None = None) -> Kube:
    """Load the kube config (KUBECONFIG or ~/.kube/config; in a pod, its service account), then
    make one short request. ClusterError says why nothing answers."""
    kubernetes = client()
    from kubernetes.config.config_exception import ConfigException

    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings are not ours to print
    configuration = kubernetes.client.Configuration()
    default_namespace = "default"
    try:
        # Read KUBECONFIG now: the client's default is the value it had when kubernetes was imported.
        config_file = os.environ.get("KUBECONFIG") or "~/.kube/config"
        kubernetes.config.load_kube_config(config_file=config_file, context=context, client_configuration=configuration)
        contexts, active = kubernetes.config.list_kube_config_contexts(config_file=config_file)
        if context:
            active = next((c for c in contexts if c["name"] == context), active)
        default_namespace = (active or {}).get("context", {}).get("namespace") or "default"
    except (ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        loaded = False
        if context is None:
            try:
                kubernetes.config.load_incluster_config(client_configuration=configuration)
                default_namespace = IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.is_file() else "default"
                loaded = True
            except ConfigException:
                pass
        if not loaded:
            raise ClusterError(f"no reachable Kubernetes cluster: no usable kube config ({why(exc)}); {HINT}") from None
    configuration.retries = 1  # a refused or silent server fails fast; the watch retries on its own
    api_client = kubernetes.client.ApiClient(configuration)
    try:
        kubernetes.client.VersionApi(api_client).get_code(_request_timeout=PROBE_TIMEOUT)
    except kubernetes.client.ApiException as exc:
        raise ClusterError(f"the Kubernetes cluster at {configuration.host} refused us: {describe(exc)}; {HINT}") from None
    except Exception as exc:  # urllib3 and ssl errors: anything means no cluster
        raise ClusterError(f"no reachable Kubernetes cluster at {configuration.host}: {why(exc)}; {HINT}") from None
    return Kube(kubernetes.client.CoreV1Api(api_client), namespace or default_namespace, configuration.host, context)
