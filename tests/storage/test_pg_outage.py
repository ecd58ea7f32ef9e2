"""The receiver on a PostgreSQL index that stops and comes back in the middle of a C-STORE run.

A real SCU keeps sending on one association while the test stops the
PostgreSQL server (``pg_ctl stop -m fast``) and starts it again. While the
index is unreachable every C-STORE must get a failure status (0xA700), never
a success; every instance that got a success must be in the index with its
file; the first C-STORE sent after the server is back must succeed (pooled
connections that the restart broke are replaced before use); and the
instances refused during the outage are stored when the SCU sends them again.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests.pg import PostgresServer, wait_until_accepting
from tests.storage.helpers import running_scp, small_ct

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


class Sending:
    """A C-STORE SCU in a thread, one association, sending new slices until stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        # (sop_instance_uid, status, started, finished) per C-STORE, monotonic times.
        self.sent: list[tuple[str, int, float, float]] = []
        self.error: str | None = None
        self.study, self.series = generate_uid(), generate_uid()
        self.datasets: dict[str, Dataset] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ae = AE("OUTAGE")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ICHNODE")
        if not assoc.is_established:
            self.error = "association not established"
            return
        number = 0
        while not self._stop.is_set():
            ds = small_ct(self.study, self.series, number)
            self.datasets[str(ds.SOPInstanceUID)] = ds
            number += 1
            started = time.monotonic()
            rsp = assoc.send_c_store(ds)
            status = int(rsp.Status) if "Status" in rsp else -1
            self.sent.append((str(ds.SOPInstanceUID), status, started, time.monotonic()))
            time.sleep(0.005)
        assoc.release()

    def wait_for(self, count: int, after: float = 0.0, timeout: float = 60.0) -> None:
        """Wait until ``count`` C-STOREs that started after ``after`` have an answer."""
        deadline = time.monotonic() + timeout
        while sum(1 for s in self.sent if s[2] > after) < count:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"only {len(self.sent)} C-STOREs answered"
            time.sleep(0.01)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def resend(port: int, datasets: list[Dataset]) -> list[int]:
    """Send refused slices again on a new association (what a modality does)."""
    ae = AE("OUTAGE")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def test_postgres_restart_during_ingest_loses_nothing_acknowledged(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    with running_scp(tmp_path / "node", database_url=postgres_url) as scp:
        scu = Sending(scp.port)
        scu.start()
        try:
            scu.wait_for(20)
            postgres_server.stop("fast")
            down = time.monotonic()
            try:
                scu.wait_for(10, after=down)
            finally:
                restarting = time.monotonic()
                postgres_server.start()
                wait_until_accepting(postgres_server)
            up = time.monotonic()
            scu.wait_for(20, after=up)
        finally:
            scu.stop()
        sent = list(scu.sent)
        during = [s for s in sent if s[2] > down and s[3] < restarting]
        after = [s for s in sent if s[2] > up]
        assert len(during) >= 5, sent
        assert {s[1] for s in during} == {OUT_OF_RESOURCES}, during
        assert after and {s[1] for s in after} == {SUCCESS}, after  # the first one too
        acknowledged = {s[0] for s in sent if s[1] == SUCCESS}
        refused = {s[0] for s in sent if s[1] != SUCCESS}
        assert scp.index.known_sop_instance_uids(sorted(acknowledged)) == acknowledged
        for sop_instance_uid in acknowledged:
            row = scp.index.instance(sop_instance_uid)
            assert row is not None and Path(row["path"]).is_file()
        assert scp.index.known_sop_instance_uids(sorted(refused)) == set()
        # The SCU sends the refused slices again: now they are stored.
        again = [scu.datasets[uid] for uid in sorted(refused)]
        assert resend(scp.port, again) == [SUCCESS] * len(refused)
        stored = {f.sop_instance_uid for f in scp.index.series_files(scu.series)}
        assert stored == acknowledged | refused
        assert all(Path(f.path).is_file() for f in scp.index.series_files(scu.series))


def test_first_store_after_an_idle_restart_succeeds(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    """Pooled connections that a restart broke while nobody sent are replaced, not used."""
    study, series = generate_uid(), generate_uid()
    slices = [small_ct(study, series, i) for i in range(8)]
    with running_scp(tmp_path / "node", database_url=postgres_url) as scp:
        assert resend(scp.port, slices[:4]) == [SUCCESS] * 4
        postgres_server.stop("fast")
        postgres_server.start()
        wait_until_accepting(postgres_server)
        assert resend(scp.port, slices[4:]) == [SUCCESS] * 4
        assert scp.index.count_instances() == 8
