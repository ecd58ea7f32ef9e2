"""A real ``ichnode serve`` subprocess for the loop tests and the latency benchmark.

:class:`NodeRunner` writes a configuration with free loopback ports, starts
``python -m node.cli serve`` with its log in a file, waits until the SCP
listens and every worker has loaded its model, and reads the node's index
directly (a real SQLite file) to see series, jobs, results and deliveries.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select

from storage.index import Index
from storage.models import Delivery, Job, Result, Series
from tests.interop import REPO, free_port

T = TypeVar("T")

#: Weights file for the node and ``analyze`` in the loop tests (default: the bundled ones).
TEST_WEIGHTS = os.environ.get("LOOP_TEST_WEIGHTS") or None


@dataclass(frozen=True)
class Destination:
    """A destination entry of the node's configuration."""

    name: str
    ae_title: str
    port: int
    host: str = "127.0.0.1"


class NodeRunner:
    """One ``ichnode serve`` process with its own storage root and configuration."""

    def __init__(
        self,
        root: Path,
        destinations: list[Destination],
        *,
        quiet_seconds: float | None = None,
        workers: int | None = None,
        backoff_initial: float | None = None,
        backoff_max: float | None = None,
        sqlite_synchronous: str | None = "NORMAL",
        device: str | None = "cpu",
        weights: str | None = TEST_WEIGHTS,
        extra_toml: str = "",
        ae_title: str = "ICHNODE",
        new_session: bool = False,
    ) -> None:
        """Settings left at None keep ichnode's defaults (the benchmark uses that).

        ``new_session``: the node leads its own process group (as under systemd),
        so a test can signal the whole group with :meth:`signal_group`.
        """
        self.new_session = new_session
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = free_port()
        self.metrics_port = free_port()
        self.workers = workers or 1
        self.config_path = self.root / "node.toml"
        self.log_path = self.root / "node.log"
        self.database_url = f"sqlite:///{self.root / 'data' / 'index.sqlite'}"

        def section(name: str, **values: object) -> str:
            body = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items() if v is not None)
            return f"[{name}]\n{body}"

        dests = "".join(
            f'\n[[destinations]]\nname = "{d.name}"\nae_title = "{d.ae_title}"\n'
            f'host = "{d.host}"\nport = {d.port}\n'
            for d in destinations
        )
        self.config_path.write_text(
            section("node", ae_title=ae_title, host="127.0.0.1", port=self.port)
            + section(
                "storage",
                root=str(self.root / "data"),
                min_free_disk_mb=0,
                sqlite_synchronous=sqlite_synchronous,
            )
            + section("scheduler", series_quiet_seconds=quiet_seconds)
            + section("inference", device=device, workers=workers, weights=weights)
            + section(
                "delivery",
                backoff_initial_seconds=backoff_initial,
                backoff_max_seconds=backoff_max,
            )
            + section("metrics", host="127.0.0.1", port=self.metrics_port)
            + extra_toml
            + dests
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._index: Index | None = None

    # -- process -----------------------------------------------------------
    def start(self, timeout: float = 180.0) -> None:
        """Start the node and wait until it listens and its workers are warm."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop/kill)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path)],
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=self.new_session,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ichnode serve exited: {self.log_tail()}")
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            warm = len(re.findall(r"worker \S+ ready", text))
            if "ichnode serving as" in text and warm >= self.workers:
                return
            time.sleep(0.2)
        raise RuntimeError(f"ichnode serve not ready in {timeout} s: {self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait, return the exit code (kill after ``timeout``)."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            code = process.returncode
        self._close()
        return code

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to every process of the node's group (``new_session`` only)."""
        if self.process is None or not self.new_session:
            raise RuntimeError("the node does not lead its own process group")
        os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL the node, as a power cut or the OOM killer would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._index is not None:
            self._index.dispose()
            self._index = None

    def worker_pids(self) -> list[int]:
        """Process ids of every worker that reported ready in the log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [int(pid) for pid in re.findall(r"worker \S+:(\d+) ready", text)]

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- index -------------------------------------------------------------
    @property
    def index(self) -> Index:
        """The node's index, opened from the test process."""
        if self._index is None:
            self._index = Index(self.database_url, sqlite_synchronous="NORMAL")
        return self._index

    def series(self, series_instance_uid: str) -> Series | None:
        """The series row (detached), or None."""
        with self.index.session(readonly=True) as session:
            row = session.execute(
                select(Series).where(Series.series_instance_uid == series_instance_uid)
            ).scalar_one_or_none()
            if row is not None:
                session.expunge(row)
            return row

    def jobs(self, series_instance_uid: str | None = None) -> list[Job]:
        """Job rows (detached), oldest first."""
        with self.index.session(readonly=True) as session:
            query = select(Job).order_by(Job.id)
            if series_instance_uid is not None:
                query = query.join(Series, Series.id == Job.series_id).where(
                    Series.series_instance_uid == series_instance_uid
                )
            rows = list(session.scalars(query))
            for r in rows:
                session.expunge(r)
            return rows

    def results(self, series_instance_uid: str) -> list[Result]:
        """Result rows of a source series (detached)."""
        with self.index.session(readonly=True) as session:
            rows = list(
                session.scalars(
                    select(Result)
                    .join(Series, Series.id == Result.series_id)
                    .where(Series.series_instance_uid == series_instance_uid)
                    .order_by(Result.id)
                )
            )
            for r in rows:
                session.expunge(r)
            return rows

    def deliveries(self) -> list[Delivery]:
        """Every delivery row (detached)."""
        with self.index.session(readonly=True) as session:
            rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
            for r in rows:
                session.expunge(r)
            return rows

    def studies_cli(self) -> dict[str, Any]:
        """``ichnode studies --json`` from a real subprocess."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "node.cli",
                "studies",
                "--json",
                "--config",
                str(self.config_path),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return dict(json.loads(out.stdout))

    def scrape(self) -> str:
        """The text of the metrics endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())


def wait_for(what: str, check: Callable[[], T | None], timeout: float, interval: float = 0.25) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True while a process with ``pid`` exists (and is not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
