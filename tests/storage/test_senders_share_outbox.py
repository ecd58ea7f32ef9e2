"""Several sender processes on one outbox (SQLite and a real PostgreSQL), one real PACS peer.

Each process runs ``node.sender.Sender`` with its own engine and association,
as senders on different machines would; they start their passes together
(a barrier) until the outbox is empty. The peer counts what it receives:
every result object must arrive exactly once and every row end ``sent`` after
one attempt.
"""

from __future__ import annotations

import multiprocessing
from collections import Counter
from pathlib import Path
from typing import Any

from config.settings import DeliverySettings, DestinationSettings
from node.sender import Sender
from storage.index import Index
from storage.models import Delivery, DeliveryState
from tests.interop import free_port
from tests.loop.test_sender import Peer, _outbox

SENDERS = 3
OBJECTS = 30


def _send_until_empty(url: str, port: int, start: Any, out: str) -> None:
    index = Index(url)
    dest = DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=port)
    sender = Sender(index, [dest], DeliverySettings(), "ICHNODE")
    sent: list[int] = []
    try:
        while True:
            start.wait(60)
            # A short pass each time, so the processes interleave many times.
            outcome = sender.send_once(limit=3)
            sent.extend(outcome.sent)
            assert not outcome.retried and not outcome.dead, outcome
            start.wait(60)  # everyone has finished this pass
            with index.session(readonly=True) as session:
                left = session.query(Delivery).filter(Delivery.state == DeliveryState.PENDING)
                if left.count() == 0:
                    break
    finally:
        for link in sender.links.values():
            link.release()  # type: ignore[union-attr]
        index.dispose()
    Path(out).write_text(" ".join(map(str, sent)))


def test_senders_sharing_one_outbox_send_each_object_once(db_url: str, tmp_path: Path) -> None:
    index = Index(db_url)
    index.upgrade()
    ids = _outbox(index, tmp_path, ["pacs"], count=OBJECTS)
    peer = Peer(free_port(), delay=0.01)
    peer.start()
    try:
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Barrier(SENDERS)
        outs = [tmp_path / f"sender-{i}.txt" for i in range(SENDERS)]
        procs = [
            ctx.Process(target=_send_until_empty, args=(db_url, peer.port, start, str(o)))
            for o in outs
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(180)
        assert [p.exitcode for p in procs] == [0] * SENDERS
    finally:
        peer.stop()
    twice = {uid: n for uid, n in Counter(peer.received).items() if n > 1}
    assert twice == {}, f"sent more than once: {twice}"
    assert len(peer.received) == OBJECTS
    per_sender = [[int(x) for x in o.read_text().split()] for o in outs]
    assert sorted(i for s in per_sender for i in s) == sorted(ids)
    assert sum(1 for s in per_sender if s) >= 2  # the work was shared
    with index.session(readonly=True) as session:
        rows = session.query(Delivery).all()
        assert {(r.state, r.attempts) for r in rows} == {(DeliveryState.SENT, 1)}
    index.dispose()
