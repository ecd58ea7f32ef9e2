"""The settings model of ichnode: one TOML file, overridable by ``ICHNODE_*`` variables.

Every key is validated at start-up; an error names the key that is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_TOML = Path(__file__).with_name("default.toml")

# DICOM PS3.5 6.2: AE titles are 1-16 characters of the default character
# repertoire without backslash or control characters; leading/trailing spaces
# are not significant.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class ConfigError(ValueError):
    """A configuration that ichnode refuses to start with; the message names the key."""


def validate_ae_title(value: str) -> str:
    """Return the AE title stripped of padding, or raise ``ValueError``."""
    stripped = value.strip()
    if not stripped or not _AE_TITLE.match(stripped):
        raise ValueError(
            f"{value!r} is not a valid AE title (1-16 characters, no backslash or control characters)"
        )
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TlsSettings(_Section):
    """DICOM TLS on the receiver (the Basic TLS Secure Transport Connection profile).

    ``cert_file``/``key_file``: the node's PEM certificate (chain) and key;
    ``ca_file``: the CAs whose client certificates are trusted; with
    ``verify_clients = true`` a peer without such a certificate fails the
    handshake. ``min_version``: the oldest TLS version accepted.
    """

    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    verify_clients: bool = False
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _files(self) -> TlsSettings:
        if not self.enabled:
            return self
        for key in ("cert_file", "key_file"):
            if getattr(self, key) is None:
                raise ValueError(f"{key} is required when TLS is enabled")
        if self.verify_clients and self.ca_file is None:
            raise ValueError("ca_file is required when verify_clients = true")
        for key in ("cert_file", "key_file", "ca_file"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{key}: {path} does not exist or is not a file")
        return self


class NodeSettings(_Section):
    ae_title: str = "ICHNODE"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=1, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    accept_any_caller: bool = False
    max_associations: int = Field(16, ge=1, le=1024)
    shutdown_grace_seconds: float = Field(5.0, ge=0)
    acse_timeout_seconds: float = Field(30.0, gt=0)
    dimse_timeout_seconds: float = Field(60.0, gt=0)
    network_timeout_seconds: float = Field(60.0, gt=0)
    #: Largest dataset one C-STORE may carry; beyond it the rest is discarded
    #: unread and the instance refused with 0xA700 (see config/default.toml).
    max_instance_mb: int = Field(1024, ge=1, le=4096)
    #: Receiver processes accepting on ``port`` together (SO_REUSEPORT, Linux).
    receivers: int = Field(1, ge=1, le=64)
    tls: TlsSettings = Field(default_factory=TlsSettings)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: validate_ae_title(v)))

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, value: list[str]) -> list[str]:
        return [validate_ae_title(v) for v in value]

    @property
    def host_is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class StorageSettings(_Section):
    root: Path = Path("ichnode-data")
    database_url: str = ""
    min_free_disk_mb: int = Field(2048, ge=0)
    sqlite_synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "NORMAL"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.root / 'index.sqlite'}"


class SchedulerSettings(_Section):
    series_quiet_seconds: float = Field(5.0, gt=0)


class InferenceSettings(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: auto: float16 autocast on CUDA, bfloat16 on CPUs with AMX; fp32: never.
    precision: Literal["auto", "fp32"] = "auto"
    weights: str = ""
    workers: int = Field(1, ge=1, le=64)


def _compile_patterns(value: list[str]) -> list[str]:
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({exc})") from None
    return value


class RoutingSettings(_Section):
    """Which received series are analysed; the rest are indexed and marked ``skipped``."""

    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    min_slices: int = Field(1, ge=1)
    exclude_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER"])
    body_part_include: list[str] = Field(default_factory=list)
    body_part_exclude: list[str] = Field(default_factory=list)
    study_description_include: list[str] = Field(default_factory=list)
    study_description_exclude: list[str] = Field(default_factory=list)
    series_description_include: list[str] = Field(default_factory=list)
    series_description_exclude: list[str] = Field(default_factory=list)

    @field_validator(
        "body_part_include",
        "body_part_exclude",
        "study_description_include",
        "study_description_exclude",
        "series_description_include",
        "series_description_exclude",
    )
    @classmethod
    def _regex(cls, value: list[str]) -> list[str]:
        return _compile_patterns(value)


class JobSettings(_Section):
    """Analysis jobs: retries, how a job of a dead worker is recognised, size limits.

    ``max_series_slices`` / ``max_series_voxels``: a larger series is skipped
    with the reason before its pixel data is read (a worker's memory grows with
    both). ``report_not_analysed``: a routed series that is skipped or fails
    after its retries still gets an SR saying "not analysed" and why.
    ``stop_grace_seconds``: on stop, a worker may finish its job this long, then
    it is killed (the job is taken up again at the next start).
    """

    max_attempts: int = Field(3, ge=1, le=100)
    retry_backoff_seconds: float = Field(10.0, gt=0)
    #: The wait after a failed attempt doubles from retry_backoff_seconds up to this.
    retry_backoff_max_seconds: float = Field(600.0, gt=0)
    heartbeat_seconds: float = Field(2.0, gt=0)
    stale_after_seconds: float = Field(30.0, gt=0)
    max_series_slices: int = Field(2000, ge=1)
    max_series_voxels: int = Field(700_000_000, ge=1)
    report_not_analysed: bool = True
    stop_grace_seconds: float = Field(20.0, gt=0)


class DeliverySettings(_Section):
    """The outbox: exponential backoff between tries, then ``dead`` after ``max_age_hours``.

    ``return_to_sender``: results go only to the destination(s) whose AE title
    sent the series; to every destination when the sender is none of them.
    """

    backoff_initial_seconds: float = Field(5.0, gt=0)
    backoff_max_seconds: float = Field(900.0, gt=0)
    max_age_hours: float = Field(24.0, gt=0)
    return_to_sender: bool = False
    timeout_seconds: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> DeliverySettings:
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError("backoff_max_seconds must not be below backoff_initial_seconds")
        return self


class MetricsSettings(_Section):
    """The Prometheus endpoint; ``port = 0`` or ``enabled = false`` turns it off."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9112, ge=0, le=65535)


_HOST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?(:[0-9]{1,5})?$")


class UiSettings(_Section):
    """The web interface (``ichnode ui``): which host names it answers, how big an upload may be."""

    #: Host names the interface answers besides ``localhost`` and ``127.0.0.1`` on its
    #: own port (the name a reverse proxy passes on); ``name`` or ``name:port``.
    allowed_hosts: list[str] = Field(default_factory=list)
    #: All files of one upload together, zips expanded, at most this many MB.
    upload_max_expanded_mb: int = Field(2048, ge=1)
    #: At most this many files in one upload, zip members counted one by one.
    upload_max_files: int = Field(10_000, ge=1)
    #: Staging and reading one upload may take this long; the model run is not counted.
    upload_max_read_seconds: float = Field(300.0, gt=0)

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for host in value:
            if not _HOST_NAME.match(host):
                raise ValueError(f"{host!r} is not a host name or host:port")
        return [h.lower() for h in value]


class DestinationSettings(_Section):
    """Where result objects go: a DICOM C-STORE SCP (``kind = "dimse"``) or a STOW-RS service.

    ``dimse`` needs ``ae_title``, ``host`` and ``port`` (``tls*`` for DICOM TLS).
    ``dicomweb`` needs ``url``, the STOW-RS base (``http://host:8042/dicom-web``);
    ``username``/``password`` give HTTP basic auth, ``token`` a bearer token;
    HTTPS certificates are verified (``tls_verify``) against the system CAs or
    ``tls_ca_file``.
    """

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str = ""
    host: str = ""
    port: int | None = Field(None, ge=1, le=65535)
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    url: str = ""
    username: str = ""
    password: SecretStr | None = None
    token: SecretStr | None = None
    tls_verify: bool = True

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return validate_ae_title(value) if value.strip() else ""

    @model_validator(mode="after")
    def _kind(self) -> DestinationSettings:
        if self.kind == "dimse":
            if not self.ae_title:
                raise ValueError("ae_title is required for a dimse destination")
            if not self.host or self.port is None:
                raise ValueError("host and port are required for a dimse destination")
            if self.url or self.username or self.password or self.token:
                raise ValueError("url, username, password and token are for kind = \"dicomweb\"")
        else:
            if not re.match(r"^https?://[^/\s]+", self.url):
                raise ValueError(f"url {self.url!r} is not an http:// or https:// URL")
            if self.ae_title or self.host or self.port is not None or self.tls:
                raise ValueError(
                    "ae_title, host, port and tls are for kind = \"dimse\"; "
                    "a dicomweb destination has a url"
                )
            if bool(self.username) != (self.password is not None):
                raise ValueError("username and password go together (HTTP basic auth)")
            if self.token is not None and self.username:
                raise ValueError("give either token (bearer) or username/password (basic)")
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> DestinationSettings:
        if not self.tls and self.kind == "dimse":
            return self
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{key}: {path} does not exist or is not a file")
        return self


NotifyOn = Literal["positive", "negative", "not_analysed"]


def _positive_only() -> list[NotifyOn]:
    return ["positive"]


class NotificationSettings(_Section):
    """A triage notification (``[[notifications]]``): a webhook or an HL7 ORU^R01 over MLLP.

    ``on``: which results are notified: ``positive`` (hemorrhage found),
    ``negative`` (analysed, none found), ``not_analysed`` (skipped or failed).
    ``include_phi``: patient name, ID, birth date and sex go in the message
    only when true. ``viewer_url``: a link template for the webhook's
    ``links.viewer`` (``{study_instance_uid}``, ``{series_instance_uid}`` and
    ``{accession_number}`` are filled in).
    """

    name: str = Field(min_length=1, max_length=64)
    kind: Literal["webhook", "hl7"]
    url: str = ""
    host: str = ""
    port: int | None = Field(None, ge=1, le=65535)
    on: list[NotifyOn] = Field(default_factory=_positive_only, min_length=1)
    include_phi: bool = False
    token: SecretStr | None = None
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    viewer_url: str = ""
    sending_application: str = "ICHNODE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""

    @model_validator(mode="after")
    def _kind(self) -> NotificationSettings:
        if self.kind == "webhook":
            if not re.match(r"^https?://[^/\s]+", self.url):
                raise ValueError(f"url {self.url!r} is not an http:// or https:// URL")
            if self.host or self.port is not None:
                raise ValueError("host and port are for kind = \"hl7\"; a webhook has a url")
        else:
            if not self.host or self.port is None:
                raise ValueError("host and port are required for an hl7 notification")
            if self.url or self.token is not None:
                raise ValueError("url and token are for kind = \"webhook\"")
        if self.tls_ca_file is not None and not Path(self.tls_ca_file).is_file():
            raise ValueError(f"tls_ca_file: {self.tls_ca_file} does not exist or is not a file")
        try:
            self.viewer_url.format(
                study_instance_uid="1", series_instance_uid="1", accession_number="1"
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"viewer_url: unknown placeholder {exc}; use {{study_instance_uid}}, "
                "{series_instance_uid} or {accession_number}"
            ) from None
        for key in (
            "sending_application",
            "sending_facility",
            "receiving_application",
            "receiving_facility",
        ):
            if re.search(r"[|^~\\&\r\n]", getattr(self, key)):
                raise ValueError(f"{key} may not contain HL7 delimiters (|^~\\&)")
        return self


class Settings(BaseSettings):
    """The whole configuration of one ichnode node."""

    model_config = SettingsConfigDict(
        env_prefix="ICHNODE_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    node: NodeSettings = Field(default_factory=NodeSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    destinations: list[DestinationSettings] = Field(default_factory=list)
    notifications: list[NotificationSettings] = Field(default_factory=list)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    ui: UiSettings = Field(default_factory=UiSettings)

    @model_validator(mode="after")
    def _open_host_needs_allow_list(self) -> Settings:
        node = self.node
        if (
            not node.host_is_loopback
            and not node.allowed_calling_aets
            and not node.accept_any_caller
        ):
            raise ValueError(
                f"node.host = {node.host!r} listens beyond loopback with an empty "
                "node.allowed_calling_aets; list the callers, or set node.accept_any_caller = true"
            )
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destinations: name {dupes[0]!r} is used twice")
        # Deliveries and notifications share the outbox, keyed by these names.
        taken = set(names)
        for n in self.notifications:
            if n.name in taken:
                raise ValueError(
                    f"notifications: name {n.name!r} is used twice or by a destination"
                )
            taken.add(n.name)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file (passed as init values by load_settings).
        return (env_settings, init_settings)


# ICHNODE_* variables that are switches of the test suite, not settings.
_NOT_SETTINGS = {"require_interop", "ui_config", "update_screenshots"}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _unknown_env_keys() -> list[str]:
    """``ICHNODE_*`` variables that name no setting (pydantic-settings would ignore them)."""
    sections: dict[str, type[BaseModel] | None] = {}
    for name, info in Settings.model_fields.items():
        ann = info.annotation
        sections[name] = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    bad = []
    for var in os.environ:
        if not var.upper().startswith("ICHNODE_"):
            continue
        rest = var[len("ICHNODE_") :].lower()
        if rest in _NOT_SETTINGS:
            continue
        section, _, key = rest.partition("__")
        if section not in sections:
            bad.append(var)
            continue
        model = sections[section]
        if model is not None and key and key.split("__")[0] not in model.model_fields:
            bad.append(var)
    return bad


def _format_error(exc: ValidationError, source: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return f"invalid configuration ({source}): " + "; ".join(parts)


def load_settings(path: Path | str | None = None) -> Settings:
    """Load the settings from ``path`` (or the embedded defaults) and the environment.

    Raises
    ------
    ConfigError
        With a one-line message naming the offending key.
    """
    source = str(path) if path else "embedded defaults"
    data = _read_toml(Path(path)) if path else _read_toml(DEFAULT_TOML)
    bad_env = _unknown_env_keys()
    if bad_env:
        raise ConfigError(f"invalid configuration (environment): unknown key {bad_env[0]}")
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
