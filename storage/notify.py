"""Wake-ups from the index: PostgreSQL LISTEN/NOTIFY, a timed wait on SQLite.

Migration 0003 makes PostgreSQL send a notification on :data:`JOBS` when a
job is queued and on :data:`DELIVERIES` when a delivery becomes pending, at
commit, whichever process or machine wrote the row. A worker or sender that
polls the index waits on :class:`Wakeups` instead of sleeping: it wakes as
soon as work is there, and at the latest after its poll interval, so a lost
notification (e.g. while the listening connection was being replaced) costs
one poll interval, never the work. On SQLite there is no NOTIFY and
:meth:`Wakeups.wait` just waits out its timeout (or an in-process
:meth:`Wakeups.wake`).

>>> wakeups = Wakeups(index.url, [JOBS])
>>> while running:
...     claim and run jobs until claim_job returns None
...     wakeups.wait(poll_seconds)
>>> wakeups.close()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import make_url

logger = logging.getLogger(__name__)

#: Notified when a ``jobs`` row is inserted as, or changes to, ``queued``.
JOBS = "ichnode_jobs"
#: Notified when a ``deliveries`` row is inserted as, or changes back to, ``pending``.
DELIVERIES = "ichnode_deliveries"
CHANNELS = (JOBS, DELIVERIES)


def libpq_params(url: str) -> dict[str, Any]:
    """Connection parameters for psycopg from a SQLAlchemy PostgreSQL URL."""
    parsed = make_url(url)
    params: dict[str, Any] = {
        key: value
        for key, value in (
            ("host", parsed.host),
            ("port", parsed.port),
            ("user", parsed.username),
            ("password", parsed.password),
            ("dbname", parsed.database),
        )
        if value is not None
    }
    for key, value in parsed.query.items():
        params[key] = value if isinstance(value, str) else value[-1]
    params.setdefault("application_name", "ichnode")
    return params


class Wakeups:
    """Wait until the index announces work on ``channels``, or until a timeout.

    Parameters
    ----------
    url : str
        The index URL (``storage.effective_database_url``).
    channels : sequence of str
        :data:`JOBS`, :data:`DELIVERIES`, or both.

    One dedicated connection LISTENs (PostgreSQL only); it is opened on the
    first :meth:`wait` and opened again after it fails (the server restarted),
    and notifications that arrive between two waits are kept for the next one.
    """

    def __init__(self, url: str, channels: Sequence[str]) -> None:
        unknown = set(channels) - set(CHANNELS)
        if unknown:
            raise ValueError(f"unknown channel(s) {sorted(unknown)}; known: {list(CHANNELS)}")
        self.channels = tuple(channels)
        self.listens = make_url(url).get_backend_name() == "postgresql"
        self._params = libpq_params(url) if self.listens else {}
        self._conn: Any = None
        self._woken = threading.Event()

    def _connection(self) -> Any:
        if self._conn is None:
            import psycopg

            conn = psycopg.connect(autocommit=True, connect_timeout=10, **self._params)
            for channel in self.channels:
                conn.execute(f"LISTEN {channel}")  # fixed names from CHANNELS
            self._conn = conn
        return self._conn

    def wait(self, timeout: float) -> bool:
        """Block until a notification (True) or ``timeout`` seconds (False).

        Never raises for a lost connection: it waits out the timeout and
        listens again at the next call.
        """
        if self._woken.is_set():
            self._woken.clear()
            return True
        if not self.listens:
            woken = self._woken.wait(timeout)
            self._woken.clear()
            return woken
        import psycopg

        try:
            for _notify in self._connection().notifies(timeout=timeout, stop_after=1):
                return True
            return False
        except psycopg.Error as exc:
            logger.warning("index notifications lost (%s); listening again at the next wait", exc)
            self._close_connection()
            woken = self._woken.wait(timeout)
            self._woken.clear()
            return woken

    def wake(self) -> None:
        """Make the next :meth:`wait` return at once; on SQLite also the current one.

        A PostgreSQL wait in progress ends at its notification or timeout.
        """
        self._woken.set()

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            import psycopg

            try:
                conn.close()
            except psycopg.Error as exc:  # closing a broken connection
                logger.debug("closing the listening connection failed: %s", exc)

    def close(self) -> None:
        """Stop listening and close the connection."""
        self._close_connection()
