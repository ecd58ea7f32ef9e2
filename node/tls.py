"""TLS contexts of ichnode (DICOM Basic TLS Secure Transport Connection profile).

This module owns turning the ``[node.tls]`` settings into the server
:class:`ssl.SSLContext` of the receiver, and a destination's ``tls*`` keys
into the client context of the sender. Both refuse anything older than
TLS 1.2. A certificate, key or CA file that cannot be loaded raises
:class:`TLSConfigError` with a one-line message naming the setting.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from config.settings import ConfigError, DestinationSettings, TlsSettings

logger = logging.getLogger(__name__)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSConfigError(ConfigError):
    """A TLS setting whose file cannot be used; the message names the key."""


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, keys: tuple[str, str]) -> None:
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except FileNotFoundError as exc:
        raise TLSConfigError(f"{keys[0]}/{keys[1]}: file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(
            f"{keys[0]}/{keys[1]}: cannot load certificate {cert} with key {key}: {exc}"
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: Path, key: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"{key}: cannot load CA certificates from {ca}: {exc}") from None


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """Return the receiver's server context for ``[node.tls]``.

    Parameters
    ----------
    tls : TlsSettings
        Must be enabled, with certificate and key.

    Raises
    ------
    TLSConfigError
        When a file does not load.
    """
    if tls.cert_file is None or tls.key_file is None:
        raise TLSConfigError("node.tls.cert_file and node.tls.key_file are required")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    _load_chain(ctx, tls.cert_file, tls.key_file, ("node.tls.cert_file", "node.tls.key_file"))
    if tls.ca_file is not None:
        _load_ca(ctx, tls.ca_file, "node.tls.ca_file")
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.verify_clients else ssl.CERT_NONE
    if tls.verify_clients and tls.ca_file is None:
        raise TLSConfigError("node.tls.ca_file is required when node.tls.verify_clients = true")
    return ctx


def client_context(destination: DestinationSettings) -> ssl.SSLContext:
    """Return the sender's client context for a destination with ``tls = true``.

    The peer's certificate is verified against ``tls_ca_file`` (the system
    CAs when it is not set) and its host name or address; ``tls_cert_file``
    and ``tls_key_file``, when set, are the node's client certificate.

    Raises
    ------
    TLSConfigError
        When a file does not load.
    """
    prefix = f"destinations[{destination.name}]"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if destination.tls_ca_file is not None:
        _load_ca(ctx, destination.tls_ca_file, f"{prefix}.tls_ca_file")
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if destination.tls_cert_file is not None and destination.tls_key_file is not None:
        _load_chain(
            ctx,
            destination.tls_cert_file,
            destination.tls_key_file,
            (f"{prefix}.tls_cert_file", f"{prefix}.tls_key_file"),
        )
    return ctx


def client_tls_args(destination: DestinationSettings) -> tuple[ssl.SSLContext, str] | None:
    """Return ``(context, server_hostname)`` for ``ae.associate(tls_args=...)``, or None."""
    if not destination.tls:
        return None
    return client_context(destination), destination.host
