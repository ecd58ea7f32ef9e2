"""A real Orthanc for tests: started from a temporary config on free loopback ports.

``with running_orthanc(tmp_path) as server:`` (or the ``orthanc`` pytest fixture)
gives a started :class:`Orthanc` with its AE title, DICOM port, HTTP URL, small
REST helpers and ``start``/``stop``/``restart``. Storage and index live under the
test's temporary folder, so a restart keeps what was stored. When the Orthanc
binary is missing the test skips (or fails with ``ICHNODE_REQUIRE_INTEROP=1``).

``Orthanc(root, dicomweb=True)`` loads the DICOMweb plugin (Debian
``orthanc-dicomweb``) and serves STOW-RS/QIDO-RS/WADO-RS under
:attr:`Orthanc.dicomweb_url`; ``users={"name": "password"}`` turns on HTTP basic
authentication (the REST helpers then log in as the first user).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop import free_port, missing, require_tool

logger = logging.getLogger(__name__)

# Where Debian's orthanc-dicomweb puts the plugin (``dpkg -L orthanc-dicomweb``).
DICOMWEB_PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)


def dicomweb_plugin() -> Path:
    """The DICOMweb plugin of Orthanc, or skip/fail with a clear reason."""
    for path in DICOMWEB_PLUGIN_PATHS:
        if path.is_file():
            return path
    for path in sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")):
        return path
    missing("Orthanc's DICOMweb plugin not found (apt-get install orthanc-dicomweb)")
    raise AssertionError("unreachable")


class OrthancError(RuntimeError):
    """Orthanc did not start, stop or answer as expected."""


class Orthanc:
    """One Orthanc process with its own configuration, storage and log."""

    def __init__(
        self,
        root: Path,
        *,
        aet: str = "ORTHANC",
        binary: str | None = None,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.binary = binary or require_tool("Orthanc", "orthanc")
        self.plugin = dicomweb_plugin() if dicomweb else None
        self.users = dict(users or {})
        self.extra_config = dict(extra_config or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.host = "127.0.0.1"
        self.config_path = self.root / "orthanc.json"
        self.log_path = self.root / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: Any = None
        self._write_config()

    @property
    def http_url(self) -> str:
        """Base URL of the REST API."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (the STOW-RS base) of the plugin."""
        if self.plugin is None:
            raise OrthancError("this Orthanc was started without the DICOMweb plugin")
        return f"{self.http_url}/dicom-web"

    def _write_config(self) -> None:
        config = {
            "Name": "ichnode-test-orthanc",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": False,
            "DicomModalities": {},
            "Plugins": [str(self.plugin)] if self.plugin is not None else [],
            "DicomWeb": {"Enable": self.plugin is not None, "Root": "/dicom-web/"},
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
        }
        config.update(self.extra_config)
        self.config_path.write_text(json.dumps(config, indent=2))

    def start(self, timeout: float = 30.0) -> None:
        """Start the process and wait until its REST API answers."""
        if self._process is not None and self._process.poll() is None:
            return
        self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            [self.binary, str(self.config_path)],
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with {self._process.returncode}: {self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                self.get("/system")
                return
            time.sleep(0.2)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {timeout} s: {self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL after ``timeout``)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def restart(self) -> None:
        """Stop and start again on the same ports, storage and index."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of Orthanc's log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- REST ------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(self.http_url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def get(self, path: str) -> Any:
        """GET a REST path and decode its JSON."""
        return self._request("GET", path)

    def post(self, path: str, data: Any) -> Any:
        """POST JSON (or a plain string body) to a REST path and decode the answer."""
        body = data.encode() if isinstance(data, str) else json.dumps(data).encode()
        return self._request("POST", path, body)

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc's ID of the study with ``study_instance_uid``, or None."""
        for match in self.post("/tools/lookup", study_instance_uid) or []:
            if match.get("Type") == "Study":
                return str(match["ID"])
        return None

    def study_series(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """The series of a study as Orthanc lists them (``/studies/<id>/series``)."""
        study_id = self.find_study(study_instance_uid)
        if study_id is None:
            return []
        return list(self.get(f"/studies/{study_id}/series"))

    def instance_count(self) -> int:
        """Number of instances stored."""
        return int(self.get("/statistics")["CountInstances"])


@contextlib.contextmanager
def running_orthanc(
    root: Path,
    *,
    aet: str = "ORTHANC",
    dicomweb: bool = False,
    users: dict[str, str] | None = None,
    extra_config: dict[str, Any] | None = None,
) -> Iterator[Orthanc]:
    """A started Orthanc under ``root``, stopped on exit (also when the test fails).

    ``extra_config`` keys are added to (or replace those of) Orthanc's configuration.
    """
    server = Orthanc(root, aet=aet, dicomweb=dicomweb, users=users, extra_config=extra_config)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """pytest fixture: a started Orthanc in the test's temporary folder."""
    with running_orthanc(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def orthanc_dicomweb(tmp_path: Path) -> Iterator[Orthanc]:
    """pytest fixture: a started Orthanc with its DICOMweb plugin."""
    with running_orthanc(tmp_path / "orthanc-dicomweb", dicomweb=True) as server:
        yield server


__all__ = [
    "Orthanc",
    "OrthancError",
    "dicomweb_plugin",
    "orthanc",
    "orthanc_dicomweb",
    "running_orthanc",
]
