"""When a supervised process that died is started again: one rule for the pools.

The receiver pool (``node.service.ReceiverPool``) and the worker pool
(``node.worker.WorkerPool``) each keep N processes alive. Both follow the same
rule, kept here:

* a process that ended with exit code 0 was stopped on purpose (SIGTERM to the
  process group, as systemd stops a unit, reaches it before its pool stops)
  and stays stopped;
* one that died *early* (the pool says what early is: a receiver that lived
  under ten seconds, a worker that died before its model was ready) is started
  again after a pause that doubles with each early death in a row, from
  5 seconds up to 5 minutes, so a broken set-up does not spin;
* one that died after working is started again at once, and the count of early
  deaths starts over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.runtime import backoff_seconds

#: Pause after the first early death, and the most it doubles to (seconds).
FIRST_PAUSE_SECONDS = 5.0
LONGEST_PAUSE_SECONDS = 300.0


@dataclass
class Verdict:
    """What to do with one dead process now.

    ``start``: start it again now. ``pause``: seconds it waits, set only on the
    first look at a death that makes it wait (for the log). ``stopped``: it
    ended on purpose and stays down.
    """

    start: bool
    pause: float = 0.0
    stopped: bool = False


@dataclass
class RestartPolicy:
    """Restart decisions for ``count`` process slots (index ``i``)."""

    count: int
    first: float = FIRST_PAUSE_SECONDS
    longest: float = LONGEST_PAUSE_SECONDS
    _failures: list[int] = field(default_factory=list)
    _restart_at: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._failures = [0] * self.count
        self._restart_at = [0.0] * self.count

    def add(self) -> int:
        """One more slot; returns its index."""
        self._failures.append(0)
        self._restart_at.append(0.0)
        self.count += 1
        return self.count - 1

    def failures(self, i: int) -> int:
        """Early deaths in a row of slot ``i``."""
        return self._failures[i]

    def dead(self, i: int, exitcode: int | None, early: bool, now: float) -> Verdict:
        """Slot ``i``'s process is not alive (``exitcode`` as multiprocessing gives it).

        Call it at every look while the process is down; ``early`` is read only
        at the first look after the death. ``now`` is ``time.monotonic()``.
        """
        if exitcode == 0:
            return Verdict(start=False, stopped=True)
        if now < self._restart_at[i]:
            return Verdict(start=False)
        if self._restart_at[i] == 0.0:  # first look at this death
            self._failures[i] = self._failures[i] + 1 if early else 0
            pause = backoff_seconds(self._failures[i], self.first, self.longest)
            if pause:
                self._restart_at[i] = now + pause
                return Verdict(start=False, pause=pause)
        self._restart_at[i] = 0.0
        return Verdict(start=True)
