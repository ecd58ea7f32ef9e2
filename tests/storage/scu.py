"""A pynetdicom C-STORE SCU run as its own process by the receiver tests.

``python -m tests.storage.scu PORT CALLING COUNT [--size N] [--go FILE]`` opens
one association, waits for the file named by ``--go`` to exist (so several
processes start sending at once), sends COUNT new CT slices (N x N, default 16)
of one series and prints one JSON line: ``{"series_instance_uid": ...,
"sop_instance_uids": [...], "statuses": [...]}``. Each SCU runs in its own
process so eight of them do not share one interpreter lock with the node.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from tests.storage.helpers import ct_series


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("calling")
    parser.add_argument("count", type=int)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--go", type=Path)
    args = parser.parse_args()
    series = ct_series(args.count, size=args.size)
    ae = AE(args.calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", args.port, ae_title="ICHNODE")
    if not assoc.is_established:
        print(json.dumps({"error": "association not established"}))
        return 1
    if args.go is not None:
        deadline = time.monotonic() + 120
        while not args.go.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    statuses = []
    for ds in series:
        rsp = assoc.send_c_store(ds)
        statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    assoc.release()
    print(
        json.dumps(
            {
                "series_instance_uid": str(series[0].SeriesInstanceUID),
                "sop_instance_uids": [str(ds.SOPInstanceUID) for ds in series],
                "statuses": statuses,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
