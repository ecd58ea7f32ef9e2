from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, load_settings


def test_defaults_load(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.node.ae_title == "ICHNODE"
    assert s.node.port == 11112
    assert s.storage.effective_database_url.endswith("index.sqlite")


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nport = 2000\nae_title = "A"\n')
    monkeypatch.setenv("ICHNODE_NODE__PORT", "3000")
    s = load_settings(cfg)
    assert s.node.port == 3000
    assert s.node.ae_title == "A"


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "node.ae_title"),
        ('[node]\nae_title = "BAD\\\\AE"\n', "node.ae_title"),
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\ncolour = 1\n", "node.colour"),
        ("[nodes]\nport = 1\n", "nodes"),
        ('[node]\nallowed_calling_aets = ["OK", ""]\n', "node.allowed_calling_aets"),
        ('[inference]\ndevice = "tpu"\n', "inference.device"),
        ('[inference]\nprecision = "float16"\n', "inference.precision"),
        ('[[destinations]]\nname = "p"\nae_title = "X"\nhost = "h"\nport = 0\n', "destinations"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_open_host_needs_allow_list(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="allowed_calling_aets"):
        load_settings(cfg)
    cfg.write_text('[node]\nhost = "0.0.0.0"\naccept_any_caller = true\n')
    assert load_settings(cfg).node.accept_any_caller
    cfg.write_text('[node]\nhost = "0.0.0.0"\nallowed_calling_aets = ["CT1"]\n')
    assert load_settings(cfg).node.allowed_calling_aets == ["CT1"]


def test_unknown_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICHNODE_NODE__PROT", "1")
    with pytest.raises(ConfigError, match="ICHNODE_NODE__PROT"):
        load_settings()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
