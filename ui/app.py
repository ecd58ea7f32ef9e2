"""Entry point of the web interface for ``streamlit run`` (see ``ichnode ui``).

``streamlit run ui/app.py`` finds the ASGI application ``app`` here and serves it:
Streamlit running ``ui/script.py`` (the pages), behind :class:`ui.hostguard.HostGuard`,
which answers only requests for ``localhost`` or ``127.0.0.1`` on the interface's
port and for the names in ``ui.allowed_hosts`` of the node's configuration (the
file named in ``ICHNODE_UI_CONFIG``).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import streamlit as st
from starlette.middleware import Middleware

from config import ConfigError, load_settings
from ui.hostguard import HostGuard

logger = logging.getLogger("ui.app")


def _extra_hosts() -> list[str]:
    try:
        return list(load_settings(os.environ.get("ICHNODE_UI_CONFIG") or None).ui.allowed_hosts)
    except ConfigError as exc:
        # The pages say what is wrong; meanwhile only the local names are served.
        logger.error("ui.allowed_hosts not read, serving localhost only: %s", exc)
        return []


@asynccontextmanager
async def _stop_cleanly(_app: st.App) -> AsyncIterator[None]:
    """On SIGTERM, shut down gracefully and exit 0, as Streamlit's own server does.

    uvicorn, which serves ``app``, re-raises a SIGTERM it handled once it has shut
    down, so the process would end killed by the signal and ``ichnode ui`` would
    report that as its exit status. The signal was asked for and handled: it is
    taken off uvicorn's list at the end of the shutdown. Should uvicorn keep that
    list elsewhere some day, the process merely ends by the signal again.
    """
    yield
    server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    captured = getattr(server, "_captured_signals", None)
    if isinstance(captured, list):
        captured[:] = [s for s in captured if s != signal.SIGTERM]


app = st.App(
    "script.py",
    middleware=[Middleware(HostGuard, extra_hosts=_extra_hosts())],
    lifespan=_stop_cleanly,
)
