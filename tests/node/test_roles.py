"""``ichnode serve --role``, one active scheduler, and several receivers on one port.

Real processes, a real SQLite file, a real PostgreSQL (``tests.pg``) and real
associations on loopback.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from bench.common import wait_for_port
from node.service import ROLES, parse_roles
from storage.index import Index
from storage.leader import Leadership, lock_key
from storage.models import AssociationRecord
from tests.interop import REPO, free_port
from tests.pg import postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.storage.helpers import small_ct


def test_roles_parse_in_start_order_and_unknown_ones_are_refused() -> None:
    assert parse_roles(None) == ROLES
    assert parse_roles(["sender,receiver", "worker"]) == ("receiver", "worker", "sender")
    with pytest.raises(ValueError, match="unknown role.*gpu"):
        parse_roles(["worker,gpu"])


def _serve(args: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(config), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")},
    )


def test_bad_role_and_metrics_port_are_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nport = {free_port()}\n[storage]\nroot = "{tmp_path}"\n')
    out = _serve(["--role", "receiver,gpu"], cfg)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown role(s) gpu" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = _serve(["--metrics-port", "70000"], cfg)
    assert out.returncode == 2 and "is not a port" in out.stderr


def test_lock_keys_are_stable_and_distinct() -> None:
    assert lock_key("scheduler") == lock_key("scheduler")
    assert lock_key("scheduler") != lock_key("sender")
    assert -(1 << 63) <= lock_key("scheduler") < 1 << 63


def test_one_scheduler_holds_the_role_on_sqlite_until_it_lets_go(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    first, second = Leadership(url, "scheduler"), Leadership(url, "scheduler")
    assert first.hold() and first.hold()  # held, and still held
    assert not second.hold()
    first.release()
    assert second.hold() and not first.hold()
    second.release()
    # A holder that ends (a killed process) frees the role with its file lock.
    code = (
        "import time; from storage.leader import Leadership; "
        f"assert Leadership({url!r}, 'scheduler').hold(); print('held', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not first.hold()
        holder.kill()
        holder.wait(10)
        assert first.hold()
    finally:
        holder.kill()
        first.release()


def test_one_scheduler_holds_the_role_on_postgresql_and_a_standby_takes_over(
    postgres_url: str,  # noqa: F811
) -> None:
    first, second = Leadership(postgres_url, "scheduler"), Leadership(postgres_url, "scheduler")
    other_role = Leadership(postgres_url, "sender")
    try:
        assert first.hold() and not second.hold()
        assert other_role.hold()  # another role's lock is another key
        # The holder's session ends without a goodbye (its machine died, an
        # administrator ended it): the server frees the lock, the standby takes it,
        # and the old holder, finding its session gone, stops acting.
        index = Index(postgres_url)
        with index.engine.begin() as conn:
            ended = conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                f"WHERE locktype = 'advisory' AND objid = {lock_key('scheduler') & 0xFFFFFFFF}"
            ).all()
        index.dispose()
        assert len(ended) == 1
        deadline = time.monotonic() + 10
        while not second.hold():
            assert time.monotonic() < deadline, "the standby never took the role"
            time.sleep(0.1)
        assert not first.hold()
    finally:
        for lead in (first, second, other_role):
            lead.release()


def test_two_receivers_accept_on_one_port_and_stop_together(tmp_path: Path) -> None:
    port = free_port()
    root = tmp_path / "data"
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f"[node]\nport = {port}\nreceivers = 2\nshutdown_grace_seconds = 1.0\n"
        f'[storage]\nroot = "{root}"\nmin_free_disk_mb = 0\n[metrics]\nenabled = false\n'
    )
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(cfg), "--role", "receiver"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
        env={k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")},
        start_new_session=True,  # its own process group, as under systemd
    )
    try:
        wait_for_port(port, 60)
        # The second receiver binds a moment later; wait until its log line is there.
        deadline = time.monotonic() + 60
        while log.read_text(errors="replace").count("listening as ICHNODE") < 2:
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.2)
        ae = AE("SCANNER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        for n in range(16):  # each association is a new connection: the kernel spreads them
            ds = small_ct("1.2.826.0.1.3680043.10.9", f"1.2.826.0.1.3680043.10.9.{n}")
            assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
            assert assoc.is_established
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
            assoc.release()
        # systemd's stop: SIGTERM to every process of the group at once.
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    index = Index(f"sqlite:///{root / 'index.sqlite'}")
    with index.session(readonly=True) as session:
        rows = session.execute(select(AssociationRecord.receiver, AssociationRecord.outcome)).all()
    index.dispose()
    assert len(rows) == 16 and {r.outcome for r in rows} == {"released"}
    receivers = {r.receiver for r in rows}
    assert len(receivers) == 2, receivers  # both processes took associations
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    assert "starting another" not in text  # a receiver stopped on purpose stays stopped
    # Every receiver process has ended with the node.
    for holder in receivers:
        pid = int(str(holder).rsplit(":", 1)[1])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_receiver_that_cannot_start_is_retried_after_a_pause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from config.settings import Settings
    from node.service import ReceiverPool

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))  # without SO_REUSEPORT: the receiver cannot bind
    blocker.listen()
    port = blocker.getsockname()[1]
    settings = Settings(
        node={"port": port, "receivers": 2},  # type: ignore[arg-type]
        storage={"root": tmp_path / "data", "min_free_disk_mb": 0},  # type: ignore[arg-type]
    )
    pool = ReceiverPool(settings, 1)
    pool.start()
    try:
        first = pool.pids()
        deadline = time.monotonic() + 60
        # The pool's own watcher may take the first look at the exit: capture from
        # before it can happen, whichever thread logs it.
        with caplog.at_level(logging.ERROR, logger="node.service"):
            while pool._processes[0].is_alive():  # it fails to bind and exits
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert pool.check() == 0  # not at once: after a pause
        assert "starting another in 5 s" in caplog.text
        assert pool.check() == 0 and pool.pids() == first
        blocker.close()
        deadline = time.monotonic() + 30
        while pool.check() == 0:  # the pause ends, a new receiver starts and binds
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert pool.pids() != first
        wait_for_port(port, 60)
    finally:
        pool.stop(timeout=20)
        blocker.close()


def test_a_receiver_stopped_on_purpose_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM to the whole group (systemd's stop) reaches a receiver process before
    the main process stops the pool: its clean exit must not count as a death."""
    from config.settings import Settings
    from node import service
    from node.service import ReceiverPool

    # The receiver counts as settled at once: a death now would be restarted at once.
    monkeypatch.setattr(service, "RECEIVER_SETTLE_SECONDS", 0.0)
    port = free_port()
    settings = Settings(
        node={"port": port, "receivers": 2},  # type: ignore[arg-type]
        storage={"root": tmp_path / "data", "min_free_disk_mb": 0},  # type: ignore[arg-type]
        metrics={"enabled": False},  # type: ignore[arg-type]
    )
    pool = ReceiverPool(settings, 1)
    pool.start()
    try:
        wait_for_port(port, 60)
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGTERM)
        pool._processes[0].join(30)
        assert pool._processes[0].exitcode == 0
        assert pool.check() == 0 and pool.pids() == [pid]
    finally:
        pool.stop(timeout=20)
