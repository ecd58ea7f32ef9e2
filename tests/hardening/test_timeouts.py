"""Association limits and timeouts from the configuration, over real sockets.

``node.max_associations``: association N+1 is rejected, the others go on.
``node.acse_timeout_seconds`` / ``node.network_timeout_seconds``: a peer that
connects and says nothing, stops half-way through a PDU, or associates and
goes silent is dropped after the configured time while others are served.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from config.settings import ConfigError, load_settings
from tests.hardening.conftest import (
    Bystander,
    RawAssociation,
    associate_rq,
    echo_ok,
    running_node,
    scu_ae,
)
from tests.storage.helpers import small_ct

TIMEOUT = 1.5


def test_association_beyond_the_limit_is_rejected_and_the_others_keep_working(
    tmp_path: Path,
) -> None:
    with running_node(tmp_path, max_associations=2) as node:
        first = scu_ae("FIRST").associate("127.0.0.1", node.port, ae_title="ICHNODE")
        second = scu_ae("SECOND").associate("127.0.0.1", node.port, ae_title="ICHNODE")
        assert first.is_established and second.is_established
        third = scu_ae("THIRD").associate("127.0.0.1", node.port, ae_title="ICHNODE")
        assert third.is_rejected
        for assoc in (first, second):
            ds = small_ct(size=16)
            rsp = assoc.send_c_store(ds)
            assert int(rsp.Status) == 0
            assert node.index.instance(ds.SOPInstanceUID) is not None
        rows = node.index.associations()
        rejected = [r for r in rows if r["calling_ae"] == "THIRD"]
        assert rejected and "max_associations" in str(rejected[0])
        first.release()
        # A slot is free again.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not echo_ok(node.port):
            time.sleep(0.1)
        assert echo_ok(node.port)
        second.release()


def test_silent_connection_is_dropped_after_the_acse_timeout(tmp_path: Path) -> None:
    with running_node(tmp_path, acse_timeout_seconds=TIMEOUT, network_timeout_seconds=30) as node:
        raw = RawAssociation(node.port, timeout=20)
        start = time.monotonic()
        with Bystander(node.port, count=4):
            pass
        assert raw.closed_by_peer()
        elapsed = time.monotonic() - start
        assert TIMEOUT - 0.3 < elapsed < TIMEOUT + 5
        assert echo_ok(node.port)


def test_half_an_associate_rq_is_dropped_after_the_network_timeout(tmp_path: Path) -> None:
    with running_node(tmp_path, acse_timeout_seconds=30, network_timeout_seconds=TIMEOUT) as node:
        raw = RawAssociation(node.port, timeout=20)
        raw.send(associate_rq([(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])])[:50])
        start = time.monotonic()
        with Bystander(node.port, count=4) as bystander:
            pass
        bystander.check(node)
        assert raw.closed_by_peer()
        elapsed = time.monotonic() - start
        assert TIMEOUT - 0.3 < elapsed < TIMEOUT + 5
        assert echo_ok(node.port)


def test_silent_association_is_aborted_after_the_network_timeout(tmp_path: Path) -> None:
    with running_node(tmp_path, network_timeout_seconds=TIMEOUT) as node:
        assoc = scu_ae("SILENT", timeout=60).associate("127.0.0.1", node.port, ae_title="ICHNODE")
        assert assoc.is_established
        start = time.monotonic()
        with Bystander(node.port, count=4) as bystander:
            pass
        bystander.check(node)
        while assoc.is_alive() and time.monotonic() - start < TIMEOUT + 10:
            time.sleep(0.05)
        assert assoc.is_aborted
        assert TIMEOUT - 0.3 < time.monotonic() - start < TIMEOUT + 5
        outcomes = {r["calling_ae"]: r["outcome"] for r in node.index.associations()}
        assert outcomes["SILENT"] in ("aborted", "closed")
        assert echo_ok(node.port)


def test_timeouts_come_from_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICHNODE_NODE__NETWORK_TIMEOUT_SECONDS", "7.5")
    monkeypatch.setenv("ICHNODE_NODE__ACSE_TIMEOUT_SECONDS", "4")
    monkeypatch.setenv("ICHNODE_NODE__DIMSE_TIMEOUT_SECONDS", "9")
    settings = load_settings()
    node = settings.node
    assert (node.network_timeout_seconds, node.acse_timeout_seconds) == (7.5, 4.0)
    with running_node(
        tmp_path,
        network_timeout_seconds=node.network_timeout_seconds,
        acse_timeout_seconds=node.acse_timeout_seconds,
        dimse_timeout_seconds=node.dimse_timeout_seconds,
    ) as running:
        ae = running.scp.ae
        assert (ae.network_timeout, ae.acse_timeout, ae.dimse_timeout) == (7.5, 4.0, 9.0)
    monkeypatch.setenv("ICHNODE_NODE__NETWORK_TIMEOUT_SECONDS", "0")
    with pytest.raises(ConfigError, match="node.network_timeout_seconds"):
        load_settings()
