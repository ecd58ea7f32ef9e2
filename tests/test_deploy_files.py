"""The scale-out deployment files (deploy/, docs/DEPLOY.md) checked against ichnode itself.

A unit, a compose service or a documented command line that ichnode would
refuse (an unknown option, a role that does not exist, a key the settings
model does not know) fails here instead of on a hospital's machine.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy.engine import make_url

import node.service
from config.settings import JobSettings, NodeSettings, Settings, StorageSettings, load_settings
from node.cli import build_parser
from tests.interop import REPO, missing

DEPLOY = REPO / "deploy"
UNIT_DIR = DEPLOY / "systemd"
COMPOSE = DEPLOY / "compose.yaml"
TOML = DEPLOY / "ichnode.toml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOC = REPO / "docs" / "DEPLOY.md"

BINARY = "/opt/ichnode/.venv/bin/ichnode"
CONFIG = "/etc/ichnode/ichnode.toml"
UNITS = {
    "ichnode-receiver.service": "receiver",
    "ichnode-scheduler.service": "scheduler",
    "ichnode-sender.service": "sender",
    "ichnode-worker@.service": "worker",
}
#: GPUs a worker template instance may name (its metrics port is 912N).
GPU_INSTANCES = [str(n) for n in range(10)]


# -- reading the files ----------------------------------------------------------------------


def unit_text(name: str, instance: str = "0") -> str:
    """The unit file ``name`` with a template's ``%i`` filled in."""
    return (UNIT_DIR / name).read_text().replace("%i", instance).replace("%I", instance)


def read_unit(name: str, instance: str = "0") -> configparser.ConfigParser:
    """The unit as an INI file; a key given twice in one section is an error here."""
    parser = configparser.ConfigParser(
        delimiters=("=",), comment_prefixes=("#", ";"), interpolation=None, strict=True
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit_text(name, instance), source=name)
    return parser


def deploy_toml() -> dict[str, Any]:
    with TOML.open("rb") as fh:
        return tomllib.load(fh)


def toml_value(section: str, key: str, model: type[BaseModel]) -> Any:
    """The value deploy/ichnode.toml gives ``section.key``, or the setting's default."""
    return deploy_toml().get(section, {}).get(key, model.model_fields[key].default)


def compose_services(text: str) -> dict[str, list[str] | None]:
    """Service name -> its ``command:``, read from compose.yaml without a YAML library.

    The file keeps each service at two spaces under ``services:`` and each
    command as a one-line flow list of double-quoted strings, which is JSON.
    """
    services: dict[str, list[str] | None] = {}
    in_services = False
    current: str | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            in_services = line.rstrip() == "services:"
            current = None
            continue
        if not in_services:
            continue
        if m := re.match(r"^  ([A-Za-z0-9_.-]+):\s*$", line):
            current = m.group(1)
            services[current] = None
        elif line.startswith("    command:"):
            m = re.match(r"^    command:\s*(\[.*\])\s*(#.*)?$", line)
            assert m and current, f"{current}: command must be a one-line list: {line!r}"
            services[current] = json.loads(m.group(1))
    return services


def dockerfile_entrypoint() -> list[str]:
    m = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert m, "deploy/Dockerfile has no exec-form ENTRYPOINT"
    entrypoint: list[str] = json.loads(m.group(1))
    return entrypoint


def doc_command_lines() -> list[str]:
    """``ichnode serve`` command lines of DEPLOY.md: code spans and lines of code blocks.

    A synopsis with a placeholder in capitals (``--role ROLE``) is not a command line.
    """
    text = DOC.read_text()
    candidates = re.findall(r"`([^`\n]+)`", text)
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        candidates.extend(block.splitlines())
    found = []
    for line in candidates:
        line = line.strip()
        if not re.match(r"^(\S*/)?ichnode serve\b", line) or re.search(r"\b[A-Z]{3,}\b", line):
            continue
        found.append(line)
    return list(dict.fromkeys(found))


def command_lines() -> list[tuple[str, list[str]]]:
    """Every ``ichnode serve`` command of the deployment: (where, argv without the program)."""
    found: list[tuple[str, list[str]]] = []
    for name in UNITS:
        instances = GPU_INSTANCES if "@" in name else [""]
        for instance in instances:
            exec_start = read_unit(name, instance)["Service"]["ExecStart"]
            argv = shlex.split(exec_start)
            assert argv[0] == BINARY, f"{name}: ExecStart runs {argv[0]}, not {BINARY}"
            found.append((f"{name.replace('@', '@' + instance)}", argv[1:]))
    entrypoint = dockerfile_entrypoint()
    for service, command in compose_services(COMPOSE.read_text()).items():
        if service == "postgres":
            continue
        assert command is not None, f"compose.yaml: service {service} has no command"
        found.append((f"compose:{service}", entrypoint[1:] + command))
    for i, line in enumerate(doc_command_lines()):
        found.append((f"DEPLOY.md:{i}", shlex.split(line)[1:]))
    return found


def roles_of(argv: list[str]) -> list[str]:
    roles: list[str] = []
    for i, token in enumerate(argv):
        if token == "--role" and i + 1 < len(argv):
            roles.extend(argv[i + 1].split(","))
        elif token.startswith("--role="):
            roles.extend(token.split("=", 1)[1].split(","))
    return [r.strip() for r in roles if r.strip()]


def option(argv: list[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def setting_exists(dotted: str) -> bool:
    """True when ``node.port`` (or ``node.tls.enabled``) names a field of the settings model."""
    model: Any = Settings
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
    return True


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ICHNODE_* setting of the test run's environment leaks into load_settings."""
    for var in list(os.environ):
        if var.upper().startswith("ICHNODE_") and var.upper() != "ICHNODE_REQUIRE_INTEROP":
            monkeypatch.delenv(var)


# -- systemd units --------------------------------------------------------------------------


def test_one_unit_per_role() -> None:
    assert {p.name for p in UNIT_DIR.glob("*.service")} == set(UNITS)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_has_the_required_settings(name: str) -> None:
    unit = read_unit(name)
    root = str(toml_value("storage", "root", StorageSettings))
    assert unit.sections() == ["Unit", "Service", "Install"], name
    assert "network-online.target" in unit["Unit"]["After"].split()
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    assert root in unit["Unit"]["RequiresMountsFor"].split()
    service = unit["Service"]
    assert service["User"] == "ichnode" and service["Group"] == "ichnode"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["PrivateTmp"] == "yes"
    assert root in service["ReadWritePaths"].split()
    assert "PGPASSFILE=/etc/ichnode/pgpass" in service["Environment"].split()
    argv = shlex.split(service["ExecStart"])
    assert argv[:4] == [BINARY, "serve", "--config", CONFIG], name
    assert roles_of(argv) == [UNITS[name]], name
    assert option(argv, "--metrics-port") is not None, f"{name}: each process needs its own port"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_worker_template_pins_one_gpu() -> None:
    env = read_unit("ichnode-worker@.service", "3")["Service"]["Environment"].split()
    assert "CUDA_VISIBLE_DEVICES=3" in env
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in env
    # The other roles need no device; the worker needs /dev/nvidia*.
    assert "PrivateDevices" not in read_unit("ichnode-worker@.service")["Service"]
    for name in UNITS:
        if "@" not in name:
            assert read_unit(name)["Service"]["PrivateDevices"] == "yes", name


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value.strip())
    assert m, f"TimeoutStopSec={value} is not in seconds or minutes"
    return float(m.group(1)) * (60.0 if m.group(2) == "min" else 1.0)


@pytest.mark.parametrize("name", sorted(UNITS))
def test_stop_timeout_outlasts_the_grace_periods(name: str) -> None:
    """systemd must not SIGKILL ichnode while it is still stopping as configured."""
    timeout = _seconds(read_unit(name)["Service"]["TimeoutStopSec"])
    job_grace = float(toml_value("jobs", "stop_grace_seconds", JobSettings))
    receiver_grace = float(toml_value("node", "shutdown_grace_seconds", NodeSettings))
    # A worker is killed after jobs.stop_grace_seconds; further receiver
    # processes are waited on for node.shutdown_grace_seconds + 10 s.
    assert timeout > job_grace + 10, name
    assert timeout > receiver_grace + 10 + 10, name


def test_metrics_ports_of_one_host_differ() -> None:
    ports: dict[int, str] = {}
    for where, argv in command_lines():
        if not where.startswith("ichnode-"):
            continue
        value = option(argv, "--metrics-port")
        assert value is not None and value.isdigit(), where
        port = int(value)
        assert port not in ports, f"{where} and {ports.get(port)} both use metrics port {port}"
        ports[port] = where
    assert int(toml_value("node", "port", NodeSettings)) not in ports


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        missing("systemd-analyze not found on PATH (apt-get install systemd)")
    assert tool is not None
    # verify checks that ExecStart's program exists: a stand-in at another path.
    stub = tmp_path / "bin" / "ichnode"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        assert BINARY in text, name
        (tmp_path / name).write_text(text.replace(BINARY, str(stub)))
    targets = [str(tmp_path / n.replace("@.", "@0.")) for n in UNITS]
    proc = subprocess.run(
        [tool, "verify", "--man=no", *targets],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    ours = [
        line
        for line in output.splitlines()
        if any(n.split("@")[0].removesuffix(".service") in line for n in UNITS)
    ]
    assert proc.returncode == 0 and not ours, output


# -- command lines ---------------------------------------------------------------------------


@pytest.mark.parametrize("where,argv", [pytest.param(w, a, id=w) for w, a in command_lines()])
def test_command_line_parses(
    where: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: ichnode {shlex.join(argv)}: {capsys.readouterr().err.strip()}")
    assert args.command == "serve", where
    assert set(roles_of(argv)) <= set(node.service.ROLES), where
    port = option(argv, "--metrics-port")
    if port is not None:
        assert 0 <= int(port) <= 65535, where
    if not where.startswith("DEPLOY.md"):
        assert option(argv, "--config") == CONFIG, where


def test_units_and_compose_cover_every_role() -> None:
    lines = command_lines()
    unit_roles = {
        r for where, argv in lines if where.startswith("ichnode-") for r in roles_of(argv)
    }
    compose_roles = {
        r for where, argv in lines if where.startswith("compose:") for r in roles_of(argv)
    }
    assert unit_roles == set(node.service.ROLES)
    assert compose_roles == set(node.service.ROLES)


# -- compose and Dockerfile ------------------------------------------------------------------


def test_compose_services_read_without_yaml() -> None:
    services = compose_services(COMPOSE.read_text())
    assert set(services) == {"postgres", "receiver", "scheduler", "worker", "sender"}
    assert dockerfile_entrypoint() == ["ichnode"]


def test_compose_yaml_parses() -> None:
    try:
        import yaml
    except ImportError:
        pytest.skip("PyYAML is not installed; the command lines were read without it")
    data = yaml.safe_load(COMPOSE.read_text())
    services = data["services"]
    assert {k: v.get("command") for k, v in services.items()} == compose_services(
        COMPOSE.read_text()
    )
    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    root = str(toml_value("storage", "root", StorageSettings))
    assert "archive" in data["volumes"]
    for name, service in services.items():
        if name == "postgres":
            continue
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert f"archive:{root}" in service["volumes"], name
        assert f"./ichnode.toml:{CONFIG}:ro" in service["volumes"], name
        # Rows name their holder host:pid; containers must keep distinct host names.
        assert "hostname" not in service, name
    assert services["scheduler"]["deploy"]["replicas"] >= 2
    assert services["sender"]["deploy"]["replicas"] >= 2


def test_dockerfile_pins_the_readme_torch() -> None:
    dockerfile = DOCKERFILE.read_text()
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", dockerfile, re.MULTILINE)
    pinned = set(re.findall(r"torch==([0-9][0-9.]*[0-9])", readme))
    assert len(pinned) == 1, f"README.md pins torch as {pinned}"
    assert set(re.findall(r"pip install torch==([0-9][0-9.]*[0-9]) \.", dockerfile)) == pinned


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
def test_deploy_toml_loads() -> None:
    settings = load_settings(TOML)
    assert settings.storage.root.is_absolute(), "the index keeps absolute paths under the root"
    url = make_url(settings.storage.database_url)
    assert url.get_backend_name() == "postgresql"
    assert url.password is None, "the password belongs in PGPASSFILE, not the URL"
    assert not settings.node.host_is_loopback and settings.node.allowed_calling_aets
    assert settings.node.receivers > 1
    assert settings.inference.device == "cuda"
    assert settings.metrics.host == "0.0.0.0"
    assert settings.destinations


def test_settings_named_in_the_docs_exist() -> None:
    doc = DOC.read_text()
    dotted = {
        token
        for token in re.findall(r"`([^`\n]+)`", doc)
        if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", token)
    }
    assert len(dotted) >= 10, dotted
    unknown = sorted(t for t in dotted if not setting_exists(t))
    assert not unknown, f"docs/DEPLOY.md names settings that do not exist: {unknown}"
    env = set()
    for text in (doc, COMPOSE.read_text()):
        env |= set(re.findall(r"\bICHNODE_([A-Z0-9]+(?:__[A-Z0-9_]+)+)\b", text))
    assert env
    unknown = sorted(v for v in env if not setting_exists(v.lower().replace("__", ".")))
    assert not unknown, f"ICHNODE_ variables that name no setting: {unknown}"
