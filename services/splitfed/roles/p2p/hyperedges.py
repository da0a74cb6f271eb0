"""How the tracker draws SMPL's hyperedges: peers that are free for another hyperedge say so
(`want`, with their validation loss); once --hyperedge-size of them are waiting (asynchronously),
or once every live peer is (--no-async-global: global rounds), the tracker draws a hyperedge of
them with a seeded generator (in global rounds, those left over from the last round first, then
the others in the order of their names), picks whose model it starts from (--epsilon: the best member's,
else a random member's), and tells each member (`hyperedge{edge, members, source}`). A member
reports when its part is done (`report{edge}`); the hyperedge closes when every member that is
still live has reported. No torch: the tracker trains nothing."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from splitfed.learning.hyperedge import choose_start, draw_members
from splitfed.learning.settings import HyperedgeSettings
from splitfed.protocol import Message, ProtocolError
from splitfed.roles.p2p.common import HYPEREDGE, finite

DRAWS = 32  # tries at a draw that meets --variety before waiting for more peers


@dataclass
class Edge:
    members: set[str]
    reported: set[str] = field(default_factory=set)


class Matchmaker:
    def __init__(self, settings: HyperedgeSettings, send: Callable[..., None], expected: int = 0):
        """`send(name, kind, **meta)` delivers to one peer; `expected`: the peers the run expects
        (0: unknown), whom global rounds wait for before the first draw."""
        self.settings = settings
        self.send = send
        self.expected = expected
        self.rng = random.Random(f"splitfed-smpl/{settings.seed}")
        self.waiting: dict[str, float] = {}  # peer -> its validation loss, in the order they asked
        self.left_over: set[str] = set()  # those still waiting after the last draws
        self.edges: dict[str, Edge] = {}  # open hyperedges by id

    def active(self) -> int:
        return len(self.edges)

    def open_edges(self, name: str) -> list[Edge]:
        return [edge for edge in self.edges.values() if name in edge.members]

    def check(self, message: Message) -> None:
        opened = message.meta.get("open")
        if finite(message.meta, "loss") is None:
            raise ProtocolError("malformed", "want needs the peer's validation loss")
        if not isinstance(opened, list) or len(opened) >= self.settings.max_hyperedges or not all(isinstance(edge, str) for edge in opened):
            raise ProtocolError("malformed", f"want lists the fewer than {self.settings.max_hyperedges} hyperedges the peer is still in")

    def want(self, name: str, meta: dict) -> None:
        """`name` has room for another hyperedge. The hyperedges it no longer lists are done for it
        (closed, or given up on a timeout): it is not waited for in them any more."""
        for edge_id in [edge_id for edge_id, edge in self.edges.items() if name in edge.members and edge_id not in meta["open"]]:
            self.report(name, edge_id)
        self.waiting[name] = meta["loss"]

    def report(self, name: str, edge_id: object) -> None:
        """`name` is done with `edge_id` (a report names it); closes the edge once all are."""
        edge = self.edges.get(edge_id) if isinstance(edge_id, str) else None
        if edge is not None and name in edge.members:
            edge.reported.add(name)
            if edge.reported >= edge.members:
                del self.edges[edge_id]

    def drop(self, gone: list[str], live: set[str], registered: int) -> None:
        """Peers that left or were evicted: no longer waiting, no longer waited for."""
        for name in gone:
            self.waiting.pop(name, None)
        for edge_id, edge in list(self.edges.items()):
            edge.members &= live
            if edge.reported >= edge.members:
                del self.edges[edge_id]
        self.form(live, registered)

    def form(self, live: set[str], registered: int) -> None:
        """Draw hyperedges while enough peers wait: at once (asynchronous), or only when every
        live peer waits and every expected peer has registered (global rounds), and then as many as fit. Once the session has had
        --hyperedge-size peers and fewer are live (the others finished or died), hyperedges shrink
        to the live peers, down to one peer training alone, so nobody waits for peers that are gone."""
        size = self.settings.hyperedge_size if registered < self.settings.hyperedge_size else max(1, min(self.settings.hyperedge_size, len(live)))
        if not self.settings.async_global:
            if not (live and live <= set(self.waiting)) or registered < self.expected:
                return
            # Those left over from the last round first (the longest waiting), then the others by
            # name, not in the order their wants came in: seeded, the draws repeat.
            self.waiting = {name: self.waiting[name] for name in [*(name for name in self.waiting if name in self.left_over),
                                                                  *sorted(name for name in self.waiting if name not in self.left_over)]}
        while len(self.waiting) >= size:
            members = self.draw(size)
            if members is None:
                break
            self.open(members)
        self.left_over = set(self.waiting)

    def draw(self, size: int) -> list[str] | None:
        """`size` waiting peers, the longest-waiting first, such that each has at least
        --variety members it shares no open hyperedge with; None if no draw found one."""
        return draw_members(list(self.waiting), size, self.rng, lambda members: all(
            self.newcomers(name, members) >= min(self.settings.variety, size - 1) for name in members), DRAWS)

    def newcomers(self, name: str, members: list[str]) -> int:
        partners = {partner for edge in self.open_edges(name) for partner in edge.members}
        return sum(1 for other in members if other != name and other not in partners)

    def open(self, members: list[str]) -> None:
        edge_id = uuid.uuid4().hex[:16]  # unique across tracker restarts, unlike a count
        losses = {name: self.waiting.pop(name) for name in members}
        source = choose_start(losses, self.settings.epsilon, self.rng)
        self.edges[edge_id] = Edge(set(members))
        for name in members:
            self.send(name, HYPEREDGE, edge=edge_id, members=sorted(members), source=source)
