"""The OHIF v3 web viewer for tests: its prebuilt ``dist/`` served with Orthanc's DICOMweb.

OHIF ships prebuilt in the npm package ``@ohif/app`` (folder ``dist/``).
:func:`ohif_dist` finds an unpacked copy: ``$ICHNODE_OHIF_DIST``, else
``~/.cache/ichnode/ohif/<version>/package/dist`` (what ``.ci/run`` unpacks from
``npm pack @ohif/app@<version>``). Without it the test skips, or fails under
``ICHNODE_REQUIRE_INTEROP=1``.

:class:`OhifServer` serves that build and Orthanc's DICOMweb root from one
origin (the viewer at ``/``, DICOMweb under ``/dicom-web/``, passed through to
Orthanc), so the browser needs no CORS; ``/app-config.js`` is the
configuration of :func:`app_config`, the one ``docs/OHIF.md`` gives sites.
"""

from __future__ import annotations

import contextlib
import mimetypes
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.interop import free_port, missing

OHIF_VERSION = "3.13.2"
OHIF_CACHE = Path.home() / ".cache" / "ichnode" / "ohif"

# The data source a site puts in OHIF's app-config.js for a DICOMweb PACS
# (Orthanc's plugin here); ROOT is replaced by the DICOMweb root URL.
APP_CONFIG = """window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  showErrorDetails: 'always',
  defaultDataSourceName: 'pacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {
        friendlyName: 'PACS (DICOMweb)',
        name: 'pacs',
        wadoUriRoot: 'ROOT',
        qidoRoot: 'ROOT',
        wadoRoot: 'ROOT',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


def app_config(dicomweb_root: str) -> str:
    """OHIF's ``app-config.js`` for a PACS whose DICOMweb root is ``dicomweb_root``."""
    return APP_CONFIG.replace("ROOT", dicomweb_root.rstrip("/"))


def ohif_dist() -> Path:
    """The unpacked OHIF build (its ``index.html`` folder), or skip/fail with the reason."""
    configured = os.environ.get("ICHNODE_OHIF_DIST", "")
    path = Path(configured) if configured else OHIF_CACHE / OHIF_VERSION / "package" / "dist"
    if not (path / "index.html").is_file():
        missing(
            f"OHIF {OHIF_VERSION} build not found at {path} (npm pack @ohif/app@{OHIF_VERSION} "
            f"and unpack it there, as .ci/run does, or set ICHNODE_OHIF_DIST)"
        )
    return path


class _Handler(BaseHTTPRequestHandler):
    server: _OhifHttpServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web/"):
            self._proxy()
            return
        if path == "/app-config.js":
            self._send(200, self.server.config.encode(), "application/javascript")
            return
        target = (self.server.dist / path.lstrip("/")).resolve()
        if not target.is_file() or self.server.dist not in target.parents:
            target = self.server.dist / "index.html"  # the viewer's own routes (/viewer, ...)
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            kind = "application/wasm"
        self._send(200, target.read_bytes(), kind)

    def _proxy(self) -> None:
        request = urllib.request.Request(self.server.upstream + self.path[len("/dicom-web") :])
        for header in ("Accept", "Range"):
            if self.headers.get(header):
                request.add_header(header, str(self.headers[header]))
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                body = response.read()
                status = response.status
                kind = response.headers.get("Content-Type", "application/octet-stream")
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
            kind = exc.headers.get("Content-Type", "text/plain")
        self.server.requests.append((self.path, status))
        self._send(status, body, kind)


class _OhifHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, dist: Path, upstream: str) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.dist = dist.resolve()
        self.upstream = upstream.rstrip("/")
        self.config = ""
        self.requests: list[tuple[str, int]] = []


@contextlib.contextmanager
def serve_ohif(dist: Path, dicomweb_url: str) -> Iterator[_OhifHttpServer]:
    """OHIF at ``http://127.0.0.1:<port>/`` with ``dicomweb_url`` proxied under ``/dicom-web``.

    Yields the server; ``server.url`` is the viewer's origin and
    ``server.requests`` lists the DICOMweb requests with their status.
    """
    port = free_port()
    server = _OhifHttpServer(port, dist, dicomweb_url)
    server.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    server.config = app_config(f"{server.url}/dicom-web")  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="ohif-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
