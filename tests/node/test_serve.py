"""``ichnode serve`` as a real subprocess: durability across SIGKILL, clean SIGTERM."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association

from bench.common import wait_for_port
from storage.index import Index
from tests.interop import REPO, free_port
from tests.storage.helpers import ct_series, dataset_bytes, small_ct


class Node:
    """One ``ichnode serve`` process on a free port with its own storage root."""

    def __init__(self, root: Path, *, grace: float = 1.0) -> None:
        self.root = root
        self.port = free_port()
        self.config = root / "ichnode.toml"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f"[node]\nport = {self.port}\nshutdown_grace_seconds = {grace}\n"
            f'[storage]\nroot = "{root / "data"}"\nmin_free_disk_mb = 0\n'
        )
        self.log = root / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, log_level: str = "INFO") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "--log-level",
                log_level,
                "serve",
                "--config",
                str(self.config),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        try:
            wait_for_port(self.port, 60)
        except TimeoutError:
            self.proc.kill()
            raise AssertionError(f"ichnode serve did not start:\n{self.log.read_text()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def index(self) -> Index:
        return Index(f"sqlite:///{self.root / 'data' / 'index.sqlite'}")


def _associate(port: int) -> Association:
    ae = AE("DURABLE")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    return assoc


def _dataset_part(path: Path) -> bytes:
    data = path.read_bytes()
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def test_sigkill_right_after_success_loses_nothing(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.start()
    series = ct_series(12, size=64)
    kill_after = 7
    assoc = _associate(node.port)
    for n, ds in enumerate(series, start=1):
        status = assoc.send_c_store(ds)
        assert int(status.Status) == 0x0000
        if n == kill_after:
            node.stop(signal.SIGKILL)
            break
    assoc.abort()
    # A restart upgrades nothing, closes the audit row the kill left open, serves again.
    node.start()
    assert node.stop() == 0
    index = node.index()
    try:
        assert index.count_instances() == kill_after
        for ds in series[:kill_after]:
            row = index.instance(ds.SOPInstanceUID)
            assert row is not None, ds.SOPInstanceUID
            assert _dataset_part(Path(row["path"])) == dataset_bytes(ds)
        assert index.instance(series[kill_after].SOPInstanceUID) is None
        outcomes = [a["outcome"] for a in index.associations()]
        assert outcomes == ["interrupted"]
    finally:
        index.dispose()
    assert not list((tmp_path / "data").rglob(".incoming-*"))


def test_restart_reindexes_acknowledged_files_whose_rows_were_lost(tmp_path: Path) -> None:
    """A power loss can drop the last index commits (synchronous=NORMAL) while the
    files, fsynced before the success status, survive: the next start indexes them."""
    node = Node(tmp_path)
    node.start()
    series = ct_series(6, size=32)
    assoc = _associate(node.port)
    for ds in series:
        assert int(assoc.send_c_store(ds).Status) == 0x0000
    assoc.release()
    assert node.stop() == 0
    lost = [ds.SOPInstanceUID for ds in series[2:]]
    with sqlite3.connect(tmp_path / "data" / "index.sqlite") as db:
        db.executemany("DELETE FROM instances WHERE sop_instance_uid = ?", [(u,) for u in lost])
    node.start()
    assert node.stop() == 0
    index = node.index()
    try:
        assert index.count_instances() == len(series)
        for ds in series:
            row = index.instance(ds.SOPInstanceUID)
            assert row is not None
            assert row["calling_ae"] == "DURABLE"
            assert _dataset_part(Path(row["path"])) == dataset_bytes(ds)
    finally:
        index.dispose()
    assert "re-indexed 4 instance(s) found on disk without an index row" in node.log.read_text()


def _big_ct(size: int = 3000) -> Dataset:
    ds = small_ct(size=16)
    ds.Rows = ds.Columns = size
    ds.PixelData = (
        np.random.default_rng(1).integers(0, 2000, (size, size), dtype=np.int16).tobytes()
    )
    return ds


def test_sigterm_with_a_store_in_flight_finishes_it_and_exits_0(tmp_path: Path) -> None:
    node = Node(tmp_path, grace=0.5)
    node.start(log_level="DEBUG")
    big = _big_ct()  # 18 MB: the store takes a noticeable time
    result: dict[str, int] = {}

    def send() -> None:
        assoc = _associate(node.port)
        rsp = assoc.send_c_store(big)
        result["status"] = int(rsp.Status) if "Status" in rsp else -1
        # Keep the association open: the node must end it itself.
        time.sleep(5)
        result["ended"] = int(not assoc.is_established)
        if assoc.is_established:
            assoc.release()

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 60
    while f"storing {big.SOPInstanceUID}" not in node.log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the store never started"
        time.sleep(0.005)
    assert node.stop(signal.SIGTERM) == 0
    sender.join(30)
    assert result["status"] == 0x0000  # the in-flight store finished and was answered
    assert result["ended"] == 1  # then the node ended the association
    log = node.log.read_text(errors="replace")
    assert "Traceback" not in log
    index = node.index()
    try:
        row = index.instance(big.SOPInstanceUID)
        assert row is not None
        assert _dataset_part(Path(row["path"])) == dataset_bytes(big)
        (audit,) = index.associations()
        assert audit["outcome"] == "aborted" and audit["detail"] == "node shutting down"
        assert audit["instances"] == 1
    finally:
        index.dispose()


def test_sigint_when_idle_exits_0(tmp_path: Path) -> None:
    node = Node(tmp_path)
    node.start()
    started = time.monotonic()
    assert node.stop(signal.SIGINT) == 0
    # Workers (if the loop is installed) may take a while; never the 60 s of a hang.
    assert time.monotonic() - started < 45
    log = node.log.read_text(errors="replace")
    assert "Traceback" not in log and "stopped listening" in log


def test_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node]\nport = 0\nbogus = 1\n")
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "node.bogus" in out.stderr


def test_port_in_use_is_one_line_exit_2(tmp_path: Path) -> None:
    node = Node(tmp_path / "first")
    node.start()
    try:
        other = Node(tmp_path / "second")
        other.config.write_text(
            node.config.read_text().replace(str(tmp_path / "first"), str(tmp_path / "second"))
        )
        out = subprocess.run(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(other.config)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr
        assert "cannot listen" in out.stderr
    finally:
        assert node.stop() == 0
