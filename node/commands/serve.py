"""``ichnode serve``: run the node in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys

from sqlalchemy.exc import SQLAlchemyError

from config.settings import load_settings
from node.scp import configure_pydicom
from node.service import NodeService, parse_roles

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """Load the settings, upgrade the index, serve until signalled; return the exit code."""
    settings = load_settings(getattr(args, "config", None))
    try:
        roles = parse_roles(getattr(args, "role", None))
    except ValueError as exc:
        print(f"ichnode serve: {exc}", file=sys.stderr)
        return 2
    metrics_port = getattr(args, "metrics_port", None)
    if metrics_port is not None:
        if not 0 <= metrics_port <= 65535:
            print(f"ichnode serve: --metrics-port {metrics_port} is not a port", file=sys.stderr)
            return 2
        settings = settings.model_copy(
            update={"metrics": settings.metrics.model_copy(update={"port": metrics_port})}
        )
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # pynetdicom logs every PDU and DIMSE message at INFO.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    configure_pydicom()
    try:
        service = NodeService(settings, roles=roles)
        service.run_until_stopped()
    except OSError as exc:
        print(
            f"ichnode serve: cannot listen on {settings.node.host}:{settings.node.port} "
            f"or use {settings.storage.root}: {exc}",
            file=sys.stderr,
        )
        return 2
    except SQLAlchemyError as exc:
        print(
            f"ichnode serve: index database unusable: {exc.__class__.__name__}: {exc}",
            file=sys.stderr,
        )
        return 2
    return 0
