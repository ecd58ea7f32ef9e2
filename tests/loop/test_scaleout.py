"""The loop spread over processes as a site would place them, on one real PostgreSQL.

Two receiver processes (``node.receivers = 2``, one port), two scheduler and
sender processes (one active, one on standby), two worker processes: each an
``ichnode serve --role ...`` process of its own, sharing only the PostgreSQL
index and the archive folder, with a real Orthanc as the PACS that sends the
studies and receives the results. After the first study the active
scheduler and sender is killed (SIGKILL to its process group, as a lost
machine): the standby takes over. Then a worker is killed in the middle of a
job: the other worker takes the job up and Orthanc ends with exactly one
result set.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import select

from bench.common import wait_for_port
from storage.index import Index
from storage.models import AssociationRecord, Job, JobState, Series
from tests.interop import REPO, free_port
from tests.loop.conftest import make_study, register_node, result_series, send_to_node, upload
from tests.loop.harness import TEST_WEIGHTS
from tests.orthanc import Orthanc, orthanc  # noqa: F401  (fixture)
from tests.pg import postgres_server, postgres_url  # noqa: F401  (fixtures)

T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float, logs: Callable[[], str]) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


class RoleProcess:
    """One ``ichnode serve --role ...`` process leading its own process group."""

    def __init__(self, name: str, roles: str, config: Path, log_dir: Path) -> None:
        self.name = name
        self.roles = roles
        self.config = config
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config),
             "--role", self.roles],
            cwd=REPO, env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def worker_pid(self) -> int | None:
        found = re.findall(r"worker \S+:(\d+) ready", self.text())
        return int(found[-1]) if found else None

    def kill_group(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return None


@pytest.fixture
def deployment(
    tmp_path: Path, postgres_url: str, orthanc: Orthanc  # noqa: F811
) -> Iterator[dict[str, Any]]:
    port = free_port()
    config = tmp_path / "ichnode.toml"
    weights = f'weights = "{TEST_WEIGHTS}"\n' if TEST_WEIGHTS else ""
    config.write_text(
        f'[node]\nport = {port}\nreceivers = 2\nshutdown_grace_seconds = 1.0\n'
        f'[storage]\nroot = "{tmp_path / "archive"}"\ndatabase_url = "{postgres_url}"\n'
        "min_free_disk_mb = 0\n"
        "[scheduler]\nseries_quiet_seconds = 2.0\n"
        f'[inference]\ndevice = "cpu"\nworkers = 1\n{weights}'
        "[jobs]\nheartbeat_seconds = 0.5\nstale_after_seconds = 5.0\nstop_grace_seconds = 5.0\n"
        "[delivery]\nbackoff_initial_seconds = 0.5\nbackoff_max_seconds = 2.0\n"
        "[metrics]\nenabled = false\n"
        f'[[destinations]]\nname = "pacs"\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\n'
        f"port = {orthanc.dicom_port}\n"
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = {
        "receivers": RoleProcess("receivers", "receiver", config, logs),
        "scheduler-a": RoleProcess("scheduler-a", "scheduler,sender", config, logs),
        "scheduler-b": RoleProcess("scheduler-b", "scheduler,sender", config, logs),
        "worker-a": RoleProcess("worker-a", "worker", config, logs),
        "worker-b": RoleProcess("worker-b", "worker", config, logs),
    }

    def all_logs() -> str:
        return "\n".join(f"--- {n}\n" + "\n".join(p.text().splitlines()[-25:])
                         for n, p in procs.items())

    # The receivers migrate the database first; the others find it at head.
    procs["receivers"].start()
    wait_for_port(port, 120)
    procs["scheduler-a"].start()
    wait_for("scheduler-a holding the role",
             lambda: "now holds the scheduler role" in procs["scheduler-a"].text(), 120,
             lambda: procs["scheduler-a"].text())
    for name in ("scheduler-b", "worker-a", "worker-b"):
        procs[name].start()
    for name in ("worker-a", "worker-b"):
        wait_for(f"{name} ready", procs[name].worker_pid, 300, all_logs)
    wait_for("two receivers listening",
             lambda: procs["receivers"].text().count("listening as ICHNODE") >= 2, 60, all_logs)
    register_node(orthanc, "ICHNODE", port)
    index = Index(postgres_url)
    try:
        yield {"procs": procs, "index": index, "orthanc": orthanc, "logs": all_logs,
               "tmp": tmp_path}
    finally:
        for p in procs.values():
            p.stop()
        index.dispose()


def _result_set(orthanc: Orthanc, study_uid: str) -> dict[str, list[str]] | None:  # noqa: F811
    found = result_series(orthanc, study_uid)
    return found if "SEG" in found and "SR" in found else None


def test_two_receivers_two_workers_one_postgresql_and_a_worker_lost_mid_job(
    deployment: dict[str, Any],
) -> None:
    procs: dict[str, RoleProcess] = deployment["procs"]
    index: Index = deployment["index"]
    orthanc_: Orthanc = deployment["orthanc"]
    logs = deployment["logs"]
    tmp: Path = deployment["tmp"]

    # 1. A study through the whole loop.
    first = make_study(tmp / "first", 103, ("intraparenchymal",), n_slices=24)
    send_to_node(orthanc_, upload(orthanc_, first.files))
    wait_for("the first result set in Orthanc",
             lambda: _result_set(orthanc_, first.study_instance_uid), 300, logs)
    assert "standing by" in procs["scheduler-b"].text()
    assert "now holds the scheduler role" not in procs["scheduler-b"].text()

    # 2. The active scheduler and sender is lost; the standby takes the role.
    procs["scheduler-a"].kill_group()
    wait_for("scheduler-b taking over",
             lambda: "now holds the scheduler role" in procs["scheduler-b"].text(), 60, logs)

    # 3. A longer study; the worker that claims its job is killed mid-job.
    second = make_study(tmp / "second", 104, ("subdural",), n_slices=96)
    send_to_node(orthanc_, upload(orthanc_, second.files))

    def running_claim() -> str | None:
        with index.session(readonly=True) as session:
            row = session.execute(
                select(Job.claimed_by).join(Series, Series.id == Job.series_id).where(
                    Series.series_instance_uid == second.series_instance_uid,
                    Job.state == JobState.RUNNING,
                )
            ).first()
        return None if row is None else str(row[0])

    holder = wait_for("the second job running", running_claim, 300, logs)
    pid = int(holder.rsplit(":", 1)[1])
    lost = next(n for n in ("worker-a", "worker-b") if procs[n].worker_pid() == pid)
    survivor = "worker-b" if lost == "worker-a" else "worker-a"
    procs[lost].kill_group()
    with index.session(readonly=True) as session:
        state = session.execute(
            select(Job.state).join(Series, Series.id == Job.series_id).where(
                Series.series_instance_uid == second.series_instance_uid)
        ).scalar_one()
    assert state == JobState.RUNNING, "the job ended before its worker was killed"

    found = wait_for("the second result set in Orthanc",
                     lambda: _result_set(orthanc_, second.study_instance_uid), 300, logs)
    # Exactly one result set: one SEG and one SR, from the worker that took the job up.
    assert len(found["SEG"]) == 1 and len(found["SR"]) == 1, found
    with index.session(readonly=True) as session:
        jobs = session.execute(
            select(Job).join(Series, Series.id == Job.series_id).where(
                Series.series_instance_uid == second.series_instance_uid)
        ).scalars().all()
        receivers = set(session.execute(select(AssociationRecord.receiver)).scalars())
    assert len(jobs) == 1
    job = jobs[0]
    assert job.state == JobState.DONE and job.attempts == 2
    assert job.claimed_by is not None
    assert int(job.claimed_by.rsplit(":", 1)[1]) == procs[survivor].worker_pid()
    assert all(r is not None for r in receivers)  # every association names its receiver
    for name, proc in procs.items():
        if name not in (lost, "scheduler-a"):
            assert "Traceback" not in proc.text(), proc.text()
