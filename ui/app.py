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


app = st.App(
    "script.py",
    middleware=[Middleware(HostGuard, extra_hosts=_extra_hosts())],
)
