"""Host and Origin checks in front of the web interface (against DNS rebinding).

A web page on any site can make the browser send requests to the interface on
127.0.0.1 under a host name whose DNS answer the site controls; the browser then
treats the interface as part of that site and lets the page read the answers.
:class:`HostGuard` is ASGI middleware that serves only requests whose ``Host``
header names the interface itself, ``localhost`` or ``127.0.0.1`` on the port the
request arrived at, or one of ``ui.allowed_hosts``, and whose ``Origin`` header,
when a browser sends one, names one of those too. Everything else, HTTP and
websocket alike, is refused (HTTP 403) and logged, before Streamlit sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOCAL_NAMES = ("localhost", "127.0.0.1")
_SHOWN = 120


def allowed_hosts(port: int | None, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` values (``name`` or ``name:port``, lower case) that are served.

    ``localhost`` and ``127.0.0.1`` count on ``port`` only; an entry of ``extra``
    with a port counts as written, one without a port counts bare (a proxy on the
    scheme's default port) and on ``port``.
    """
    hosts: set[str] = set()
    if port is not None:
        hosts.update(f"{name}:{port}" for name in LOCAL_NAMES)
    for entry in extra:
        entry = entry.strip().lower()
        if not entry:
            continue
        hosts.add(entry)
        if ":" not in entry and port is not None:
            hosts.add(f"{entry}:{port}")
    return frozenset(hosts)


def origin_host(origin: str) -> str | None:
    """``host[:port]`` of an ``Origin`` header, or None when it names no web origin."""
    try:
        parts = urlsplit(origin.strip())
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.netloc or "@" in parts.netloc:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    return parts.netloc.lower()


def _shown(value: str | None) -> str:
    """A header value fit for a log line: escaped, cut short."""
    if value is None:
        return "none"
    text = value if len(value) <= _SHOWN else value[:_SHOWN] + "…"
    return ascii(text)


class HostGuard:
    """ASGI middleware: serve only requests for an allowed host (see the module docstring).

    Parameters
    ----------
    app
        The application behind the guard (Streamlit's).
    extra_hosts
        ``ui.allowed_hosts``: more names (``name`` or ``name:port``) to serve.
    """

    def __init__(self, app: ASGIApp, extra_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.extra_hosts = tuple(extra_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        reason = self.refusal(scope)
        if reason is None:
            await self.app(scope, receive, send)
            return
        logger.warning(
            "web interface refused %s %s: %s",
            "websocket" if kind == "websocket" else str(scope.get("method", "HTTP")),
            _shown(str(scope.get("path", ""))),
            reason,
        )
        if kind == "websocket":
            # Closing before the handshake is accepted answers HTTP 403.
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b"ichnode: this host name is not served here (see ui.allowed_hosts)\n"
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def refusal(self, scope: Scope) -> str | None:
        """Why the request in ``scope`` is refused, or None when it is served."""
        server = scope.get("server")
        port = int(server[1]) if server and len(server) > 1 and server[1] else None
        allowed = allowed_hosts(port, self.extra_hosts)
        host: str | None = None
        origins: list[str] = []
        for name, value in scope.get("headers", ()):
            key = name.decode("latin-1").lower()
            if key == "host":
                if host is not None:
                    return "more than one Host header"
                host = value.decode("latin-1")
            elif key == "origin":
                origins.append(value.decode("latin-1"))
        if host is None or host.strip().lower() not in allowed:
            return f"Host {_shown(host)} is not allowed"
        if len(origins) > 1:
            return "more than one Origin header"
        if origins:
            named = origin_host(origins[0])
            if named is None or named not in allowed:
                return f"Origin {_shown(origins[0])} is not allowed"
        return None
