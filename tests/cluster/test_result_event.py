"""A role run by `splitfed serve` with --progress-events prints its progress events and, last, a
"result" event holding its result: what `splitfed launch` reads from the lead pod's log."""

from __future__ import annotations

import contextlib
import json

from splitfed.roles import service
from splitfed.roles.declaration import Progress, RoleSpec
from splitfed.roles.deployment import Party
from splitfed.cluster.watch import result_in

RESULT = {"accuracy": 0.75, "loss": 0.6, "history": [{"step": 1, "accuracy": 0.75, "loss": 0.6, "train_loss": 0.7, "seconds": 1.0}],
          "traffic": {"messages": 4, "bytes": 1024}}


class Lead:
    def __init__(self, on_progress):
        self.on_progress = on_progress

    def run(self) -> dict:
        if self.on_progress:
            self.on_progress(Progress("epoch", 1, 1, 0.7, RESULT["history"][0]))
        return RESULT


SPEC = RoleSpec("test-lead", "A lead role that trains nothing.", None, Party, lambda learning, deployment, transport, identity, sink: Lead(sink), ())


def serve(monkeypatch, capsys, *flags: str) -> list[str]:
    monkeypatch.setattr(service, "connect", lambda *args, **kwargs: contextlib.nullcontext(object()))
    values = {"session": "s1", **{flag: True for flag in flags}}
    assert service.serve(SPEC, values) == RESULT
    return capsys.readouterr().out.splitlines()


def test_the_result_is_the_last_progress_line(monkeypatch, capsys):
    lines = serve(monkeypatch, capsys, "progress_events")
    assert [json.loads(line)["event"] for line in lines] == ["epoch", "result"]
    assert json.loads(lines[-1]) == {"event": "result", "done": 0, "total": 0, "loss": 0.0, "record": RESULT}
    assert result_in("\n".join(lines)) == RESULT


def test_without_progress_events_nothing_is_printed(monkeypatch, capsys):
    assert serve(monkeypatch, capsys) == []
