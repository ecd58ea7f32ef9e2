"""One clock, one backoff rule and one process identity for the index's state machines.

Every job and delivery transition (:mod:`storage.jobs`, :mod:`storage.outbox`)
reads the time from :func:`utcnow`, waits after a failure by
:func:`backoff_seconds`, and names the process that holds a row by
:func:`process_id` (``host:pid``), so a process on another machine sharing the
index can tell a holder that is gone (:func:`process_gone`) from one that is
only on another host.
"""

from __future__ import annotations

import datetime as dt
import os
import socket

from storage.models import utcnow

__all__ = ["as_utc", "backoff_seconds", "process_gone", "process_id", "utcnow"]


def as_utc(value: dt.datetime) -> dt.datetime:
    """``value`` as an aware UTC datetime (SQLite returns naive UTC)."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failed try (1-based).

    ``initial`` after the first failure, doubling after each further one, never
    more than ``maximum``; 0 before any failure.
    """
    if attempts < 1:
        return 0.0
    exponent = min(attempts - 1, 62)
    return float(min(maximum, initial * (2.0**exponent)))


def process_id() -> str:
    """This process as it is recorded on the rows it holds: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_gone(holder: str | None) -> bool:
    """True when ``holder`` (``host:pid``) names a process of this host that no longer runs.

    A holder on another host is never "gone" by this test: only its heartbeat
    or lease can tell. An empty or unreadable holder counts as gone.
    """
    if not holder:
        return True
    host, _, pid_text = holder.rpartition(":")
    if host != socket.gethostname():
        return False
    try:
        pid = int(pid_text)
    except ValueError:
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
