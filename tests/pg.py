"""A real PostgreSQL server for the tests: its own cluster in a temporary folder.

``postgres_server`` (session scope) runs ``initdb`` and ``pg_ctl start`` on a
free loopback port with ``trust`` authentication, as the ``postgres`` user
when the tests run as root (PostgreSQL refuses to run as root), and stops and
removes the cluster at the end. ``postgres_url`` (function scope) creates a
fresh database on it for one test and returns its SQLAlchemy URL
(``postgresql+psycopg://postgres@127.0.0.1:PORT/NAME``).

Without the PostgreSQL server binaries (Debian: ``apt-get install
postgresql``) or the psycopg driver the tests skip with the reason, or fail
when ``ICHNODE_REQUIRE_INTEROP=1`` (:func:`tests.interop.missing`).
Register the fixtures in a test module with
``from tests.pg import postgres_server, postgres_url  # noqa: F401``.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop import free_port, missing

_PG_BIN_GLOBS = ("/usr/lib/postgresql/*/bin",)
_names = itertools.count(1)


def pg_bin_dir() -> Path | None:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres``, or ``None``."""
    found = shutil.which("initdb")
    if found is not None and shutil.which("pg_ctl") is not None:
        return Path(os.path.realpath(found)).parent
    for pattern in _PG_BIN_GLOBS:
        for candidate in sorted(glob.glob(pattern), reverse=True):  # newest version first
            if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
                return Path(candidate)
    return None


@dataclass
class PostgresServer:
    """A running PostgreSQL cluster of the test session."""

    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    port: int
    log: Path
    as_user: list[str]
    #: fsync and full-page writes on, as a production server runs (benchmarks).
    durable: bool = False

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        options += " -c max_connections=200"
        if not self.durable:
            # A throw-away cluster: no fsync, so tests are not bound to the disk.
            options += " -c fsync=off -c full_page_writes=off"
        result = self._pg_ctl(
            "-o", options, "-l", str(self.log), "-w", "-t", "60", "start", check=False
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back open transactions, close sessions)."""
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop", check=False)

    def create_database(self) -> str:
        """Create a new empty database; return its name."""
        import psycopg

        name = f"ichnode_test_{os.getpid()}_{next(_names)}"
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return name


def _as_postgres_user() -> list[str]:
    """The command prefix that runs the server as a non-root user (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is not None:
        return [runuser, "-u", "postgres", "--"]
    return ["su", "postgres", "-s", "/bin/sh", "-c", 'exec "$0" "$@"']


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphaned_clusters(bin_dir: Path, as_user: list[str]) -> list[Path]:
    """Stop and remove clusters left by test runs that were killed (no ``finally`` ran).

    Each cluster folder holds ``owner.pid``, the test process that made it; a
    folder whose owner is gone is stopped (``pg_ctl -m immediate``) and removed.
    Folders of running test sessions are left alone.
    """
    reaped = []
    for folder in Path(tempfile.gettempdir()).glob("ichnode-pg-*"):
        try:
            owner = int((folder / "owner.pid").read_text())
        except (OSError, ValueError):
            continue  # being created, or not ours
        if _pid_alive(owner):
            continue
        if (folder / "data" / "postmaster.pid").exists():
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(folder / "data")]
                + ["-m", "immediate", "-w", "-t", "30", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        shutil.rmtree(folder, ignore_errors=True)
        reaped.append(folder)
    return reaped


def start_postgres(*, durable: bool = False) -> tuple[PostgresServer, Path]:
    """Create and start a cluster in a new temporary folder; return it and the folder.

    ``durable``: with fsync on, as a production server (the benchmarks).
    """
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        missing(
            "PostgreSQL server binaries (initdb, pg_ctl) not found (apt-get install postgresql)"
        )
    assert bin_dir is not None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("the psycopg driver is not installed (pip install 'psycopg[binary]')")
    as_user = _as_postgres_user()
    if as_user:
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            missing("running as root and there is no 'postgres' user to run PostgreSQL as")
    reap_orphaned_clusters(bin_dir, as_user)
    # Under /tmp (world-traversable), not pytest's root-only tmp_path.
    root = Path(tempfile.mkdtemp(prefix="ichnode-pg-"))
    (root / "owner.pid").write_text(str(os.getpid()))
    if as_user:
        os.chown(root, pw.pw_uid, pw.pw_gid)
    data_dir, socket_dir = root / "data", root
    init = subprocess.run(
        [
            *as_user,
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stdout}\n{init.stderr}")
    server = PostgresServer(
        bin_dir, data_dir, socket_dir, free_port(), root / "postgres.log", as_user, durable
    )
    try:
        server.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server, root


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole test session (stopped and removed afterwards)."""
    server, root = start_postgres()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database for one test."""
    return postgres_server.url(postgres_server.create_database())


def wait_until_accepting(server: PostgresServer, timeout: float = 30.0) -> None:
    """Block until the server answers a connection (after a restart)."""
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=server.port,
                user="postgres",
                dbname="postgres",
                connect_timeout=2,
            ):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
