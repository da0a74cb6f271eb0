"""Two fedavg-server processes on one session: one runs the rounds, the other waits as standby.
When the active one is killed mid-round the standby resumes from the shared checkpoint; a second
server started beside a live one neither stalls the run nor takes an update from it. Either
way the final model equals the uninterrupted plain loop's: nothing lost, nothing applied twice."""

import json

from splitfed.roles.fedavg.common import session_queues
from splitfed.scenarios import launch
from splitfed.scenarios.fedavg import FedAvgRun
from tests.integration.test_fedavg_resilience import (
    all_workers, assert_equals_reference, checkpoint_state, paused, process_group, roles, wait_for, with_rounds_to_spare,
)


def log_of(member) -> str:
    return member.log_path.read_text()


def test_the_standby_takes_over_when_the_active_server_dies(broker_url, session, tmp_path):
    settings = with_rounds_to_spare()
    checkpoint, out = tmp_path / "ckpt", tmp_path / "result.json"
    run = FedAvgRun(broker=broker_url, session=session, timeout=120, checkpoint_dir=checkpoint)
    server_launch, worker_launches = roles(settings, run, tmp_path)
    group = process_group(run)
    try:
        active = group.start(server_launch, name="server-a")
        wait_for(lambda: f"active for session {session} (epoch 1" in log_of(active), "the first server taking the lock")
        standby = group.start(server_launch.with_deployment(out=out), name="server-b")
        wait_for(lambda: "standby: another fedavg-server holds session" in log_of(standby), "the second server waiting as standby")
        workers = [group.start(worker) for worker in worker_launches]
        wait_for(lambda: checkpoint_state(checkpoint)["round"] >= 3, "round 2 on disk")
        with paused(*workers):  # mid-round: its models are out, updates on their way or held unacked
            active.process.kill()
            active.process.wait()
            killed_in = checkpoint_state(checkpoint)["round"]
        assert killed_in <= settings.rounds, "the run ended before the kill; give it more rounds"
        for member in (standby, *workers):
            group.wait(member, 180)
    finally:
        group.stop()
        launch.delete_queues(launch.transport_factory(run.resolved()), session_queues(session, settings.workers))
    assert f"active for session {session} (epoch 2, round {killed_in})" in log_of(standby)
    result = json.loads(out.read_text())
    assert [r["step"] for r in result["history"]] == list(range(1, settings.rounds + 1))
    assert result["contributors"] == {str(r): all_workers(settings) for r in range(1, settings.rounds + 1)}
    assert_equals_reference(settings, checkpoint)


def test_a_second_server_beside_a_live_one_waits_and_takes_nothing(broker_url, session, tmp_path):
    settings = with_rounds_to_spare()
    checkpoint = tmp_path / "ckpt"
    run = FedAvgRun(broker=broker_url, session=session, timeout=120, checkpoint_dir=checkpoint)
    server_launch, worker_launches = roles(settings, run, tmp_path)
    group = process_group(run)
    try:
        first = group.start(server_launch.with_deployment(out=tmp_path / "first.json"), name="server-a")
        workers = [group.start(worker) for worker in worker_launches]
        wait_for(lambda: checkpoint_state(checkpoint)["round"] >= 2, "round 1 on disk")
        with paused(*workers):  # the run is still under way when the second server comes up
            assert checkpoint_state(checkpoint)["round"] <= settings.rounds, "the run ended first; give it more rounds"
            second = group.start(server_launch.with_deployment(out=tmp_path / "second.json"), name="server-b")  # a rescheduled pod whose predecessor lives on
            wait_for(lambda: "standby: another fedavg-server holds session" in log_of(second), "the second server waiting as standby")
        for member in (first, *workers):
            group.wait(member, 180)
        group.wait(second, 60)  # it gets the lock once the first is done, and finds the run complete
    finally:
        group.stop()
        launch.delete_queues(launch.transport_factory(run.resolved()), session_queues(session, settings.workers))
    first_result = json.loads((tmp_path / "first.json").read_text())
    assert first_result["contributors"] == {str(r): all_workers(settings) for r in range(1, settings.rounds + 1)}
    assert_equals_reference(settings, checkpoint)
    assert f"active for session {session} (epoch 2, round {settings.rounds + 1})" in log_of(second)
    assert json.loads((tmp_path / "second.json").read_text())["history"] == first_result["history"]
    assert "round 1:" not in log_of(second)  # it ran no round of its own
