"""DICOM TLS: the receiver with ``[node.tls]`` and the sender with ``tls = true``.

Certificates are made in the session with ``openssl`` (a CA, a server
certificate for 127.0.0.1/localhost, a client certificate, and a client
certificate from another CA). Peers are pynetdicom and DCMTK's echoscu,
storescu and storescp with ``+tls``.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from config.settings import ConfigError, DestinationSettings, TlsSettings, load_settings
from node.sender import DestinationLink
from node.tls import TLSConfigError, client_context, server_context
from tests.hardening.conftest import (
    Bystander,
    TlsFiles,
    echo_ok,
    running_node,
    scu_ae,
    server_tls,
)
from tests.interop import REPO, free_port, require_tool
from tests.storage.helpers import small_ct

pytestmark = pytest.mark.interop


def _client_args(
    files: TlsFiles, *, cert: Path | None = None, key: Path | None = None
) -> tuple[ssl.SSLContext, str]:
    ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx, "localhost"


def _write(ds_path: Path) -> Path:
    ds = small_ct(size=16)
    ds.save_as(ds_path, enforce_file_format=True)
    return ds_path


def test_pynetdicom_scu_stores_over_tls(tmp_path: Path, tls_files: TlsFiles) -> None:
    args = _client_args(tls_files, cert=tls_files.client_cert, key=tls_files.client_key)
    with running_node(tmp_path / "node", tls=server_tls(tls_files)) as node:
        with Bystander(node.port, count=3, tls_args=args) as bystander:
            pass
        bystander.check(node)
        assoc = scu_ae().associate("127.0.0.1", node.port, ae_title="ICHNODE", tls_args=args)
        assert assoc.is_established
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)  # type: ignore[union-attr]
        assert assoc.dul.socket.socket.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr,operator]
        ds = small_ct(size=16)
        assert int(assoc.send_c_store(ds).Status) == 0
        assoc.release()
        row = node.index.instance(ds.SOPInstanceUID)
        assert row is not None
        assert dcmread(row["path"]).SOPInstanceUID == ds.SOPInstanceUID


def test_dcmtk_echoscu_and_storescu_over_tls(tmp_path: Path, tls_files: TlsFiles) -> None:
    echoscu = require_tool("echoscu", "dcmtk")
    storescu = require_tool("storescu", "dcmtk")
    f = tls_files
    tls = ["+tls", str(f.client_key), str(f.client_cert), "+cf", str(f.ca_cert)]
    path = _write(tmp_path / "ct.dcm")
    with running_node(tmp_path / "node", tls=server_tls(f)) as node:
        target = ["-aet", "TESTSCU", "-aec", "ICHNODE", "127.0.0.1", str(node.port)]
        echo = subprocess.run(
            [echoscu, *tls, *target], capture_output=True, text=True, timeout=60, check=False
        )
        assert echo.returncode == 0, echo.stderr
        store = subprocess.run(
            [storescu, *tls, *target, str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert store.returncode == 0, store.stderr
        assert node.index.instance(str(dcmread(path).SOPInstanceUID)) is not None
        # Without TLS the same tools get nowhere, and nothing is stored.
        plain = subprocess.run(
            [echoscu, *target], capture_output=True, text=True, timeout=60, check=False
        )
        assert plain.returncode != 0
        # Anonymous TLS (no client certificate) fails the handshake when clients are verified.
        anonymous = subprocess.run(
            [echoscu, "+tla", "+cf", str(f.ca_cert), *target],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert anonymous.returncode != 0
        assert node.index.count_instances() == 1


@pytest.mark.parametrize("client", ["no certificate", "certificate from another CA", "plain TCP"])
def test_client_without_a_valid_certificate_is_refused(
    tmp_path: Path, tls_files: TlsFiles, client: str
) -> None:
    f = tls_files
    good = _client_args(f, cert=f.client_cert, key=f.client_key)
    with running_node(tmp_path, tls=server_tls(f, verify_clients=True)) as node:
        tls_args: tuple[ssl.SSLContext, str] | None = None
        if client == "no certificate":
            tls_args = _client_args(f)
        elif client == "certificate from another CA":
            tls_args = _client_args(f, cert=f.rogue_cert, key=f.rogue_key)
        with Bystander(node.port, count=3, tls_args=good) as bystander:
            ae = scu_ae("INTRUDER", timeout=5)
            assoc = ae.associate("127.0.0.1", node.port, ae_title="ICHNODE", tls_args=tls_args)
            if assoc.is_established:  # TLS 1.3: the client learns of the refusal on first use
                ds = small_ct(size=16)
                rsp = assoc.send_c_store(ds)
                assert "Status" not in rsp
                assoc.abort()
            else:
                assert not assoc.is_established
        bystander.check(node)
        assert node.index.count_instances() == len(bystander.series)
        assert "INTRUDER" not in {r["calling_ae"] for r in node.index.associations()}
        assert echo_ok(node.port, tls_args=good)
        # The refused handshake is in the association audit (no AE titles yet).
        refused = [
            r for r in node.index.associations()
            if r["outcome"] == "rejected" and r["detail"].startswith("TLS handshake failed")
        ]
        assert len(refused) == 1, node.index.associations()
        assert refused[0]["peer_address"] == "127.0.0.1" and refused[0]["calling_ae"] == ""


def test_tls_1_1_client_is_refused(tmp_path: Path, tls_files: TlsFiles) -> None:
    f = tls_files
    with running_node(tmp_path, tls=server_tls(f, verify_clients=False)) as node:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("ALL:@SECLEVEL=0")
        with (
            socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock,
            pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"),
        ):
            ctx.wrap_socket(sock, server_hostname="localhost")
        # Server certificate only (verify_clients = false): a TLS 1.2 client without one is served.
        assert echo_ok(node.port, tls_args=_client_args(f))


def test_silent_tcp_client_does_not_hold_the_tls_handshakes_of_others(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    f = tls_files
    good = _client_args(f, cert=f.client_cert, key=f.client_key)
    with running_node(tmp_path, tls=server_tls(f), network_timeout_seconds=1.5) as node:
        silent = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        start = time.monotonic()
        assert echo_ok(node.port, tls_args=good)
        assert time.monotonic() - start < 1.5
        assert silent.recv(1) == b""  # dropped after the network timeout
        assert time.monotonic() - start < 6
        silent.close()


def _destination(port: int, f: TlsFiles, **extra: object) -> DestinationSettings:
    return DestinationSettings(
        name="pacs",
        ae_title="PACS",
        host="127.0.0.1",
        port=port,
        tls=True,
        tls_ca_file=f.ca_cert,
        tls_cert_file=f.client_cert,
        tls_key_file=f.client_key,
        **extra,  # type: ignore[arg-type]
    )


def _send(link: DestinationLink, path: Path) -> int:
    assoc = link.open(CTImageStorage, ExplicitVRLittleEndian)
    assert assoc is not None, "no association over TLS"
    status = int(assoc.send_c_store(path).Status)
    link.release()
    return status


def test_sender_delivers_over_tls_to_a_pynetdicom_peer(tmp_path: Path, tls_files: TlsFiles) -> None:
    f = tls_files
    path = _write(tmp_path / "result.dcm")
    with running_node(tmp_path / "pacs", ae_title="PACS", tls=server_tls(f)) as pacs:
        link = DestinationLink(_destination(pacs.port, f), "ICHNODE", timeout=10)
        assert _send(link, path) == 0
        assert pacs.index.instance(str(dcmread(path).SOPInstanceUID)) is not None
        # Without the client certificate the peer refuses us; nothing arrives.
        bare = _destination(pacs.port, f).model_copy(
            update={"tls_cert_file": None, "tls_key_file": None}
        )
        other = _write(tmp_path / "other.dcm")
        link = DestinationLink(bare, "ICHNODE", timeout=5)
        assoc = link.open(CTImageStorage, ExplicitVRLittleEndian)
        if assoc is not None:
            assert "Status" not in assoc.send_c_store(other)
        assert pacs.index.instance(str(dcmread(other).SOPInstanceUID)) is None


def test_sender_delivers_over_tls_to_dcmtk_storescp(tmp_path: Path, tls_files: TlsFiles) -> None:
    storescp = require_tool("storescp", "dcmtk")
    f = tls_files
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        [storescp, "+tls", str(f.server_key), str(f.server_cert), "+cf", str(f.ca_cert),
         "-aet", "PACS", "-od", str(out), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        path = _write(tmp_path / "result.dcm")
        link = DestinationLink(_destination(port, f), "ICHNODE", timeout=20)
        assert _send(link, path) == 0
        received = list(out.iterdir())
        assert len(received) == 1
        assert dcmread(received[0]).SOPInstanceUID == dcmread(path).SOPInstanceUID
    finally:
        proc.terminate()
        proc.wait(10)


def test_tls_configuration_errors_name_the_key(tmp_path: Path, tls_files: TlsFiles) -> None:
    f = tls_files
    config = tmp_path / "tls.toml"
    config.write_text("[node.tls]\nenabled = true\n")
    with pytest.raises(ConfigError, match=r"node\.tls: .*cert_file is required"):
        load_settings(config)
    with pytest.raises(ValueError, match="key_file: .*does not exist"):
        TlsSettings(enabled=True, cert_file=f.server_cert, key_file=tmp_path / "missing.key")
    with pytest.raises(ValueError, match="ca_file is required"):
        TlsSettings(
            enabled=True, cert_file=f.server_cert, key_file=f.server_key, verify_clients=True
        )
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match=r"^node\.tls\.cert_file/node\.tls\.key_file"):
        server_context(TlsSettings(enabled=True, cert_file=garbage, key_file=f.server_key))
    with pytest.raises(TLSConfigError, match=r"^node\.tls\.ca_file"):
        server_context(
            TlsSettings(
                enabled=True, cert_file=f.server_cert, key_file=f.server_key, ca_file=garbage
            )
        )
    with pytest.raises(TLSConfigError, match=r"^destinations\[pacs\]\.tls_ca_file"):
        client_context(_destination(104, f).model_copy(update={"tls_ca_file": garbage}))
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file go together"):
        DestinationSettings(
            name="pacs", ae_title="PACS", host="h", port=104, tls=True, tls_cert_file=f.client_cert
        )
    ctx = server_context(server_tls(f))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_serve_with_an_unloadable_certificate_exits_with_one_line(
    tmp_path: Path, tls_files: TlsFiles
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    config = tmp_path / "ichnode.toml"
    config.write_text(
        f"[node]\nport = {free_port()}\n[node.tls]\nenabled = true\n"
        f'cert_file = "{garbage}"\nkey_file = "{tls_files.server_key}"\n'
        f'[storage]\nroot = "{tmp_path / "data"}"\nmin_free_disk_mb = 0\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ichnode:")]
    assert len(lines) == 1 and "node.tls.cert_file" in lines[0], proc.stderr
