"""The `kubernetes` client, connected and checked: one short request decides whether a cluster
answers, so that every command without one fails within seconds with one line, never a hang or
a traceback. `Kube` holds the requests the commands make. The client is the `cluster` extra,
imported here only (`watch` takes the connected core API as it is).

Every request after that first one goes through `request`, the one retry policy (`Backoff`): an
API server that is busy (429, whose Retry-After is honoured) or failing (5xx), or a connection
that drops or times out, is asked again after a growing pause, a bounded number of times, then
one line names the request and its last error. A refusal (403) is not retried: its line names the
permission that is missing."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

PROBE_TIMEOUT = (3.0, 5.0)  # (connect, read) seconds of the first request
REQUEST_TIMEOUT = (5.0, 30.0)  # every later request
LOG_TIMEOUT = (5.0, 60.0)  # reading a pod's whole log
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
HINT = "check KUBECONFIG / --kube-context"
RETRIED = frozenset({429, 500, 502, 503, 504})  # busy, or failing for now: asked again
_sleep = time.sleep  # the pause between tries; tests record it instead of waiting

T = TypeVar("T")


class ClusterError(RuntimeError):
    """No usable cluster, or no client to reach one; the message is one line."""


class ApiError(ClusterError):
    """The API server kept failing a request (429, 5xx, dropped connections) through every retry."""


class Forbidden(ClusterError):
    """The API server refused a request (403); the message names the permission that is missing."""


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
    for pattern in (r"\[Errno -?\d+\] ([^'\")\]]+)", r"(timed out)", r"(certificate verify failed[^'\")]*)", r"(Name or service not known)",
                    r"(Connection broken|Response ended prematurely)"):  # the last: a connection dropped mid-answer
        if found := re.search(pattern, text):
            return found.group(1).strip().rstrip(".").lower()
    return text.splitlines()[0][:200] if text else type(exc).__name__


@dataclass
class Kube:
    """A checked connection: the core API, the namespace to use, and the context's name. Each
    request goes through `request` (retried, a refusal named); `log_stream` is the exception,
    retried as a whole by its caller, since a stream can break after it opened."""

    core: Any  # kubernetes.client.CoreV1Api
    namespace: str
    server: str
    context: str | None

    def pods(self, selector: str, all_namespaces: bool = False) -> list[Any]:
        """The pods with these labels, in the namespace or in every one."""
        if all_namespaces:
            return request(f"list the pods labelled {selector} in every namespace", self.core.list_pod_for_all_namespaces,
                           label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items
        return request(f"list the pods labelled {selector} in namespace {self.namespace}", self.core.list_namespaced_pod, self.namespace,
                       label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items

    def log(self, pod: str, namespace: str | None = None, timeout: tuple[float, float] = REQUEST_TIMEOUT, **options: Any) -> str:
        """A pod's log (`options`: tail_lines, previous...) in `namespace`, by default the connection's."""
        namespace = namespace or self.namespace
        return request(f"read the log of pod {pod} in namespace {namespace}", self.core.read_namespaced_pod_log, pod, namespace,
                       _request_timeout=timeout, **options)

    @contextmanager
    def log_stream(self, pod: str, **options: Any) -> Iterator[Iterator[str]]:
        """A pod's log as it grows, line by line, until the pod ends. No read timeout: a quiet
        role is not a dead one."""
        response = self.core.read_namespaced_pod_log(pod, self.namespace, follow=True, _preload_content=False, **options)
        try:
            yield _lines(response.stream(4096))
        finally:
            response.release_conn()

    def put_secret(self, name: str, labels: dict[str, str], files: dict[str, bytes]) -> None:
        """Create the Opaque Secret `name` holding `files`, or replace the one there; a namespace
        that is not there yet is made (as helm would make it)."""
        kubernetes = client()
        meta = kubernetes.client.V1ObjectMeta
        body = kubernetes.client.V1Secret(metadata=meta(name=name, labels=labels), type="Opaque",
                                          data={key: base64.b64encode(content).decode() for key, content in files.items()})
        where = f"in namespace {self.namespace}"
        for attempt in range(2):
            try:
                request(f"create Secret {name} {where}", self.core.create_namespaced_secret, self.namespace, body, _request_timeout=REQUEST_TIMEOUT)
                return
            except kubernetes.client.ApiException as exc:
                if exc.status == 409:
                    request(f"replace Secret {name} {where}", self.core.replace_namespaced_secret, name, self.namespace, body,
                            _request_timeout=REQUEST_TIMEOUT)
                    return
                if exc.status == 404 and attempt == 0:
                    request(f"create namespace {self.namespace}", self.core.create_namespace,
                            kubernetes.client.V1Namespace(metadata=meta(name=self.namespace)), _request_timeout=REQUEST_TIMEOUT)
                    continue
                raise

    def secrets(self, selector: str) -> list[Any]:
        return request(f"list the Secrets labelled {selector} in namespace {self.namespace}", self.core.list_namespaced_secret, self.namespace,
                       label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items

    def delete_secret(self, name: str) -> None:
        request(f"delete Secret {name} in namespace {self.namespace}", self.core.delete_namespaced_secret, name, self.namespace,
                _request_timeout=REQUEST_TIMEOUT)

    def volume_claims(self, selector: str) -> list[Any]:
        return request(f"list the volume claims labelled {selector} in namespace {self.namespace}", self.core.list_namespaced_persistent_volume_claim,
                       self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT).items

    def delete_volume_claim(self, name: str) -> None:
        request(f"delete volume claim {name} in namespace {self.namespace}", self.core.delete_namespaced_persistent_volume_claim, name,
                self.namespace, _request_timeout=REQUEST_TIMEOUT)


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """The lines of a stream of chunks (a line may span chunks), without their line ends."""
    pending = b""
    for chunk in chunks:
        *whole, pending = (pending + chunk).split(b"\n")
        yield from (line.decode(errors="replace") for line in whole)
    if pending:
        yield pending.decode(errors="replace")


def from_client(exc: BaseException) -> bool:
    """Whether the client raised `exc` (ApiException, urllib3's MaxRetryError...)."""
    return type(exc).__module__.split(".")[0] in ("kubernetes", "urllib3")


def server_message(exc: BaseException) -> str:
    """The API server's message: a Status's `message`, else the first line of a text body (the
    API server's throttling answers 429 in plain text)."""
    body = getattr(exc, "body", None)
    if not body:
        return ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    try:
        message = json.loads(text).get("message", "")
    except (ValueError, AttributeError):
        message = text.strip().splitlines()[0] if text.strip() else ""
    return str(message)[:300]


def describe(exc: BaseException) -> str:
    """An ApiException's status and the API server's message, or a connection problem."""
    if isinstance(exc, ClusterError):
        return str(exc)
    if status := getattr(exc, "status", None):
        message = server_message(exc)
        return f"{status} {getattr(exc, 'reason', '') or ''}".strip() + (f": {message}" if message else "")
    return why(exc)


# -- the retry policy -------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """How long to wait before a request's next try: what the API server asked for (Retry-After),
    else `first` seconds doubling with each try, never more than `longest`; `attempts` tries in all."""

    attempts: int = 6
    first: float = 1.0
    longest: float = 60.0

    def delay(self, tries: int, exc: BaseException) -> float:
        asked = retry_after(exc)
        return min(self.longest, asked if asked is not None else self.first * 2 ** (tries - 1))


BACKOFF = Backoff()


def retry_after(exc: BaseException) -> float | None:
    """The seconds of a Retry-After header (the API server sends one with its 429s and with the
    503 of a server shutting down), if there is one."""
    value = ((getattr(exc, "headers", None) or {}).get("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None


def transient(exc: BaseException) -> bool:
    """Worth a retry: a busy or failing API server, or a connection that dropped or timed out
    (urllib3's ProtocolError, ReadTimeoutError, MaxRetryError; an ApiException of status 0, the
    client's word for no answer). Not the client's checks of its own arguments."""
    status = getattr(exc, "status", None)
    if status is not None:
        return status == 0 or status in RETRIED
    return type(exc).__module__.split(".")[0] == "urllib3" or isinstance(exc, OSError)


_CANNOT = re.compile(r'(User "[^"]*") cannot (\S+) resource "([^"]+)" in API group "([^"]*)"(?: in the namespace "([^"]+)"| at the cluster scope)')


def refusal(exc: BaseException, what: str) -> str:
    """A 403's line: the permission the API server's message names (RBAC says which user lacks
    which verb on which resource, where), else its message as it is."""
    message = server_message(exc)
    found = _CANNOT.search(message)
    if not found:
        return f"the Kubernetes API refused to {what}: {describe(exc)}"
    user, verb, resource, group, namespace = found.groups()
    where = f"in namespace {namespace}" if namespace else "at the cluster scope"
    return (f"the Kubernetes API refused to {what}: {user} lacks the permission {verb} {resource}{'.' + group if group else ''} {where}; "
            f"grant it with a {'Role and RoleBinding' if namespace else 'ClusterRole and ClusterRoleBinding'}")


def request(what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """call(*args, **kwargs), tried again per BACKOFF while the API server is busy or failing or
    the connection drops. Forbidden names the missing permission; ApiError, after the last try,
    names the request (`what`: "list the pods of release fl") and its last error. Other errors
    (400, 404, 409...) are the caller's."""
    tries = 1
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            if getattr(exc, "status", None) == 403:
                raise Forbidden(refusal(exc, what)) from None
            if not transient(exc):
                raise
            if tries >= BACKOFF.attempts:
                raise ApiError(f"the Kubernetes API failed to {what} {tries} times in a row; the last error: {describe(exc)}") from None
            _sleep(BACKOFF.delay(tries, exc))
            tries += 1


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
    from urllib3.util import Retry

    # One more try of a refused connection, so that a silent server fails fast; never a retry on
    # an answer, not even a 429's Retry-After, which urllib3 would wait out unseen: `request` does
    # that, with its backoff.
    configuration.retries = Retry(total=1, respect_retry_after_header=False)
    api_client = kubernetes.client.ApiClient(configuration)
    try:
        kubernetes.client.VersionApi(api_client).get_code(_request_timeout=PROBE_TIMEOUT)
    except kubernetes.client.ApiException as exc:
        raise ClusterError(f"the Kubernetes cluster at {configuration.host} refused us: {describe(exc)}; {HINT}") from None
    except Exception as exc:  # urllib3 and ssl errors: anything means no cluster
        raise ClusterError(f"no reachable Kubernetes cluster at {configuration.host}: {why(exc)}; {HINT}") from None
    return Kube(kubernetes.client.CoreV1Api(api_client), namespace or default_namespace, configuration.host, context)
