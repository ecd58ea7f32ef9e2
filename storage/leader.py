"""One holder of a role across every process that shares the index.

Exactly one scheduler may decide that series are complete and queue their
jobs; a second ``ichnode serve --role scheduler`` on another machine waits on
standby and takes over when the first one is gone. The index is the only
coordinator:

- on PostgreSQL the holder keeps a session-level advisory lock
  (``pg_try_advisory_lock``) on a dedicated connection. The server releases
  it when that session ends, whether the holder stopped or crashed (the
  kernel closes its connection) or lost its machine or network (then only
  when the server notices: set the server's ``tcp_keepalives_idle``,
  ``_interval`` and ``_count``, docs/DEPLOY.md, or it may take hours), and the
  standby's next :meth:`Leadership.hold` gets it;
- on SQLite (one machine) the holder keeps an ``flock`` on a file beside the
  database, which the kernel releases when the process ends;
- an in-memory SQLite index belongs to one process, which always holds it.

:meth:`Leadership.hold` is called before each round of work: it takes the
lock when free, and checks that a held PostgreSQL lock's session is still
alive (a holder whose connection broke stops acting at once and competes
again, as another process may have taken over).
"""

from __future__ import annotations

import fcntl
import logging
import os
import zlib
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from storage.notify import libpq_params

logger = logging.getLogger(__name__)

#: High 32 bits of every ichnode advisory lock key ("ichn"); the low 32 name the role.
_KEY_PREFIX = 0x6963686E


def lock_key(name: str) -> int:
    """The 64-bit advisory lock key of role ``name`` (stable across processes and versions)."""
    key = (_KEY_PREFIX << 32) | zlib.crc32(name.encode("utf-8"))
    return key - (1 << 64) if key >= 1 << 63 else key


class Leadership:
    """Hold role ``name`` among every process sharing the index at ``url``.

    Parameters
    ----------
    url : str
        The index URL (``storage.effective_database_url``).
    name : str
        The role, e.g. ``"scheduler"``.
    """

    def __init__(self, url: str, name: str) -> None:
        self.name = name
        parsed = make_url(url)
        self.backend = parsed.get_backend_name()
        self.key = lock_key(name)
        self._params = libpq_params(url) if self.backend == "postgresql" else {}
        self._lock_path: Path | None = None
        if self.backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
            self._lock_path = Path(f"{parsed.database}.{name}.lock")
        self._conn: Any = None
        self._fd: int | None = None
        self.held = False

    def hold(self) -> bool:
        """Take the role if it is free, or confirm it is still held; True when held."""
        was = self.held
        try:
            self.held = self._hold()
        except OSError as exc:
            logger.warning("cannot take the %s role (%s); trying again", self.name, exc)
            self.held = False
        if self.held and not was:
            logger.info("this process now holds the %s role", self.name)
        elif was and not self.held:
            logger.warning("this process lost the %s role; standing by", self.name)
        return self.held

    def _hold(self) -> bool:
        if self.backend == "postgresql":
            return self._hold_postgresql()
        if self._lock_path is None:
            return True
        if self._fd is not None:
            return True
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def _hold_postgresql(self) -> bool:
        import psycopg

        try:
            if self._conn is None:
                # One connection for the holder and the standby alike: a standby
                # asks again on it instead of connecting every second.
                self._conn = psycopg.connect(
                    autocommit=True,
                    connect_timeout=10,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                    **self._params,
                )
            if self.held:
                self._conn.execute("SELECT 1")
                return True
            got = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
            return bool(got is not None and got[0])
        except psycopg.Error as exc:
            logger.warning("%s role: index connection failed (%s)", self.name, exc)
            self._drop_connection()
            return False

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            import psycopg

            try:
                conn.close()
            except psycopg.Error:
                pass

    def release(self) -> None:
        """Give the role up (a standby takes it at its next :meth:`hold`)."""
        self._drop_connection()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self.held:
            logger.info("released the %s role", self.name)
        self.held = False
