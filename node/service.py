"""The node service: the index, the archive and the components that run in ``ichnode serve``.

:class:`NodeService` makes the :class:`storage.index.Index` (engine and
sessionmaker) and :class:`storage.archive.Archive` once, upgrades the schema,
and starts its components in order (the SCP first). On stop the SCP goes first,
so nothing new arrives while the others (in reverse order) finish their work.

Adding a component (scheduler, workers, sender)
-----------------------------------------------
A module named in :data:`COMPONENT_FACTORIES` that exists is imported at
start-up and its ``component(service) -> Component`` function is called; it
may use ``service.index``, ``service.archive``, ``service.settings`` and
``service.scp.add_listener(...)``. A component is anything with ``name``,
``start()`` and ``stop()``; ``stop()`` must return once its threads are done.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Protocol

from config.settings import Settings
from node.scp import StorageSCP
from storage.archive import Archive
from storage.index import Index
from storage.recovery import reindex_unindexed

logger = logging.getLogger(__name__)

#: Modules that may contribute a component, started in this order after the SCP.
COMPONENT_FACTORIES: tuple[str, ...] = (
    "node.scheduler:component",
    "node.worker:component",
    "node.sender:component",
    "node.metrics:component",
)


class Component(Protocol):
    """A part of the running node."""

    name: str

    def start(self) -> None:
        """Start (non-blocking)."""

    def stop(self) -> None:
        """Stop and return once the component's threads have finished."""


ComponentFactory = Callable[["NodeService"], Component]


def discover_factories(targets: Iterable[str] = COMPONENT_FACTORIES) -> list[ComponentFactory]:
    """Return the factories of the ``module:function`` targets whose module exists."""
    factories: list[ComponentFactory] = []
    for target in targets:
        module_name, func = target.split(":")
        if importlib.util.find_spec(module_name) is None:
            continue
        module = importlib.import_module(module_name)
        factory = getattr(module, func, None)
        if factory is None:
            logger.debug("%s has no %s(); not a component", module_name, func)
            continue
        factories.append(factory)
    return factories


class NodeService:
    """Everything ``ichnode serve`` runs, started in order and stopped in reverse.

    Parameters
    ----------
    settings : Settings
        The loaded configuration.
    factories : iterable of callables, optional
        Component factories added after the SCP; ``None`` discovers
        :data:`COMPONENT_FACTORIES`.
    """

    def __init__(
        self, settings: Settings, factories: Iterable[ComponentFactory] | None = None
    ) -> None:
        self.settings = settings
        self.index = Index(
            settings.storage.effective_database_url,
            sqlite_synchronous=settings.storage.sqlite_synchronous,
        )
        self.archive = Archive(settings.storage.root)
        self.scp = StorageSCP(
            settings.node,
            settings.storage,
            self.archive,
            self.index,
            shutdown_grace_s=settings.node.shutdown_grace_seconds,
        )
        self.components: list[Component] = [self.scp]
        self._factories = list(discover_factories() if factories is None else factories)
        self._started: list[Component] = []
        self._stop_requested = threading.Event()

    def add_component(self, component: Component) -> None:
        """Add a component (before :meth:`start`); it starts after those already added."""
        self.components.append(component)

    def prepare(self) -> None:
        """Upgrade the schema and tidy what an earlier stop left behind."""
        self.index.upgrade()
        interrupted = self.index.mark_interrupted_associations()
        if interrupted:
            logger.warning("%d associations were open when the node last stopped", interrupted)
        self.archive.cleanup_incoming()
        reindex_unindexed(self.archive, self.index)

    def start(self) -> None:
        """Prepare, build the discovered components and start everything in order."""
        self.prepare()
        for factory in self._factories:
            self.add_component(factory(self))
        self._factories = []
        for component in self.components:
            component.start()
            self._started.append(component)
            logger.debug("started %s", component.name)

    def stop(self) -> None:
        """Stop the SCP first (no new instances), then the other components in reverse order."""
        if self.scp in self._started:
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

    def run_until_stopped(self, *, install_signals: bool = True) -> None:
        """Start, wait for SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        try:
            self.start()
            host, port = self.scp.address
            logger.info("ichnode serving as %s on %s:%d", self.settings.node.ae_title, host, port)
            while not self._stop_requested.wait(0.5):
                pass
            logger.info("stopping")
        finally:
            self.stop()
