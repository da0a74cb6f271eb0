"""FakeCoreV1Api: a stand-in for the API server, which cannot run here (no API server, kind or
Docker can run on this machine).

It is a plain HTTP server on 127.0.0.1 that answers the requests of the real `kubernetes` Python
client, and of the real helm, with RECORDED API responses: the JSON files in recorded/, shaped as
a Kubernetes 1.30 API server sends them (PodList, EventList, SecretList, Job, StatefulSet,
ReplicaSet, Status, discovery documents, and pod logs as text). A .http file holds a whole
response as it travels (status line, headers, blank line, body), for the answers whose headers
matter: API Priority and Fairness's 429 (plain text, with Retry-After), the 503 of an API server
shutting down (a Status, with Retry-After). They were written
for these tests in that shape, not captured from a cluster: none was reachable where they were
made. A route may hold a sequence of responses (pods pending, then running, then finished): each
request takes the next, and the last one repeats. `dropped` makes a response whose connection
breaks off partway through its body, as a dropped connection does. Every request is kept, so
tests check which API calls a command made. No API server runs: nothing is scheduled, stored or
validated; what comes back is only what was recorded."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

RECORDED = Path(__file__).resolve().parent / "recorded"
NAMESPACE = "ns1"


def recorded(name: str) -> bytes:
    return (RECORDED / name).read_bytes()


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    cut: int | None = None  # the connection drops after this many bytes of the body


def reply(name: str, status: int = 200) -> Response:
    """A recorded response file: .json as application/json, .log as text/plain (as pod logs come),
    .http as it is written (its status, headers and body)."""
    if name.endswith(".http"):
        return wire(recorded(name))
    return Response(status, recorded(name), "text/plain" if name.endswith(".log") else "application/json")


def wire(raw: bytes) -> Response:
    """A response written as it travels: status line, headers, a blank line, the body."""
    head, _, body = raw.partition(b"\n\n")
    status_line, *lines = head.decode().splitlines()
    headers = dict(line.split(": ", 1) for line in lines)
    return Response(int(status_line.split()[1]), body, headers.pop("Content-Type"), headers)


def dropped(name: str, after: int) -> Response:
    """The recorded response `name`, sent in chunks as a streamed one is, its connection closed
    after `after` bytes of the body, before the end of the stream."""
    return replace(reply(name), cut=after)


@dataclass
class Route:
    method: str
    path: str
    query: dict[str, str]
    responses: list[Response]

    def matches(self, method: str, path: str, query: dict[str, str]) -> bool:
        return method == self.method and path == self.path and all(query.get(k) == v for k, v in self.query.items())

    def next(self) -> Response:
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: bytes


@dataclass
class FakeCoreV1Api:
    """See the module docstring. `add` routes, `start`, then point KUBECONFIG at `kubeconfig()`."""

    routes: list[Route] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    def add(self, method: str, path: str, *responses: Response | str, **query: str) -> FakeCoreV1Api:
        """Answer METHOD PATH (with at least these query parameters) with the responses, in turn.
        Routes added later win over earlier ones."""
        found = [reply(r) if isinstance(r, str) else r for r in responses]
        self.routes.insert(0, Route(method, path, query, found))
        return self

    def start(self) -> FakeCoreV1Api:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                parts = urlsplit(self.path)
                query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                api.requests.append(Request(self.command, parts.path, query, self.rfile.read(length) if length else b""))
                route = next((r for r in api.routes if r.matches(self.command, parts.path, query)), None)
                response = route.next() if route else Response(404, json.dumps({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": f"the server could not find the requested resource ({self.command} {parts.path})",
                    "reason": "NotFound", "details": {}, "code": 404}).encode())
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                for header, value in response.headers.items():
                    self.send_header(header, value)
                if response.cut is None:
                    self.send_header("Content-Length", str(len(response.body)))
                    self.end_headers()
                    self.wfile.write(response.body)
                    return
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                part = response.body[:response.cut]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))  # and no last, empty chunk
                self.wfile.flush()
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, folder: Path, namespace: str = NAMESPACE) -> Path:
        """A kube config whose one context points at this stand-in."""
        path = folder / "kubeconfig"
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "recorded",
            "clusters": [{"name": "recorded", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "recorded-responses-only"}}],
            "contexts": [{"name": "recorded", "context": {"cluster": "recorded", "user": "tester", "namespace": namespace}}],
        }))
        return path

    def made(self, method: str | None = None, path_part: str = "") -> list[Request]:
        return [r for r in self.requests if (method is None or r.method == method) and path_part in r.path]
