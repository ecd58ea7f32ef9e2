"""The index on SQLite and PostgreSQL: migrations match the models, SQLite is set up safely,
rows and listings are right."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, inspect, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from storage.index import Index, InstanceMeta, MissingAttributeError
from storage.models import (
    AssociationRecord,
    Base,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    ResultKind,
    Series,
    SeriesStatus,
)
from tests.storage.helpers import small_ct


@pytest.fixture
def index(db_url: str) -> Iterator[Index]:
    idx = Index(db_url)
    idx.upgrade()
    yield idx
    idx.dispose()


def meta(
    series: str = "1.2.3", sop: str = "1.2.3.1", study: str = "1.2", **kw: object
) -> InstanceMeta:
    values: dict[str, object] = {
        "sop_instance_uid": sop,
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "study_instance_uid": study,
        "series_instance_uid": series,
        "patient_id": "P1",
        "modality": "CT",
    }
    values.update(kw)
    return InstanceMeta(**values)  # type: ignore[arg-type]


def test_migrations_build_exactly_the_models(index: Index) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    assert index.current_revision() == index.head_revision()
    with index.engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    assert diff == []


def test_downgrade_to_base_and_upgrade_again(index: Index) -> None:
    index.downgrade("base")
    assert index.current_revision() is None
    tables = set(inspect(index.engine).get_table_names())
    assert "instances" not in tables and "jobs" not in tables
    index.upgrade()
    assert index.current_revision() == index.head_revision()


def test_sqlite_pragmas(tmp_path: Path) -> None:
    for sync, code in (("NORMAL", 1), ("FULL", 2)):
        idx = Index(f"sqlite:///{tmp_path / sync}.sqlite", sqlite_synchronous=sync)  # type: ignore[arg-type]
        with idx.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == code
        idx.dispose()


def test_foreign_keys_are_enforced(index: Index) -> None:
    with pytest.raises(IntegrityError), index.session() as session:
        session.execute(
            text(
                "INSERT INTO instances (sop_instance_uid, series_id, sop_class_uid, "
                "transfer_syntax_uid, path, size, received_at, calling_ae, resend_count) "
                "VALUES ('9.9', 12345, '1.2', '1.2', '/x', 1, '2026-01-01 00:00:00', '', 0)"
            )
        )


def test_missing_uids_are_refused() -> None:
    with pytest.raises(MissingAttributeError, match="series_instance_uid"):
        meta(series="")
    ds = small_ct()
    del ds.StudyInstanceUID
    with pytest.raises(MissingAttributeError, match="study_instance_uid"):
        InstanceMeta.from_dataset(ds, transfer_syntax_uid="1.2.840.10008.1.2.1")


def test_from_dataset_reads_the_header() -> None:
    ds = small_ct(index=6)
    m = InstanceMeta.from_dataset(ds, transfer_syntax_uid="1.2.840.10008.1.2.1")
    assert (m.sop_instance_uid, m.series_instance_uid, m.study_instance_uid) == (
        ds.SOPInstanceUID,
        ds.SeriesInstanceUID,
        ds.StudyInstanceUID,
    )
    assert m.modality == "CT" and m.instance_number == 7 and m.series_number == 2
    assert m.patient_name == "Bench^Phantom"


def test_record_creates_patient_study_series_instance(index: Index) -> None:
    first = index.record_instance(meta(sop="1.2.3.1", instance_number=1), path="/a/1", size=10)
    second = index.record_instance(meta(sop="1.2.3.2", instance_number=2), path="/a/2", size=20)
    assert not first.resent and not second.resent
    assert first.series_id == second.series_id and first.study_id == second.study_id
    with index.session(readonly=True) as session:
        series = session.scalars(select(Series)).one()
        assert series.status == SeriesStatus.RECEIVING
        assert series.last_instance_at is not None and series.last_instance_at.tzinfo is not None
        rows = session.scalars(select(Instance).order_by(Instance.id)).all()
        assert [(r.path, r.size, r.resend_count) for r in rows] == [
            ("/a/1", 10, 0),
            ("/a/2", 20, 0),
        ]
        if index.is_sqlite:
            # The fast (DB-API) path and the ORM path store timestamps the same way.
            raw = (
                session.execute(text("SELECT received_at FROM instances ORDER BY id"))
                .scalars()
                .all()
            )
            assert len({len(v) for v in raw}) == 1, raw
        assert all(r.received_at.tzinfo == dt.UTC for r in rows)


def test_resend_keeps_one_row_and_counts(index: Index) -> None:
    index.record_instance(meta(), path="/a/1", size=10, calling_ae="A")
    again = index.record_instance(meta(), path="/a/1", size=11, calling_ae="B")
    third = index.record_instance(meta(), path="/a/1", size=12, calling_ae="C")
    assert again.resent and third.resent and third.previous_path is None
    row = index.instance("1.2.3.1")
    assert row is not None
    assert row["resend_count"] == 2 and row["size"] == 12 and row["calling_ae"] == "C"
    assert row["last_resent_at"] is not None
    assert index.count_instances() == 1


def test_resend_into_another_series_reports_the_old_path(index: Index) -> None:
    index.record_instance(meta(series="1.2.3"), path="/a/1", size=10)
    moved = index.record_instance(meta(series="1.2.4"), path="/b/1", size=10)
    assert moved.resent and moved.previous_path == "/a/1"
    assert index.instance("1.2.3.1")["path"] == "/b/1"  # type: ignore[index]


def test_deleted_series_is_created_again(index: Index) -> None:
    index.record_instance(meta(sop="1.2.3.1"), path="/a/1", size=1)
    with index.session() as session:
        session.execute(delete(Series))
    index.record_instance(meta(sop="1.2.3.2"), path="/a/2", size=1)
    files = index.series_files("1.2.3")
    assert [f.sop_instance_uid for f in files] == ["1.2.3.2"]  # the cascade removed 1.2.3.1


def test_two_index_objects_write_concurrently(db_url: str) -> None:
    url = db_url
    Index(url).upgrade()
    errors: list[BaseException] = []
    # All four start with the first instance of one new patient and study at
    # the same moment: on PostgreSQL they race to insert the same rows.
    start = threading.Barrier(4)

    def writer(n: int) -> None:
        idx = Index(url)  # its own engine, as another process would have
        try:
            idx.count_instances()  # connected before the race starts
            start.wait(30)
            for i in range(40):
                idx.record_instance(
                    meta(series=f"1.2.{n}", sop=f"1.2.{n}.{i}"), path=f"/{n}/{i}", size=1
                )
        except SQLAlchemyError as exc:  # e.g. 'database is locked'; asserted below
            errors.append(exc)
        finally:
            idx.dispose()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert Index(url).count_instances() == 160


def test_association_audit(index: Index) -> None:
    aid = index.open_association("SCU", "ICHNODE", "127.0.0.1", 4000)
    open_id = index.open_association("SCU2", "ICHNODE", "127.0.0.1", 4001)
    index.close_association(aid, "released", instances=3, failures=1)
    rid = index.record_rejected_association(
        "BAD", "ICHNODE", "127.0.0.1", 4002, "calling AE title not recognised"
    )
    live_id = index.open_association("SCU3", "ICHNODE", "127.0.0.1", 4003)
    # open_id was held by a receiver process of this host that has ended; live_id
    # is held by this process, a receiver that still runs beside the one starting.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with index.session() as session:
        session.execute(
            update(AssociationRecord)
            .where(AssociationRecord.id == open_id)
            .values(receiver=f"{socket.gethostname()}:{gone.pid}")
        )
    assert index.mark_interrupted_associations() == 1
    rows = {r["id"]: r for r in index.associations()}
    assert rows[aid]["outcome"] == "released" and rows[aid]["instances"] == 3
    assert rows[aid]["failures"] == 1 and rows[aid]["ended_at"] is not None
    assert rows[open_id]["outcome"] == "interrupted"
    assert rows[live_id]["outcome"] == "open"
    assert rows[rid]["outcome"] == "rejected" and rows[rid]["detail"].startswith("calling")


def test_studies_document_shape_and_deliveries(index: Index) -> None:
    r1 = index.record_instance(
        meta(series="1.2.3", sop="1.2.3.1", series_description="AX"), path="/1", size=1
    )
    index.record_instance(meta(series="1.2.3", sop="1.2.3.2"), path="/2", size=1)
    index.record_instance(meta(series="1.2.4", sop="1.2.4.1", modality="SR"), path="/3", size=1)
    with index.session() as session:
        series = session.get(Series, r1.series_id)
        assert series is not None
        series.status = SeriesStatus.DONE
        series.hemorrhage = True
        job = Job(series_id=r1.series_id, state=JobState.DONE)
        session.add(job)
        session.flush()
        results = [
            Result(
                job_id=job.id,
                series_id=r1.series_id,
                kind=k,
                sop_instance_uid=f"9.{i}",
                series_instance_uid=f"9.{i}.1",
                path=f"/r{i}",
                superseded=sup,
            )
            for i, (k, sup) in enumerate(
                [(ResultKind.SR, False), (ResultKind.SEG, False), (ResultKind.SC, True)]
            )
        ]
        session.add_all(results)
        session.flush()
        session.add_all(
            [
                Delivery(result_id=results[0].id, destination="pacs", state=DeliveryState.SENT),
                Delivery(result_id=results[1].id, destination="pacs", state=DeliveryState.PENDING),
                Delivery(result_id=results[0].id, destination="archive", state=DeliveryState.SENT),
                Delivery(result_id=results[2].id, destination="old", state=DeliveryState.DEAD),
            ]
        )
    doc = index.studies_document()
    assert list(doc) == ["studies"] and len(doc["studies"]) == 1
    study = doc["studies"][0]
    assert set(study) == {
        "study_instance_uid",
        "patient_id",
        "study_date",
        "study_description",
        "series",
    }
    by_uid = {s["series_instance_uid"]: s for s in study["series"]}
    assert set(by_uid["1.2.3"]) == {
        "series_instance_uid",
        "modality",
        "series_description",
        "instances",
        "status",
        "reason",
        "hemorrhage",
        "deliveries",
    }
    assert by_uid["1.2.3"]["instances"] == 2 and by_uid["1.2.3"]["status"] == "done"
    assert by_uid["1.2.3"]["hemorrhage"] is True
    # pending wins over sent for a destination; superseded results are left out
    assert by_uid["1.2.3"]["deliveries"] == {"archive": "sent", "pacs": "pending"}
    assert by_uid["1.2.4"] == {
        "series_instance_uid": "1.2.4",
        "modality": "SR",
        "series_description": "",
        "instances": 1,
        "status": "receiving",
        "reason": None,
        "hemorrhage": None,
        "deliveries": {},
    }


def test_unique_delivery_per_result_and_destination(index: Index) -> None:
    r = index.record_instance(meta(), path="/1", size=1)
    with pytest.raises(IntegrityError), index.session() as session:
        job = Job(series_id=r.series_id)
        session.add(job)
        session.flush()
        res = Result(
            job_id=job.id,
            series_id=r.series_id,
            kind=ResultKind.SR,
            sop_instance_uid="9.1",
            series_instance_uid="9.1.1",
            path="/r",
        )
        session.add(res)
        session.flush()
        session.add_all(
            [
                Delivery(result_id=res.id, destination="pacs"),
                Delivery(result_id=res.id, destination="pacs"),
            ]
        )
        session.flush()


def test_association_record_outcomes_are_checked(index: Index) -> None:
    with pytest.raises(IntegrityError), index.session() as session:
        session.execute(
            text(
                "INSERT INTO associations (calling_ae, called_ae, peer_address, started_at, "
                "instances, failures, outcome) VALUES ('A', 'B', '', '2026-01-01', 0, 0, 'bogus')"
            )
        )
    with index.session(readonly=True) as session:
        assert session.scalars(select(AssociationRecord)).all() == []


def _start_node(url: str, start: Any) -> None:
    """What a node process does first on its index: connect, then migrate."""
    idx = Index(url)
    idx.current_revision()  # connected before the race starts
    start.wait(60)
    idx.upgrade()  # an exception makes the exit code non-zero
    idx.dispose()


def test_processes_starting_together_migrate_once(db_url: str) -> None:
    """Several node processes starting on one fresh database all reach the newest schema."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    procs = [ctx.Process(target=_start_node, args=(db_url, start)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    idx = Index(db_url)
    assert idx.current_revision() == idx.head_revision()
    assert {"instances", "jobs", "deliveries"} <= set(inspect(idx.engine).get_table_names())
    idx.dispose()


def test_database_urls(tmp_path: Path) -> None:
    plain = Index("postgresql://ichnode:secret@db.example.org:5433/ichnode")
    assert plain.url == "postgresql+psycopg://ichnode:secret@db.example.org:5433/ichnode"
    assert plain.engine.dialect.driver == "psycopg" and not plain.is_sqlite
    with pytest.raises(ValueError, match="SQLite or PostgreSQL, not 'mysql'"):
        Index("mysql://ichnode@db.example.org/ichnode")
