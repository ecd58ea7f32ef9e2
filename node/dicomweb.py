"""DICOMweb destinations: result objects stored with STOW-RS (PS3.18 10.5).

A :class:`DicomWebLink` is the DICOMweb counterpart of the sender's DIMSE
association: one ``requests`` session (kept alive) per destination, used
through the ``dicomweb-client`` library. Every response is checked: an object
counts as delivered only when the STOW-RS response dataset lists its SOP
Instance UID in the Referenced SOP Sequence and not in the Failed SOP
Sequence. HTTP errors, refused connections, time-outs and failed instances are
reported back as a failed try with a one-line reason; the outbox
(:mod:`node.sender`) retries them with its backoff and dead-letters them.
The library's own HTTP retrying is switched off: the outbox decides when to
try again, durably.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from config.settings import DestinationSettings

logger = logging.getLogger(__name__)

# PS3.18 Table 10.5.3-1 / PS3.4 Annex GG failure reasons, for readable errors.
_FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "referenced transfer syntax not supported",
}

_HTTP_HINTS = {
    401: "check username/password or token",
    403: "check the credentials' permissions",
    404: "check url: it is the STOW-RS base, e.g. http://host:8042/dicom-web",
    405: "check url: it is the STOW-RS base, e.g. http://host:8042/dicom-web",
}


class PinnedVerifySession(requests.Session):
    """A ``requests`` session whose ``verify`` setting wins over the environment.

    ``requests`` lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` replace a
    session's CA bundle (requests issue 3829), so a configured
    ``tls_ca_file`` (or ``tls_verify = false``) would be ignored on hosts that
    set them. Without either, the environment's bundle applies as usual, and
    so do its proxies.
    """

    def merge_environment_settings(
        self,
        url: Any,
        proxies: Any,
        stream: Any,
        verify: Any,
        cert: Any,
    ) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(
            url, proxies, stream, verify, cert
        )
        if verify is None and self.verify is not True:  # a CA file, or False: keep it
            settings["verify"] = self.verify
        return settings


def _client_class() -> Any:
    # Imported on first use: ``ichnode --help`` does not pay for it.
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient


def _failure_reason(item: Dataset) -> str:
    code = item.get("FailureReason")
    if code is None:
        return "no failure reason given"
    text = _FAILURE_REASONS.get(int(code), "failure")
    return f"{text} (0x{int(code):04X})"


def check_stow_response(response: Dataset, sop_instance_uid: str) -> tuple[bool, str]:
    """Whether a STOW-RS response dataset confirms that ``sop_instance_uid`` is stored.

    Returns ``(True, "")`` when the instance is in the Referenced SOP Sequence
    (a Warning Reason there still means stored, like a C-STORE warning), and
    ``(False, reason)`` when it is in the Failed SOP Sequence or in neither.
    """
    for item in response.get("FailedSOPSequence", []):
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            return False, f"STOW-RS failed for the instance: {_failure_reason(item)}"
    for item in response.get("ReferencedSOPSequence", []):
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_instance_uid:
            warning = item.get("WarningReason")
            if warning is not None:
                logger.info("STOW-RS stored %s with warning 0x%04X", sop_instance_uid, int(warning))
            return True, ""
    return False, "STOW-RS response does not list the instance as stored"


def _response_dataset(response: requests.Response | None) -> Dataset | None:
    """The response dataset of an HTTP error (409 carries a Failed SOP Sequence), if any."""
    if response is None or not response.content:
        return None
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    # Orthanc's DICOMweb plugin sends its 409 body without a Content-Type.
    if content_type not in ("", "application/dicom+json", "application/json"):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


class DicomWebLink:
    """One DICOMweb destination: a kept-alive HTTP session and its STOW-RS client.

    Parameters
    ----------
    destination : DestinationSettings
        A destination with ``kind = "dicomweb"``.
    timeout : float
        Seconds for connecting and for each read of the response.
    """

    def __init__(self, destination: DestinationSettings, timeout: float) -> None:
        if destination.kind != "dicomweb":
            raise ValueError(f"destination {destination.name} is not a dicomweb destination")
        self.destination = destination
        self.timeout = timeout
        self.url = destination.url.rstrip("/")
        # ``retrying`` (under dicomweb-client) logs a traceback per failed request;
        # the sender logs one line per failed try with the reason instead.
        logging.getLogger("retrying").setLevel(logging.ERROR)
        self._client: Any = None
        self._http: requests.Session | None = None
        #: False after a try that failed for the whole destination (refused, HTTP error).
        self.reachable = True

    def _session(self) -> requests.Session:
        dest = self.destination
        session = PinnedVerifySession()
        if dest.tls_verify:
            session.verify = str(dest.tls_ca_file) if dest.tls_ca_file is not None else True
        else:
            session.verify = False
        if dest.token is not None:
            session.headers["Authorization"] = f"Bearer {dest.token.get_secret_value()}"
        elif dest.username and dest.password is not None:
            session.auth = (dest.username, dest.password.get_secret_value())
        if dest.tls_cert_file is not None and dest.tls_key_file is not None:
            session.cert = (str(dest.tls_cert_file), str(dest.tls_key_file))
        return session

    def client(self) -> Any:
        """The ``DICOMwebClient`` (made on first use, then kept)."""
        if self._client is None:
            self._http = self._session()
            client = _client_class()(url=self.url, session=self._http, timeout=self.timeout)
            # The outbox retries durably with its own backoff; no hidden retrying here.
            client.set_http_retry_params(retry=False)
            self._client = client
        return self._client

    def store(self, path: Path) -> tuple[bool, str]:
        """POST one result file with STOW-RS; return ``(stored, error text)``."""
        try:
            ds = dcmread(path)
        except (OSError, InvalidDicomError, ValueError) as exc:
            return False, f"cannot read result file {path}: {exc}"
        sop_instance_uid = str(ds.SOPInstanceUID)
        where = f"STOW-RS to {self.url}"
        try:
            response = self.client().store_instances(
                [ds], study_instance_uid=str(ds.StudyInstanceUID)
            )
        except requests.HTTPError as exc:
            http = exc.response
            status = http.status_code if http is not None else 0
            body = _response_dataset(http)
            if body is not None and "FailedSOPSequence" in body:
                self.reachable = True
                ok, reason = check_stow_response(body, sop_instance_uid)
                return ok, f"{where}: HTTP {status}: {reason}"
            self.reachable = False
            reason = http.reason if http is not None else ""
            hint = _HTTP_HINTS.get(status, "")
            return False, f"{where}: HTTP {status} {reason}".rstrip() + (
                f" ({hint})" if hint else ""
            )
        except requests.exceptions.SSLError as exc:
            self.drop()
            return False, f"{where}: TLS error: {exc}"
        except requests.Timeout:
            self.drop()
            return False, f"{where}: no response within {self.timeout:g} s"
        except requests.ConnectionError as exc:
            self.drop()
            return False, f"{where}: cannot connect ({type(exc).__name__})"
        except (requests.RequestException, ValueError, OSError) as exc:
            self.drop()
            return False, f"{where}: {type(exc).__name__}: {exc}"
        self.reachable = True
        if not isinstance(response, Dataset) or len(response) == 0:
            return False, f"{where}: empty response (the server confirmed nothing)"
        ok, reason = check_stow_response(response, sop_instance_uid)
        return ok, "" if ok else f"{where}: {reason}"

    def drop(self) -> None:
        """Forget the session after a transport error (the next try opens a new one)."""
        self.reachable = False
        self.release()

    def release(self) -> None:
        """Close the kept-alive connections."""
        if self._http is not None:
            self._http.close()
        self._http = None
        self._client = None
