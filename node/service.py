"""The node service: the index, the archive and the roles that run in ``ichnode serve``.

:class:`NodeService` makes the :class:`storage.index.Index` (engine and
sessionmaker) and :class:`storage.archive.Archive` once, upgrades the schema,
and starts the components of its roles in order (the receiver first). On stop
the receiver goes first, so nothing new arrives while the others (in reverse
order) finish their work.

Roles (:data:`ROLES`)
---------------------
``ichnode serve`` runs every role in one process tree; ``ichnode serve --role
worker`` (or any subset) runs only those, so a site can place receivers near
its scanners and workers on GPU hosts, all sharing one PostgreSQL index and one
archive folder. Every arrow between roles goes through the index:

- ``receiver``: the C-STORE SCP (:mod:`node.scp`); with ``node.receivers = N``,
  N processes accept on the same port (``SO_REUSEPORT``, :class:`ReceiverPool`);
- ``scheduler``: series completion and jobs (:mod:`node.scheduler`); one is
  active across every process on the index (:class:`storage.leader.Leadership`),
  the others stand by;
- ``worker``: ``inference.workers`` processes running the model (:mod:`node.worker`);
- ``sender``: the outbox (:mod:`node.sender`).

Every process also serves its metrics endpoint (:mod:`node.metrics`) unless
``metrics.enabled`` is false or its port is 0.

The components are built in :func:`build_components`, one line per role, so a
reader can follow ``ichnode serve`` to each of them. A component is anything
with ``name``, ``start()`` and ``stop()``; ``stop()`` returns once its threads
or processes are done.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any, Protocol

from config.settings import Settings
from node import metrics, scheduler, sender, worker
from node.restarts import RestartPolicy
from node.scp import StorageSCP
from storage.archive import Archive
from storage.index import Index
from storage.recovery import reindex_unindexed

logger = logging.getLogger(__name__)

#: A receiver process that dies sooner than this after its start counts as failing to start.
RECEIVER_SETTLE_SECONDS = 10.0

#: The roles of ``ichnode serve --role``, in the order they start.
ROLES: tuple[str, ...] = ("receiver", "scheduler", "worker", "sender")


class Component(Protocol):
    """A part of the running node."""

    name: str

    def start(self) -> None:
        """Start (non-blocking)."""

    def stop(self) -> None:
        """Stop and return once the component's threads have finished."""


ComponentFactory = Callable[["NodeService"], Component]


def parse_roles(values: Iterable[str] | None) -> tuple[str, ...]:
    """``["receiver,worker", "sender"]`` -> the roles in :data:`ROLES` order; none: all.

    Raises
    ------
    ValueError
        For a name that is not a role.
    """
    names = [n.strip() for v in (values or []) for n in v.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}")
    return tuple(r for r in ROLES if r in names) if names else ROLES


def build_components(service: NodeService) -> list[Component]:
    """The components of ``service.roles`` after the receiver's SCP, in start order."""
    roles = service.roles
    built: list[Component] = []
    if "receiver" in roles and service.settings.node.receivers > 1:
        built.append(ReceiverPool(service.settings, service.settings.node.receivers - 1))
    if "scheduler" in roles:
        built.append(scheduler.component(service))
    if "worker" in roles:
        built.append(worker.component(service))
    if "sender" in roles:
        built.append(sender.component(service))
    built.append(metrics.component(service))
    return built


def _receiver_main(settings_data: dict[str, Any], stop: Any, log_level: int) -> None:
    """Entry point of an extra receiver process (:class:`ReceiverPool`)."""
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    )
    worker._die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    settings = Settings.model_validate(settings_data)
    # Its own metrics endpoint would collide with the main process's port.
    settings = settings.model_copy(
        update={"metrics": settings.metrics.model_copy(update={"enabled": False})}
    )
    service = NodeService(settings, roles=("receiver",), extra_receivers=False)
    signal.signal(signal.SIGTERM, service.request_stop)
    service.start()
    try:
        while not service.wait_stop_requested(0.5):
            if stop.value:
                break
    finally:
        service.stop()


class ReceiverPool:
    """``node.receivers - 1`` further receiver processes on the node's port.

    Each process is a whole receiver (SCP, index engine, archive) accepting on
    the same address with ``SO_REUSEPORT``: the kernel spreads new connections
    over them, so ingest is not held to one interpreter. A process that dies is
    started again; the associations it held fail on the sender's side, which
    sends again (nothing it acknowledged is lost: each instance is on disk and
    in the index before its success status).
    """

    name = "receivers"

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self._ctx = multiprocessing.get_context("spawn")
        self._stop: Any = self._ctx.RawValue(ctypes.c_bool, False)
        self._processes: list[BaseProcess] = []
        self._started_at: list[float] = []
        self._restarts = RestartPolicy(0)
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def _spawn(self) -> BaseProcess:
        process = self._ctx.Process(
            target=_receiver_main,
            args=(
                self.settings.model_dump(mode="json"),
                self._stop,
                logging.getLogger().getEffectiveLevel(),
            ),
            name="ichnode-receiver",
            daemon=True,
        )
        process.start()
        return process

    def start(self) -> None:
        """Start the receiver processes."""
        self._processes = [self._spawn() for _ in range(self.count)]
        self._started_at = [time.monotonic()] * self.count
        self._restarts = RestartPolicy(self.count)
        logger.info(
            "started %d more receiver process(es) on port %d", self.count, self.settings.node.port
        )
        self._watcher = threading.Thread(
            target=self._watch, name="ichnode-receivers", daemon=True
        )
        self._watcher.start()

    def _watch(self) -> None:
        while not self._watch_stop.wait(1.0):
            self.check()

    def check(self) -> int:
        """Start again the receivers that died; return how many were started.

        The rule is :class:`node.restarts.RestartPolicy`'s: one that ended with
        exit code 0 was stopped on purpose and stays stopped; one that dies
        within :data:`RECEIVER_SETTLE_SECONDS` of its start (it cannot bind, its
        index is unusable) waits a pause that doubles up to 5 minutes.
        """
        if self._stop.value:
            return 0
        restarted = 0
        now = time.monotonic()
        for i, process in enumerate(self._processes):
            if process.is_alive():
                continue
            early = now - self._started_at[i] < RECEIVER_SETTLE_SECONDS
            verdict = self._restarts.dead(i, process.exitcode, early, now)
            if verdict.pause:
                logger.error(
                    "receiver pid %s exited with %s; starting another in %.0f s",
                    process.pid,
                    process.exitcode,
                    verdict.pause,
                )
            if not verdict.start:
                continue
            if not self._restarts.failures(i):
                logger.error(
                    "receiver pid %s exited with %s; starting another",
                    process.pid,
                    process.exitcode,
                )
            self._processes[i] = self._spawn()
            self._started_at[i] = time.monotonic()
            restarted += 1
        return restarted

    def pids(self) -> list[int]:
        """The pids of the receiver processes."""
        return [p.pid for p in self._processes if p.pid is not None]

    def stop(self, timeout: float | None = None) -> None:
        """Stop the receivers: each lets its associations finish (``shutdown_grace_seconds``)."""
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join()
        self._stop.value = True
        for process in self._processes:
            if process.is_alive():
                process.terminate()  # SIGTERM: the receiver stops as ichnode serve does
        grace = self.settings.node.shutdown_grace_seconds + 10.0 if timeout is None else timeout
        for process in self._processes:
            process.join(grace)
            if process.is_alive():
                logger.warning("receiver pid %s did not stop; killing it", process.pid)
                process.kill()
                process.join(5)


class NodeService:
    """Everything ``ichnode serve`` runs, started in order and stopped in reverse.

    Parameters
    ----------
    settings : Settings
        The loaded configuration.
    factories : iterable of callables, optional
        Component factories added after the SCP instead of those of the roles
        (:func:`build_components`); ``[]`` runs the receiver alone.
    roles : sequence of str, optional
        The roles this process runs (default: all of :data:`ROLES`).
    extra_receivers : bool
        Start the ``node.receivers - 1`` further receiver processes (False inside
        one of them).
    """

    def __init__(
        self,
        settings: Settings,
        factories: Iterable[ComponentFactory] | None = None,
        *,
        roles: Sequence[str] = ROLES,
        extra_receivers: bool = True,
    ) -> None:
        self.settings = settings
        self.roles = tuple(r for r in ROLES if r in roles)
        if not self.roles:
            raise ValueError("no role to run")
        self.index = Index(
            settings.storage.effective_database_url,
            sqlite_synchronous=settings.storage.sqlite_synchronous,
        )
        self.archive = Archive(settings.storage.root)
        self.scp: StorageSCP | None = None
        if "receiver" in self.roles:
            self.scp = StorageSCP(
                settings.node,
                settings.storage,
                self.archive,
                self.index,
                shutdown_grace_s=settings.node.shutdown_grace_seconds,
                reuse_port=settings.node.receivers > 1,
            )
        self.components: list[Component] = [self.scp] if self.scp is not None else []
        self._factories = None if factories is None else list(factories)
        self._extra_receivers = extra_receivers
        self._started: list[Component] = []
        self._stop_requested = threading.Event()

    def add_component(self, component: Component) -> None:
        """Add a component (before :meth:`start`); it starts after those already added."""
        self.components.append(component)

    def prepare(self) -> None:
        """Upgrade the schema; a receiver also tidies what an earlier stop left behind.

        Receivers sharing the index and the archive touch only what processes
        that are gone left: their open associations and partial files.
        """
        self.index.upgrade()
        if self.scp is None:
            return
        interrupted = self.index.mark_interrupted_associations()
        if interrupted:
            logger.warning("%d associations were open when the node last stopped", interrupted)
        self.archive.cleanup_incoming()
        reindex_unindexed(self.archive, self.index)

    def start(self) -> None:
        """Prepare, build the components of the roles and start everything in order."""
        self.prepare()
        if self._factories is None:
            built = build_components(self)
            if not self._extra_receivers:
                built = [c for c in built if not isinstance(c, ReceiverPool)]
        else:
            built = [factory(self) for factory in self._factories]
        self._factories = []
        for component in built:
            self.add_component(component)
        for component in self.components:
            component.start()
            self._started.append(component)
            logger.debug("started %s", component.name)

    def stop(self) -> None:
        """Stop the SCP first (no new instances), then the other components in reverse order."""
        if self.scp is not None and self.scp in self._started:
            self._started.remove(self.scp)
            self.scp.stop()
            logger.debug("stopped %s", self.scp.name)
        while self._started:
            component = self._started.pop()
            component.stop()
            logger.debug("stopped %s", component.name)
        self.index.dispose()

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """Ask :meth:`run_until_stopped` to return (safe from a signal handler)."""
        self._stop_requested.set()

    def wait_stop_requested(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`request_stop`; True once asked."""
        return self._stop_requested.wait(timeout)

    def run_until_stopped(self, *, install_signals: bool = True) -> None:
        """Start, wait for SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.start()
            if self.scp is not None:
                host, port = self.scp.address
                logger.info(
                    "ichnode serving as %s on %s:%d (roles: %s)",
                    self.settings.node.ae_title,
                    host,
                    port,
                    ", ".join(self.roles),
                )
            else:
                logger.info("ichnode running (roles: %s)", ", ".join(self.roles))
            while not self._stop_requested.wait(0.5):
                pass
            logger.info("stopping")
        finally:
            self.stop()
