"""DICOMweb destinations: the outbox sends by STOW-RS to a real Orthanc with its DICOMweb plugin.

Every test runs Orthanc (Debian ``orthanc``) with the plugin of Debian
``orthanc-dicomweb``; without them the tests skip, or fail under
``ICHNODE_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom.uid import generate_uid

from config.settings import DeliverySettings, DestinationSettings, load_settings
from node.dicomweb import DicomWebLink, _response_dataset, check_stow_response
from node.sender import Sender
from storage.index import Index
from storage.models import DeliveryState, Result
from tests.hardening.conftest import TlsFiles, tls_files
from tests.interop import free_port
from tests.loop.helpers import new_index, sc_dataset
from tests.loop.test_sender import _cli, _outbox, _rows
from tests.orthanc import Orthanc, orthanc_dicomweb, running_orthanc

pytestmark = pytest.mark.interop

__all__ = ["orthanc_dicomweb", "tls_files"]  # the fixtures, imported for pytest


def _dest(url: str, **auth: str) -> DestinationSettings:
    return DestinationSettings(name="web", kind="dicomweb", url=url, **auth)  # type: ignore[arg-type]


def _sender(index: Index, dest: DestinationSettings, **delivery: float) -> Sender:
    return Sender(index, [dest], DeliverySettings(**delivery), "ICHNODE")  # type: ignore[arg-type]


def _sop_uids(index: Index) -> set[str]:
    with index.session(readonly=True) as session:
        return {str(r.sop_instance_uid) for r in session.query(Result).all()}


def _orthanc_sop_uids(server: Orthanc) -> list[str]:
    """Every SOP Instance UID Orthanc holds, once per stored instance."""
    uids = []
    for instance_id in server.get("/instances"):
        tags = server.get(f"/instances/{instance_id}/simplified-tags")
        uids.append(str(tags["SOPInstanceUID"]))
    return uids


def _config(tmp_path: Path, index: Index, dest_toml: str) -> Path:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[storage]\nroot = "{tmp_path}"\ndatabase_url = "{index.url}"\n'
        f'[[destinations]]\nname = "web"\nkind = "dicomweb"\n{dest_toml}'
    )
    return cfg


def test_stow_rs_stores_each_object_once(tmp_path: Path, orthanc_dicomweb: Orthanc) -> None:
    index = new_index(tmp_path)
    ids = _outbox(index, tmp_path, ["web"], count=3)
    sender = _sender(index, _dest(orthanc_dicomweb.dicomweb_url))
    outcome = sender.send_once()
    assert sorted(outcome.sent) == sorted(ids)
    rows = _rows(index)
    assert all(
        r.state == DeliveryState.SENT and r.acked_at and r.attempts == 1 and not r.last_error
        for r in rows.values()
    )
    assert sorted(_orthanc_sop_uids(orthanc_dicomweb)) == sorted(_sop_uids(index))
    # nothing is sent twice
    assert sender.send_once().sent == []
    sender.stop()
    assert orthanc_dicomweb.instance_count() == 3
    # and the destination serves them back over DICOMweb (QIDO-RS)
    study = orthanc_dicomweb.get("/studies")
    assert len(study) == 1


def test_outage_delivers_everything_once_when_orthanc_is_back(
    tmp_path: Path, orthanc_dicomweb: Orthanc
) -> None:
    index = new_index(tmp_path)
    first = _outbox(index, tmp_path / "a", ["web"], count=2)
    sender = _sender(
        index,
        _dest(orthanc_dicomweb.dicomweb_url),
        backoff_initial_seconds=0.2,
        backoff_max_seconds=0.5,
        timeout_seconds=5,
    )
    assert sorted(sender.send_once().sent) == sorted(first)
    orthanc_dicomweb.stop()
    # results of a second series wait while the destination is down
    waiting = _outbox(index, tmp_path / "b", ["web"], count=3)
    outcome = sender.send_once()
    assert sorted(outcome.retried) == sorted(waiting) and outcome.sent == []
    rows = _rows(index)
    for delivery_id in waiting:
        assert rows[delivery_id].state == DeliveryState.PENDING
        # the first try found it down; the others of the pass say so without a request
        assert "cannot connect" in (rows[delivery_id].last_error or "")
    assert "destination unreachable" in (rows[waiting[-1]].last_error or "")
    time.sleep(0.3)
    assert sorted(sender.send_once().retried) == sorted(waiting)  # still down: tried again
    orthanc_dicomweb.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(
        r.state != DeliveryState.SENT for r in _rows(index).values()
    ):
        sender.send_once()
        time.sleep(0.1)
    sender.stop()
    rows = _rows(index)
    assert {r.state for r in rows.values()} == {DeliveryState.SENT}
    assert all(rows[i].attempts >= 3 for i in waiting)
    # nothing lost, nothing stored twice
    stored = _orthanc_sop_uids(orthanc_dicomweb)
    assert sorted(stored) == sorted(_sop_uids(index))
    assert len(stored) == 5


def test_wrong_credentials_dead_letter_then_outbox_retry(tmp_path: Path) -> None:
    index = new_index(tmp_path)
    first, second = _outbox(index, tmp_path, ["web"], count=2)
    users = {"ichnode": "right-password"}
    with running_orthanc(tmp_path / "orthanc", dicomweb=True, users=users) as server:
        wrong = _dest(server.dicomweb_url, username="ichnode", password="wrong")
        # deliveries may live 0.72 s
        sender = _sender(index, wrong, backoff_initial_seconds=0.1, max_age_hours=0.0002)
        outcome = sender.send_once()
        assert sorted(outcome.retried) == [first, second]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            r.state == DeliveryState.DEAD for r in _rows(index).values()
        ):
            sender.send_once()
            time.sleep(0.1)
        sender.stop()
        rows = _rows(index)
        assert {r.state for r in rows.values()} == {DeliveryState.DEAD}
        for row in rows.values():
            assert row.attempts >= 2
            assert "HTTP 401" in (row.last_error or "")
            assert "check username/password or token" in (row.last_error or "")
        assert server.instance_count() == 0
        # the operator sees why, fixes the password and retries
        right = (
            f'url = "{server.dicomweb_url}"\nusername = "ichnode"\npassword = "right-password"\n'
        )
        cfg = _config(tmp_path, index, right)
        listed = _cli("outbox", "--config", str(cfg), "list")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count(" dead ") == 2 and "HTTP 401" in listed.stdout
        retried = _cli("outbox", "--config", str(cfg), "retry")
        assert retried.returncode == 0, retried.stderr
        fixed = load_settings(cfg).destinations[0]
        sender = _sender(index, fixed)
        assert sorted(sender.send_once().sent) == [first, second]
        sender.stop()
        assert sorted(_orthanc_sop_uids(server)) == sorted(_sop_uids(index))


def test_wrong_url_is_a_clear_reason(tmp_path: Path, orthanc_dicomweb: Orthanc) -> None:
    index = new_index(tmp_path)
    (delivery_id,) = _outbox(index, tmp_path, ["web"])
    # the REST root instead of the DICOMweb root
    sender = _sender(index, _dest(orthanc_dicomweb.http_url + "/dicomweb"))
    assert sender.send_once().retried == [delivery_id]
    sender.stop()
    error = _rows(index)[delivery_id].last_error or ""
    assert "HTTP 404" in error and "STOW-RS base" in error, error
    assert orthanc_dicomweb.instance_count() == 0


_REJECT_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.SeriesDescription == 'REJECT ME' then
    error('refused by the test filter')
  end
  return true
end
"""


def test_instance_not_confirmed_is_retried(tmp_path: Path) -> None:
    """Orthanc answers 200 but stores nothing: the response does not list it, so not sent."""
    script = tmp_path / "reject.lua"
    script.write_text(_REJECT_LUA)
    index = new_index(tmp_path)
    (delivery_id,) = _outbox(index, tmp_path, ["web"])
    with index.session(readonly=True) as session:
        path = Path(session.query(Result).one().path)
    from pydicom import dcmread

    ds = dcmread(path)
    ds.SeriesDescription = "REJECT ME"
    ds.save_as(path)
    extra = {"LuaScripts": [str(script)]}
    with running_orthanc(tmp_path / "orthanc", dicomweb=True, extra_config=extra) as server:
        sender = _sender(index, _dest(server.dicomweb_url), backoff_initial_seconds=0.1)
        assert sender.send_once().retried == [delivery_id]
        sender.stop()
        row = _rows(index)[delivery_id]
        assert row.state == DeliveryState.PENDING
        assert "does not list the instance as stored" in (row.last_error or "")
        assert server.instance_count() == 0


def test_failed_sop_sequence_of_a_real_409_is_read(
    tmp_path: Path, orthanc_dicomweb: Orthanc
) -> None:
    """Orthanc's 409 answer (study UID of the URL and the instance differ) names the failure."""
    ds = sc_dataset(generate_uid())
    link = DicomWebLink(_dest(orthanc_dicomweb.dicomweb_url), timeout=10)
    with pytest.raises(requests.HTTPError) as info:
        link.client().store_instances([ds], study_instance_uid=generate_uid())
    link.release()
    assert info.value.response is not None and info.value.response.status_code == 409
    body = _response_dataset(info.value.response)
    assert body is not None and len(body.FailedSOPSequence) == 1
    ok, reason = check_stow_response(body, str(ds.SOPInstanceUID))
    assert not ok and "STOW-RS failed for the instance" in reason and "0x" in reason


def test_settings_of_a_dicomweb_destination(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[[destinations]]\nname = "cloud"\nkind = "dicomweb"\n'
        'url = "https://pacs.example/dicom-web"\ntoken = "abc"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
    )
    cloud, pacs = load_settings(cfg).destinations
    assert cloud.kind == "dicomweb" and cloud.tls_verify and cloud.token is not None
    assert "abc" not in repr(cloud)  # secrets stay out of logs
    assert pacs.kind == "dimse"
    cfg.write_text('[[destinations]]\nname = "cloud"\nkind = "dicomweb"\nhost = "x"\n')
    from config.settings import ConfigError

    with pytest.raises(ConfigError, match="url"):
        load_settings(cfg)


class TlsTerminator:
    """A real TLS front (as nginx would be) relaying to Orthanc's plain HTTP port.

    Debian's Orthanc 1.10.1 crashes on its own ``SslEnabled`` server, so the
    HTTPS leg is this relay, with the test CA's server certificate.
    """

    def __init__(self, files: TlsFiles, backend_port: int) -> None:
        import socket
        import ssl
        import threading

        self.port = free_port()
        self.backend_port = backend_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(files.server_cert, files.server_key)
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self._stop = threading.Event()
        self._threading = threading
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _pump(self, source: Any, sink: Any) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()

    def _serve(self, raw: Any) -> None:
        import socket

        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except OSError:
            raw.close()  # the handshake failed: the client did not trust us
            return
        backend = socket.create_connection(("127.0.0.1", self.backend_port))
        self._threading.Thread(target=self._pump, args=(backend, client), daemon=True).start()
        self._pump(client, backend)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            raw.settimeout(10)
            self._threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.listener.close()


def test_https_is_verified_by_default_and_the_ca_bundle_trusts(
    tmp_path: Path, tls_files: TlsFiles, orthanc_dicomweb: Orthanc
) -> None:
    index = new_index(tmp_path)
    (delivery_id,) = _outbox(index, tmp_path, ["web"])
    front = TlsTerminator(tls_files, orthanc_dicomweb.http_port)
    url = f"https://127.0.0.1:{front.port}/dicom-web"
    try:
        # the test CA is not a system CA: verification (on by default) refuses the server
        sender = _sender(index, _dest(url), backoff_initial_seconds=0.1)
        assert sender.send_once().retried == [delivery_id]
        sender.stop()
        error = _rows(index)[delivery_id].last_error or ""
        assert "TLS error" in error and "CERTIFICATE_VERIFY_FAILED" in error, error
        assert orthanc_dicomweb.instance_count() == 0
        time.sleep(0.2)
        trusted = DestinationSettings(
            name="web", kind="dicomweb", url=url, tls_ca_file=tls_files.ca_cert
        )
        sender = _sender(index, trusted)
        assert sender.send_once().sent == [delivery_id]
        sender.stop()
    finally:
        front.close()
    assert orthanc_dicomweb.instance_count() == 1


def test_bearer_token_is_sent(tmp_path: Path) -> None:
    """A real HTTP server that wants a bearer token: the header arrives; a 401 is a clear reason."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        index = new_index(tmp_path)
        (delivery_id,) = _outbox(index, tmp_path, ["web"])
        dest = _dest(f"http://127.0.0.1:{port}/dicom-web", token="s3cret-token")
        sender = _sender(index, dest)
        assert sender.send_once().retried == [delivery_id]
        sender.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Bearer s3cret-token"]
    error = _rows(index)[delivery_id].last_error or ""
    assert "HTTP 401" in error and "s3cret" not in error


@pytest.mark.slow
def test_serve_holds_results_while_the_dicomweb_archive_is_down(tmp_path: Path) -> None:
    """``ichnode serve``: a series arrives while the STOW-RS archive is stopped; its results
    wait in the outbox and all of them arrive, once each, after the archive starts."""
    from tests.loop.conftest import make_study, register_node, send_to_node, upload
    from tests.loop.harness import NodeRunner, wait_for

    study = make_study(tmp_path / "phantom", 102, (), n_slices=12)
    with (
        running_orthanc(tmp_path / "scanner", aet="SCANNER") as scanner,
        running_orthanc(tmp_path / "archive", dicomweb=True) as archive,
    ):
        extra = (
            f'\n[[destinations]]\nname = "archive"\nkind = "dicomweb"\n'
            f'url = "{archive.dicomweb_url}"\n'
        )
        node = NodeRunner(
            tmp_path / "node",
            [],
            quiet_seconds=2.0,
            backoff_initial=0.5,
            backoff_max=1.0,
            extra_toml=extra,
        )
        archive.stop()
        node.start()
        try:
            register_node(scanner, node.ae_title, node.port)
            upload(scanner, study.files)
            source = scanner.find_study(study.study_instance_uid)
            assert source is not None
            send_to_node(scanner, [source])

            def failing() -> bool:
                rows = node.deliveries()
                return bool(rows) and all(
                    r.state == DeliveryState.PENDING
                    and r.attempts >= 2
                    and "cannot connect" in (r.last_error or "")
                    for r in rows
                )

            wait_for("deliveries retried while the archive is down", failing, 240)
            archive.start()
            wait_for(
                "every delivery acknowledged",
                lambda: all(r.state == DeliveryState.SENT for r in node.deliveries()),
                120,
            )
            rows = node.deliveries()
            results = node.results(study.series_instance_uid)
        finally:
            node.stop()
        stored = _orthanc_sop_uids(archive)
    assert len(rows) == len(results) >= 1
    assert sorted(stored) == sorted(r.sop_instance_uid for r in results)
