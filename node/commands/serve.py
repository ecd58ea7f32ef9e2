"""``ichnode serve``: run the node in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import sys

from sqlalchemy.exc import SQLAlchemyError

from config.settings import load_settings
from node.scp import configure_pydicom
from node.service import NodeService

logger = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    """Load the settings, upgrade the index, serve until signalled; return the exit code."""
    settings = load_settings(getattr(args, "config", None))
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # pynetdicom logs every PDU and DIMSE message at INFO.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    configure_pydicom()
    try:
        service = NodeService(settings)
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
