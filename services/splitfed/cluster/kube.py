"""The `kubernetes` client, connected and checked: one short request decides whether a cluster
answers, so that every command without one fails within seconds with one line, never a hang or
a traceback. `Kube` holds the requests the commands make. The client is the `cluster` extra,
imported here only (`watch` takes the connected core API as it is)."""

from __future__ import annotations

import base64
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE_TIMEOUT = (3.0, 5.0)  # (connect, read) seconds of the first request
REQUEST_TIMEOUT = (5.0, 30.0)  # every later request
LOG_TIMEOUT = (5.0, 60.0)  # reading a pod's whole log
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
    """A checked connection: the core API, the namespace to use, and the context's name. Its
    requests raise what the client raises."""

    core: Any  # kubernetes.client.CoreV1Api
    namespace: str
    server: str
    context: str | None

    def pods(self, selector: str, all_namespaces: bool = False) -> list[Any]:
        """The pods with these labels, in the namespace or in every one."""
        if all_namespaces:
            return self.core.list_pod_for_all_namespaces(label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items
        return self.core.list_namespaced_pod(self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items

    def log(self, pod: str, namespace: str | None = None, timeout: tuple[float, float] = REQUEST_TIMEOUT, **options: Any) -> str:
        """A pod's log (`options`: tail_lines, previous...) in `namespace`, by default the connection's."""
        return self.core.read_namespaced_pod_log(pod, namespace or self.namespace, _request_timeout=timeout, **options)

    @contextmanager
    def log_stream(self, pod: str, **options: Any) -> Iterator[Iterator[bytes]]:
        """A pod's log as it grows, in chunks, until the pod ends. No read timeout: a quiet role
        is not a dead one."""
        response = self.core.read_namespaced_pod_log(pod, self.namespace, follow=True, _preload_content=False, **options)
        try:
            yield response.stream(4096)
        finally:
            response.release_conn()

    def put_secret(self, name: str, labels: dict[str, str], files: dict[str, bytes]) -> None:
        """Create the Opaque Secret `name` holding `files`, or replace the one there; a namespace
        that is not there yet is made (as helm would make it)."""
        kubernetes = client()
        meta = kubernetes.client.V1ObjectMeta
        body = kubernetes.client.V1Secret(metadata=meta(name=name, labels=labels), type="Opaque",
                                          data={key: base64.b64encode(content).decode() for key, content in files.items()})
        for attempt in range(2):
            try:
                self.core.create_namespaced_secret(self.namespace, body, _request_timeout=REQUEST_TIMEOUT)
                return
            except kubernetes.client.ApiException as exc:
                if exc.status == 409:
                    self.core.replace_namespaced_secret(name, self.namespace, body, _request_timeout=REQUEST_TIMEOUT)
                    return
                if exc.status == 404 and attempt == 0:
                    self.core.create_namespace(kubernetes.client.V1Namespace(metadata=meta(name=self.namespace)), _request_timeout=REQUEST_TIMEOUT)
                    continue
                raise

    def secrets(self, selector: str) -> list[Any]:
        return self.core.list_namespaced_secret(self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items

    def delete_secret(self, name: str) -> None:
        self.core.delete_namespaced_secret(name, self.namespace, _request_timeout=REQUEST_TIMEOUT)

    def volume_claims(self, selector: str) -> list[Any]:
        return self.core.list_namespaced_persistent_volume_claim(self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items

    def delete_volume_claim(self, name: str) -> None:
        self.core.delete_namespaced_persistent_volume_claim(name, self.namespace, _request_timeout=REQUEST_TIMEOUT)


def from_client(exc: BaseException) -> bool:
    """Whether the client raised `exc` (ApiException, urllib3's MaxRetryError...)."""
    return type(exc).__module__.split(".")[0] in ("kubernetes", "urllib3")


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
