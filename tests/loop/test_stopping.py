"""``ichnode serve`` stops within its grace period whatever order its processes get SIGTERM in.

systemd's default stop (KillMode=control-group) sends SIGTERM to every process
of the service at once, workers included; an OOM kill takes a worker away
without warning. Each case starts a real node leading its own process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.loop.harness import NodeRunner, pid_alive, wait_for

pytestmark = pytest.mark.interop

SCP_GRACE = 2.0  # node.shutdown_grace_seconds
WORKER_GRACE = 3.0  # jobs.stop_grace_seconds
# Both graces, plus the stop of the other components and a loaded 2-core machine.
STOP_WITHIN = SCP_GRACE + WORKER_GRACE + 15.0


@pytest.fixture
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeRunner]:
    grace = getattr(request, "param", WORKER_GRACE)  # jobs.stop_grace_seconds
    runner = NodeRunner(
        tmp_path / "node",
        [],
        quiet_seconds=1.0,
        new_session=True,
        extra_toml=f"[jobs]\nstop_grace_seconds = {grace}\n",
    )
    text = runner.config_path.read_text()
    runner.config_path.write_text(
        text.replace("[node]\n", f"[node]\nshutdown_grace_seconds = {SCP_GRACE}\n", 1)
    )
    runner.start()
    process = runner.process
    assert process is not None
    try:
        yield runner
    finally:
        if process.poll() is None:  # whatever the test did, leave nothing behind
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        runner.stop()


def _stopped_in(node: NodeRunner, workers: list[int]) -> float:
    """Seconds until the node exited (fails after STOP_WITHIN); checks exit code and workers."""
    process = node.process
    assert process is not None
    started = time.monotonic()
    try:
        code = process.wait(STOP_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"ichnode serve still running {STOP_WITHIN} s after SIGTERM:\n{node.log_tail()}"
        )
    took = time.monotonic() - started
    assert code == 0, node.log_tail()
    wait_for("the workers to be gone", lambda: not any(map(pid_alive, workers)), 10)
    return took


def test_sigterm_to_the_whole_process_group(node: NodeRunner) -> None:
    workers = node.worker_pids()
    assert workers
    node.signal_group(signal.SIGTERM)
    _stopped_in(node, workers)


def test_sigterm_to_the_main_process_alone(node: NodeRunner) -> None:
    workers = node.worker_pids()
    assert node.process is not None
    node.process.send_signal(signal.SIGTERM)
    _stopped_in(node, workers)


@pytest.mark.parametrize("target", ["main", "group"])
def test_sigterm_after_a_worker_was_sigkilled(node: NodeRunner, target: str) -> None:
    (worker,) = node.worker_pids()
    os.kill(worker, signal.SIGKILL)  # as the OOM killer does
    wait_for("the worker to die", lambda: not pid_alive(worker), 10)
    wait_for("the worker to be restarted", lambda: "starting another" in node.log_tail(), 10)
    assert node.process is not None
    if target == "group":
        node.signal_group(signal.SIGTERM)
    else:
        node.process.send_signal(signal.SIGTERM)
    _stopped_in(node, [worker])


@pytest.mark.parametrize("node", [0.2], indirect=True, ids=["grace-0.2s"])
def test_sigterm_to_the_group_during_a_job_then_the_job_is_done_after_restart(
    node: NodeRunner, tmp_path: Path
) -> None:
    """A job longer than the grace period: its worker is killed, the job kept for later."""
    from tests.hardening.loadutil import storescu
    from tests.loop.conftest import make_study

    study = make_study(tmp_path / "study", 301, ("epidural",), n_slices=80)
    run = storescu(node.port, study.files, called=node.ae_title)
    assert run.returncode == 0, run.stderr

    def running() -> bool:
        jobs = node.jobs(study.series_instance_uid)
        return bool(jobs) and jobs[0].state.value == "running"

    wait_for("the job to run", running, 120, interval=0.05)
    workers = node.worker_pids()
    node.signal_group(signal.SIGTERM)
    _stopped_in(node, workers)
    (job,) = node.jobs(study.series_instance_uid)
    if job.state.value == "done":
        pytest.skip("the job finished within the grace period; nothing left to take up")
    assert job.state.value == "running"  # killed after the grace period, not finished
    node.start()

    def done() -> bool:
        (job,) = node.jobs(study.series_instance_uid)
        return job.state.value == "done"

    wait_for("the job to be taken up and done after the restart", done, 240)
    (job,) = node.jobs(study.series_instance_uid)
    assert job.attempts == 2
    row = node.series(study.series_instance_uid)
    assert row is not None and row.status.value == "done"
