"""``ichnode index copy``: an SQLite index moved into an empty PostgreSQL (or SQLite) database.

The source is a real SQLite file filled through the public APIs (instances of
two patients, associations, a job queue with results and deliveries in
several states); the target a fresh database on the test PostgreSQL of
``tests/pg.py`` or another SQLite file. Every table is compared row by row,
all columns, timestamps as aware UTC; new rows on the target must get ids
above the copied ones. The refusals and the command line (a subprocess) are
checked as the user meets them.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, func, inspect, select, text

from config.settings import DeliverySettings, JobSettings
from storage.copy import CopyRefused, IndexCopyError, copy_index
from storage.index import Index, InstanceMeta
from storage.jobs import JobQueue, NewResult, SeriesFinding
from storage.models import (
    AssociationOutcome,
    AssociationRecord,
    Base,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    ResultKind,
    Series,
    Study,
)
from storage.outbox import Outbox
from tests.interop import REPO

# A time with microseconds, in the night of a daylight-saving change in Europe.
T0 = dt.datetime(2026, 3, 29, 0, 30, 15, 123456, tzinfo=dt.UTC)
CEST = dt.timezone(dt.timedelta(hours=2), "CEST")
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
ME = "worker-host:1"
POLICY = JobSettings(
    max_attempts=3, retry_backoff_seconds=10, retry_backoff_max_seconds=15, stale_after_seconds=30
)
TABLES = [t.name for t in Base.metadata.sorted_tables]


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def _meta(sop: str, series: str, study: str, patient: str, **extra: Any) -> InstanceMeta:
    return InstanceMeta(
        sop_instance_uid=sop,
        sop_class_uid=CT,
        transfer_syntax_uid=EXPLICIT,
        study_instance_uid=study,
        series_instance_uid=series,
        patient_id=patient,
        modality="CT",
        **extra,
    )


def _enqueue(queue: JobQueue, series_id: int, now: dt.datetime, digest: str) -> int:
    with queue.index.session() as session:
        series = session.get_one(Series, series_id)
        return int(queue.enqueue(session, series, digest, now).id)


def _results(tag: str) -> list[NewResult]:
    return [
        NewResult(ResultKind.SR, f"2.25.{tag}.1", f"2.25.{tag}", f"/archive/results/{tag}-sr.dcm"),
        NewResult(
            ResultKind.SEG, f"2.25.{tag}.2", f"2.25.{tag}", f"/archive/results/{tag}-seg.dcm"
        ),
    ]


def build_source(url: str) -> Index:
    """An index with every table filled, as a node that ran for a while leaves it."""
    index = Index(url)
    index.upgrade()
    # Patient 1: two series of one study, over a released association.
    a1 = index.open_association("CT_SCANNER", "ICHNODE", "10.0.0.5", 40001, started_at=at(0))
    first = [
        index.record_instance(
            _meta(
                f"1.2.1.1.{n}",
                "1.2.1.1",
                "1.2.1",
                "P1",
                patient_name="Doe^John",
                patient_birth_date="19500101",
                patient_sex="M",
                study_date="20260329",
                study_time="013015",
                study_description="CT HEAD",
                accession_number="A1",
                series_number=2,
                series_description="Axial 5mm",
                body_part_examined="HEAD",
                instance_number=n + 1,
            ),
            path=f"/archive/1.2.1/1.2.1.1/1.2.1.1.{n}.dcm",
            size=525_000 + n,
            calling_ae="CT_SCANNER",
            association_id=a1,
            received_at=at(n),
        )
        for n in range(3)
    ]
    # Received at a time given in another zone: stored as the same instant.
    index.record_instance(
        _meta("1.2.1.2.0", "1.2.1.2", "1.2.1", "P1", series_number=3),
        path="/archive/1.2.1/1.2.1.2/1.2.1.2.0.dcm",
        size=1000,
        association_id=a1,
        received_at=at(5).astimezone(CEST),
    )
    # A re-send: resend_count and last_resent_at.
    index.record_instance(
        _meta("1.2.1.1.0", "1.2.1.1", "1.2.1", "P1", instance_number=1),
        path="/archive/1.2.1/1.2.1.1/1.2.1.1.0.dcm",
        size=525_000,
        calling_ae="CT_SCANNER",
        association_id=a1,
        received_at=at(6),
    )
    index.close_association(a1, AssociationOutcome.RELEASED, instances=5, ended_at=at(7))
    # Patient 2, with an issuer and a name beyond ASCII; no peer port, no instance number.
    a2 = index.open_association("PACS", "ICHNODE", "10.0.0.6", None, started_at=at(8))
    second = index.record_instance(
        _meta(
            "1.2.2.1.0",
            "1.2.2.1",
            "1.2.2",
            "P2",
            issuer_of_patient_id="HOSP",
            patient_name="Müller^Jürgen=ミュラー^ユルゲン",
            series_description="Kopf ohne KM",
        ),
        path="/archive/1.2.2/1.2.2.1/1.2.2.1.0.dcm",
        size=2000,
        calling_ae="PACS",
        association_id=a2,
        received_at=at(9),
    )
    index.close_association(
        a2,
        AssociationOutcome.ABORTED,
        instances=1,
        failures=1,
        detail='peer aborted: "connection reset"\nsecond line',
        ended_at=at(10),
    )
    index.record_rejected_association(
        "UNKNOWN", "ICHNODE", "10.0.0.9", 5555, "calling AE not allowed"
    )

    queue = JobQueue(index, POLICY)
    outbox = Outbox(index, DeliverySettings())
    s1, s2, s3 = first[0].series_id, index.instance("1.2.1.2.0")["series_id"], second.series_id  # type: ignore[index]
    # Series 1: analysed twice (new content); the first set of results is superseded.
    _enqueue(queue, s1, at(30), "h1")
    job = queue.claim(ME, at(31))
    assert job is not None
    assert (
        queue.complete(
            job,
            ME,
            results=_results("a"),
            destinations=["pacs", "backup"],
            finding=SeriesFinding(True, 0.93),
            inference_seconds=1.25,
            encoding_seconds=0.5,
            now=at(40),
        ).state
        == "done"
    )
    _enqueue(queue, s1, at(50), "h2")
    job = queue.claim(ME, at(51))
    assert job is not None
    assert (
        queue.complete(
            job,
            ME,
            results=_results("b"),
            destinations=["pacs"],
            finding=SeriesFinding(False, 0.07),
            now=at(55),
        ).state
        == "done"
    )
    with index.session(readonly=True) as session:
        pending = list(
            session.scalars(
                select(Delivery.id)
                .where(Delivery.state == DeliveryState.PENDING)
                .order_by(Delivery.id)
            )
        )
    assert outbox.acknowledged(pending[-1], at(60)).state == "sent"
    assert outbox.failed(pending[-2], "association rejected by ORTHANC", at(61)).state == "retry"
    # Series 2: one failed attempt, queued again after the backoff.
    _enqueue(queue, s2, at(70), "h3")
    job = queue.claim(ME, at(71))
    assert job is not None
    assert (
        queue.fail(job, ME, "out of memory", series_reason="cannot analyse", now=at(72)).state
        == "retry"
    )
    # Series 3: queued, not yet claimed.
    _enqueue(queue, s3, at(80), "h4")
    return index


def table_rows(index: Index) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, typed by the models, ordered by primary key."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    with index.session(readonly=True) as session:
        for tbl in Base.metadata.sorted_tables:
            rows[tbl.name] = [
                tuple(row)
                for row in session.execute(select(tbl).order_by(*tbl.primary_key.columns))
            ]
    return rows


def max_ids(rows: dict[str, list[tuple[Any, ...]]]) -> dict[str, int]:
    # The first column of every table is its integer id.
    return {name: max(r[0] for r in table) for name, table in rows.items()}


def write_new_rows(index: Index) -> dict[str, int]:
    """One new row in every table through the public APIs; return the new ids by table."""
    association = index.open_association("NEW_CT", "ICHNODE", "10.0.0.7", 104)
    recorded = index.record_instance(
        _meta("1.2.3.1.0", "1.2.3.1", "1.2.3", "P3"),
        path="/archive/new.dcm",
        size=1,
        association_id=association,
    )
    index.close_association(association, AssociationOutcome.RELEASED, instances=1)
    queue = JobQueue(index, POLICY)
    job_id = _enqueue(queue, recorded.series_id, at(100), "h9")
    while True:  # the copied queued jobs are older: claimed first
        job = queue.claim(ME, at(101))
        assert job is not None
        if job.id == job_id:
            break
    assert (
        queue.complete(
            job,
            ME,
            results=_results("new"),
            destinations=["pacs"],
            finding=SeriesFinding(False, 0.1),
            now=at(102),
        ).state
        == "done"
    )
    with index.session(readonly=True) as session:
        result_id = session.scalars(select(func.max(Result.id))).one()
        delivery_id = session.scalars(select(func.max(Delivery.id))).one()
        study_pk = session.get_one(Series, recorded.series_id).study_pk
        patient_pk = session.get_one(Study, study_pk).patient_pk
    return {
        "patients": int(patient_pk),
        "studies": int(study_pk),
        "series": recorded.series_id,
        "associations": association,
        "instances": recorded.instance_id,
        "jobs": job_id,
        "results": int(result_id),
        "deliveries": int(delivery_id),
    }


def assert_utc(rows: dict[str, list[tuple[Any, ...]]]) -> int:
    """Every timestamp is aware UTC; return how many there are."""
    seen = 0
    for table in rows.values():
        for row in table:
            for value in row:
                if isinstance(value, dt.datetime):
                    assert value.tzinfo is not None and value.utcoffset() == dt.timedelta(0)
                    seen += 1
    return seen


@pytest.fixture
def source_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'source' / 'index.sqlite'}"


@pytest.fixture
def target_url(db_url: str) -> str:
    """An empty target: a new SQLite file (apart from the source) or a new PostgreSQL database."""
    return db_url


def test_every_row_is_copied_with_its_key_and_new_rows_get_new_ids(
    source_url: str, target_url: str
) -> None:
    source = build_source(source_url)
    before = table_rows(source)
    assert all(before[name] for name in TABLES), {n: len(r) for n, r in before.items()}
    assert assert_utc(before) > 20

    report = copy_index(source_url, target_url, batch_size=2)  # several batches per table

    assert [(t.table, t.rows) for t in report.tables] == [(n, len(before[n])) for n in TABLES]
    assert report.rows == sum(len(r) for r in before.values())
    assert (report.open_associations, report.running_jobs) == ((), ())
    target = Index(target_url)
    try:
        assert target.current_revision() == target.head_revision() == report.revision
        after = table_rows(target)
        for name in TABLES:
            assert after[name] == before[name], name  # every column, every row, every key
        assert_utc(after)
        # The instant given in another zone is the same instant on the target.
        instance = target.instance("1.2.1.2.0")
        assert instance is not None and instance["received_at"] == at(5)
        assert instance["received_at"].tzinfo is not None
        with target.session(readonly=True) as session:
            assert session.scalars(select(Result.superseded).order_by(Result.id)).all() == [
                True,
                True,
                False,
                False,
            ]
            assert session.get_one(AssociationRecord, 2).peer_port is None
            assert session.get_one(Job, 3).not_before == at(72) + dt.timedelta(seconds=10)
        if target_url.startswith("postgresql"):
            assert len(report.sequences) == len(TABLES)
            # Stored as naive UTC whatever the session's time zone is.
            with target.engine.connect() as conn:
                conn.exec_driver_sql("SET TIME ZONE 'America/New_York'")
                raw = conn.execute(
                    text(
                        "SELECT received_at::text FROM instances WHERE sop_instance_uid = '1.2.1.2.0'"
                    )
                ).scalar_one()
            assert raw == "2026-03-29 00:30:20.123456"
        else:
            assert report.sequences == ()
        highest = max_ids(after)
        new = write_new_rows(target)
        assert set(new) == set(TABLES)
        for name in TABLES:
            assert new[name] > highest[name], (name, new[name], highest[name])
    finally:
        target.dispose()
        source.dispose()


def test_a_target_with_rows_is_refused(source_url: str, target_url: str) -> None:
    build_source(source_url).dispose()
    copy_index(source_url, target_url)
    target = Index(target_url)
    try:
        kept = table_rows(target)
        with pytest.raises(CopyRefused, match="is not empty"):
            copy_index(source_url, target_url)
        assert table_rows(target) == kept
    finally:
        target.dispose()


def test_a_target_with_rows_in_a_table_of_its_own_is_refused_before_any_schema(
    source_url: str, postgres_url: str
) -> None:
    build_source(source_url).dispose()
    engine = create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE notes (body text)")
            conn.exec_driver_sql("INSERT INTO notes VALUES ('someone else''s data')")
        with pytest.raises(CopyRefused, match=r"not empty \(notes hold rows\)"):
            copy_index(source_url, postgres_url)
        with engine.connect() as conn:
            assert inspect(conn).get_table_names() == ["notes"]
    finally:
        engine.dispose()


def test_a_target_where_ichnode_made_only_the_schema_is_accepted(
    source_url: str, postgres_url: str
) -> None:
    """``ichnode serve`` started once on the new database: tables and alembic_version, no rows."""
    build_source(source_url).dispose()
    empty = Index(postgres_url)
    empty.upgrade()
    empty.dispose()
    report = copy_index(source_url, postgres_url)
    assert report.rows > 0


def test_a_source_below_the_head_is_refused_and_the_target_untouched(
    source_url: str, target_url: str
) -> None:
    old = Index(source_url)
    old.upgrade("0003")
    old.dispose()
    with pytest.raises(CopyRefused, match=r"revision 0003.*`ichnode serve`"):
        copy_index(source_url, target_url)
    target = Index(target_url)
    try:
        assert target.current_revision() is None
        with target.engine.connect() as conn:
            assert inspect(conn).get_table_names() == []
    finally:
        target.dispose()


def test_no_source_index_is_refused_and_no_file_is_made(tmp_path: Path) -> None:
    missing = tmp_path / "nothing" / "index.sqlite"
    with pytest.raises(CopyRefused, match="no index at"):
        copy_index(f"sqlite:///{missing}", f"sqlite:///{tmp_path / 'target.sqlite'}")
    assert not missing.parent.exists()
    assert not (tmp_path / "target.sqlite").exists()


def test_the_target_must_not_be_the_source(source_url: str) -> None:
    build_source(source_url).dispose()
    with pytest.raises(CopyRefused, match="current index"):
        copy_index(source_url, source_url)


def test_a_running_node_is_refused_and_force_copies_its_rows(
    source_url: str, target_url: str, tmp_path: Path
) -> None:
    source = build_source(source_url)
    association = source.open_association("CT_SCANNER", "ICHNODE", "10.0.0.5", 40002)
    with pytest.raises(CopyRefused, match=rf"1 association\(s\) open \(id {association}\)"):
        copy_index(source_url, target_url)
    source.close_association(association, AssociationOutcome.RELEASED, instances=0)
    job = JobQueue(source, POLICY).claim(ME, at(200))  # a worker took a queued job
    assert job is not None
    with pytest.raises(CopyRefused, match=rf"1 job\(s\) running \(id {job.id}\).*--force"):
        copy_index(source_url, target_url)
    again = source.open_association("CT_SCANNER", "ICHNODE", "10.0.0.5", 40003)
    with pytest.raises(CopyRefused, match="association.*and 1 job"):
        copy_index(source_url, target_url)
    source.dispose()

    report = copy_index(source_url, target_url, force=True)
    assert (report.open_associations, report.running_jobs) == ((again,), (job.id,))
    target = Index(target_url)
    try:
        with target.session(readonly=True) as session:
            assert session.get_one(AssociationRecord, again).outcome == AssociationOutcome.OPEN
            row = session.get_one(Job, job.id)
            assert (row.state, row.claimed_by, row.claimed_at) == (JobState.RUNNING, ME, at(200))
    finally:
        target.dispose()


def test_a_failed_copy_keeps_nothing_and_can_run_again(source_url: str, postgres_url: str) -> None:
    """A value PostgreSQL refuses (SQLite does not check lengths) rolls the whole copy back."""
    source = build_source(source_url)
    too_long = source.open_association("A_CALLING_AE_TOO_LONG", "ICHNODE", "10.0.0.5", 1)
    source.close_association(too_long, AssociationOutcome.RELEASED, instances=0)
    with pytest.raises(
        IndexCopyError,
        match=rf"copying associations failed \(rows from id \d+ to {too_long}\)"
        r".*too long.*stays empty",
    ) as refused:
        copy_index(source_url, postgres_url)
    assert not isinstance(refused.value, CopyRefused)
    target = Index(postgres_url)
    try:
        assert target.current_revision() == target.head_revision()  # the schema stays
        assert all(rows == [] for rows in table_rows(target).values())  # the patients too
        with source.session() as session:
            session.get_one(AssociationRecord, too_long).calling_ae = "SHORT_AE"
        report = copy_index(source_url, postgres_url)
        assert table_rows(target) == table_rows(source)
        assert report.rows == sum(len(r) for r in table_rows(source).values())
    finally:
        target.dispose()
        source.dispose()


# -- the command line --------------------------------------------------------


def _cli(config: Path, *args: str, tz: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICHNODE_")}
    if tz is not None:
        env["TZ"] = tz
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "index", "copy", "--config", str(config), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


@pytest.fixture
def node_config(tmp_path: Path) -> Path:
    """A node configuration whose index (``<root>/index.sqlite``) is filled."""
    root = tmp_path / "data"
    build_source(f"sqlite:///{root / 'index.sqlite'}").dispose()
    config = tmp_path / "ichnode.toml"
    config.write_text(f'[storage]\nroot = "{root}"\n')
    return config


def test_cli_copies_to_postgresql_and_says_what_next(node_config: Path, postgres_url: str) -> None:
    source = Index(f"sqlite:///{node_config.parent / 'data' / 'index.sqlite'}")
    before = table_rows(source)
    source.dispose()

    done = _cli(node_config, "--to", postgres_url, tz="Europe/Berlin")

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[:-1] == [f"{name}: {len(before[name])} rows" for name in TABLES]
    assert "storage.database_url" in lines[-1] and "restart" in lines[-1]
    assert postgres_url in lines[-1]
    target = Index(postgres_url)
    try:
        assert table_rows(target) == before  # a local time zone changes nothing
    finally:
        target.dispose()

    again = _cli(node_config, "--to", postgres_url)
    assert again.returncode == 2 and again.stdout == ""
    assert len(again.stderr.splitlines()) == 1 and "is not empty" in again.stderr


def test_cli_copies_to_sqlite(node_config: Path, tmp_path: Path) -> None:
    target = tmp_path / "backup" / "index.sqlite"
    done = _cli(node_config, "--to", f"sqlite:///{target}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[TABLES.index("instances")] == "instances: 5 rows"
    assert target.exists()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("not a url", "is not a database URL"),
        ("mysql://ichnode@db.example/ichnode", "not 'mysql'"),
        ("postgresql+psycopg://postgres@127.0.0.1:1/ichnode", "cannot use the target"),
    ],
)
def test_cli_bad_target_is_one_line_exit_2(node_config: Path, url: str, says: str) -> None:
    done = _cli(node_config, "--to", url)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("ichnode index copy: ") and says in done.stderr


def test_cli_refuses_a_running_node_unless_forced(node_config: Path, tmp_path: Path) -> None:
    source = Index(f"sqlite:///{node_config.parent / 'data' / 'index.sqlite'}")
    association = source.open_association("CT_SCANNER", "ICHNODE", "10.0.0.5", 40002)
    source.dispose()
    target = f"sqlite:///{tmp_path / 'target.sqlite'}"

    refused = _cli(node_config, "--to", target)
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1
    assert f"association(s) open (id {association})" in refused.stderr
    assert "stop `ichnode serve`" in refused.stderr

    forced = _cli(node_config, "--to", target, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "associations: 4 rows" in forced.stdout.splitlines()
    assert "--force" in forced.stderr


def test_cli_without_a_node_index(tmp_path: Path) -> None:
    config = tmp_path / "ichnode.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path / "empty"}"\n')
    done = _cli(config, "--to", f"sqlite:///{tmp_path / 'target.sqlite'}")
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1
    assert "no index at" in done.stderr and "Traceback" not in done.stderr


def test_instances_table_is_streamed_in_batches(source_url: str, tmp_path: Path) -> None:
    """The progress callback sees every batch: the copy never holds more than one in memory."""
    build_source(source_url).dispose()
    seen: list[tuple[str, int]] = []
    copy_index(
        source_url,
        f"sqlite:///{tmp_path / 't.sqlite'}",
        batch_size=2,
        progress=lambda table, rows: seen.append((table, rows)),
    )
    assert [rows for table, rows in seen if table == "instances"] == [2, 4, 5]
    assert [rows for table, rows in seen if table == "patients"] == [2]
