"""DNS rebinding: ``ichnode ui`` serves only its own host names, over HTTP and websocket.

A real ``ichnode ui`` over a node index holding patients; plain clients on real
sockets send the ``Host`` and ``Origin`` a browser would send after a rebinding
(``rebind.evil.example``), or from another local page (``localhost`` on another
port), and the ones of the interface itself. The websocket client speaks
Streamlit's protocol far enough to ask for the worklist: the allowed host gets
patient IDs, a foreign one gets HTTP 403 and nothing else.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.interop import missing
from tests.ui.conftest import NodeData, serve

PROXY_NAME = "ichnode.hospital.example"
EVIL = "rebind.evil.example"


@pytest.fixture(scope="module")
def ui_url(node_data: NodeData, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The interface over the node's index, with one extra allowed name (a reverse proxy's)."""
    config = tmp_path_factory.mktemp("hosts") / "node.toml"
    config.write_text(
        node_data.config_path.read_text() + f'[ui]\nallowed_hosts = ["{PROXY_NAME}"]\n'
    )
    with serve(config) as url:
        yield url


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _get(url: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", _port(url), timeout=30)
    try:
        connection.request("GET", path, headers=headers)  # a given Host replaces the default
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_http_answers_only_its_own_host_names(ui_url: str) -> None:
    port = _port(ui_url)
    served = [
        {"Host": f"127.0.0.1:{port}"},
        {"Host": f"localhost:{port}"},
        {"Host": f"LOCALHOST:{port}", "Origin": f"http://localhost:{port}"},
        {"Host": PROXY_NAME, "Origin": f"https://{PROXY_NAME}"},
        {"Host": f"{PROXY_NAME}:{port}"},
    ]
    refused = [
        {"Host": EVIL},
        {"Host": f"{EVIL}:{port}", "Origin": f"http://{EVIL}:{port}"},
        {"Host": f"localhost:{port + 1}"},  # another port: not this interface
        {"Host": f"127.0.0.1:{port}", "Origin": f"http://{EVIL}"},
        {"Host": f"127.0.0.1:{port}", "Origin": "http://localhost:9999"},  # another local page
        {"Host": f"127.0.0.1:{port}", "Origin": "null"},
        {"Host": f"127.0.0.1:{port}.{EVIL}"},
        {"Host": ""},
    ]
    for path in ("/", "/_stcore/health", "/_stcore/host-config"):
        for headers in served:
            status, _ = _get(ui_url, path, headers)
            assert status == 200, (path, headers, status)
        for headers in refused:
            status, body = _get(ui_url, path, headers)
            assert status == 403, (path, headers, status)
            assert b"not served here" in body
            assert b"<html" not in body.lower()


def _worklist_over_websocket(port: int, host: str, origin: str, seconds: float = 60.0) -> bytes:
    """What Streamlit sends a websocket client that asks for the first page, until a patient ID.

    Raises websockets' InvalidStatus when the handshake is refused.
    """
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from websockets.sync.client import connect
    from websockets.typing import Origin, Subprotocol

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    with connect(
        f"ws://{host}/_stcore/stream",
        sock=sock,
        origin=Origin(origin),
        subprotocols=[Subprotocol("streamlit")],
        open_timeout=30,
    ) as ws:
        message = BackMsg()
        message.rerun_script.query_string = ""
        message.rerun_script.page_script_hash = ""
        ws.send(message.SerializeToString())
        received = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and b"ICH-POS" not in received:
            try:
                chunk = ws.recv(timeout=2)
            except TimeoutError:
                continue
            received += chunk if isinstance(chunk, bytes) else chunk.encode()
        return received


def test_websocket_gives_the_worklist_only_to_its_own_host_names(ui_url: str) -> None:
    try:
        from websockets.exceptions import InvalidStatus
    except ImportError:
        missing("Python websockets is not installed (it comes with uvicorn[standard])")
        return
    port = _port(ui_url)
    # the interface itself: the worklist with its patients
    received = _worklist_over_websocket(port, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}")
    assert b"ICH-POS" in received
    received = _worklist_over_websocket(port, PROXY_NAME, f"https://{PROXY_NAME}")
    assert b"ICH-POS" in received
    # a rebound name, another local page, a foreign page on the right Host: no handshake
    for host, origin in [
        (EVIL, f"http://{EVIL}"),
        (f"{EVIL}:{port}", f"http://{EVIL}:{port}"),
        (f"127.0.0.1:{port}", "http://localhost:9999"),
        (f"localhost:{port}", f"http://{EVIL}"),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            _worklist_over_websocket(port, host, origin, seconds=5)
        assert refused.value.response.status_code == 403, (host, origin)


def test_allowed_hosts_are_checked_at_start(tmp_path: Path) -> None:
    from config import ConfigError, load_settings

    config = tmp_path / "node.toml"
    config.write_text('[ui]\nallowed_hosts = ["bad host/"]\n')
    with pytest.raises(ConfigError, match="bad host/"):
        load_settings(config)
