"""Association slots follow associations, not sockets (issue 14, item 2), on a real ``ichnode serve``.

A load balancer's health check (TCP connect, then close), a port scanner, a
client that sends a few bytes of garbage, a caller the node refuses, and a
connection that opens and says nothing: none of them may hold one of the
``node.max_associations`` slots. While a loop of such probes runs, two bursts of
``node.max_associations`` parallel DCMTK ``storescu`` associations must all
be accepted and every instance stored.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.hardening.conftest import associate_rq, pdu
from tests.hardening.loadutil import proc_status_kb
from tests.interop import require_tool
from tests.loop.harness import NodeRunner
from tests.storage.helpers import ct_series

SLOTS = 16  # node.max_associations (ichnode's default)
FILES_PER_SENDER = 3


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeRunner]:
    """A real ``ichnode serve``; routing skips every series, so no analysis runs."""
    require_tool("storescu", "dcmtk")
    runner = NodeRunner(
        tmp_path / "node", [], quiet_seconds=1.0, extra_toml="[routing]\nmin_slices = 100000\n"
    )
    text = runner.config_path.read_text()
    runner.config_path.write_text(
        text.replace("[node]\n", f"[node]\nmax_associations = {SLOTS}\n", 1)
    )
    runner.start()
    try:
        yield runner
    finally:
        code = runner.stop()
        assert code == 0, f"ichnode serve exited with {code}: {runner.log_tail()}"


class Prober:
    """Probes the node's port in a loop: connect-close, garbage, refused callers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.counts = {"connect-close": 0, "garbage": 0, "garbage-pdu": 0, "refused": 0}
        self.refusals_seen = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def _connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def probe_once(self) -> None:
        """One round of every kind of probe."""
        with self._connect():
            pass  # a health check: connect, close
        self.counts["connect-close"] += 1
        with self._connect() as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: ichnode\r\n\r\n")
        self.counts["garbage"] += 1
        with self._connect() as sock:
            sock.sendall(pdu(0x09, b"\x00" * 12))  # a PDU type that does not exist
        self.counts["garbage-pdu"] += 1
        with self._connect() as sock:
            sock.sendall(
                associate_rq([(1, CTImageStorage, [ExplicitVRLittleEndian])], called="NOTHERE")
            )
            reply = sock.recv(1)
            if reply == b"\x03":  # A-ASSOCIATE-RJ
                self.refusals_seen += 1
        self.counts["refused"] += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe_once()
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(0.02)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _burst(node: NodeRunner, folder: Path, tag: str) -> tuple[list[str], set[str]]:
    """Start SLOTS storescu at once; return their outputs and the SOP Instance UIDs sent."""
    tool = require_tool("storescu", "dcmtk")
    env = dict(os.environ, TCP_NODELAY="1")
    procs = []
    sent: set[str] = set()
    for i in range(SLOTS):
        files = []
        for n, ds in enumerate(ct_series(FILES_PER_SENDER, size=16)):
            path = folder / f"{tag}-{i:02d}-{n}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(str(path))
            sent.add(str(ds.SOPInstanceUID))
        args = [tool, "-v", "-aet", f"{tag}{i:02d}", "-aec", "ICHNODE", "127.0.0.1",
                str(node.port), *files]  # fmt: skip
        procs.append(
            subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
            )
        )
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        outputs.append(f"exit {proc.returncode}\n{out}")
    return outputs, sent


def test_probes_never_hold_a_slot_while_senders_fill_every_slot(
    node: NodeRunner, tmp_path: Path
) -> None:
    assert node.process is not None
    threads_before = proc_status_kb(node.process.pid, "Threads")
    # Two connections that open and stay silent for the whole test.
    silent = [socket.create_connection(("127.0.0.1", node.port), timeout=60) for _ in range(2)]
    try:
        with Prober(node.port) as prober:
            for _ in range(4):  # the measured case: 4 probes, then the burst
                prober.probe_once()
            time.sleep(0.5)
            first, sent_first = _burst(node, tmp_path, "FIRST")
            time.sleep(2.0)
            second, sent_second = _burst(node, tmp_path, "SECOND")
    finally:
        for sock in silent:
            sock.close()
    assert not prober.errors, prober.errors[:5]
    assert prober.counts["connect-close"] >= 8, prober.counts
    assert prober.refusals_seen == prober.counts["refused"], "a refused caller got no A-ASSOCIATE-RJ"
    for output in first + second:
        assert output.startswith("exit 0\n"), output
        assert "Association Rejected" not in output, output
        assert output.count("Received Store Response (Success)") == FILES_PER_SENDER, output
    for uid in sent_first | sent_second:
        assert node.index.instance(uid) is not None, uid
    # A probe's connection thread ends when the probe closes, not after the
    # ACSE timeout (30 s): the node is back to its own threads within seconds.
    deadline = time.monotonic() + 5.0
    while True:
        threads = proc_status_kb(node.process.pid, "Threads")
        if threads <= threads_before + 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"probes during the bursts: {prober.counts}; node threads {threads_before} before, "
          f"{threads} after")
    assert threads <= threads_before + 2, f"{threads} threads, {threads_before} before the probes"
