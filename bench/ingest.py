"""Ingest benchmark: DCMTK ``storescu`` sends one 300-instance 512x512 CT series to
ichnode (file fsync + index commit per instance) on SQLite and on PostgreSQL,
with one receiver process and with ``node.receivers = 2``, to DCMTK
``storescp`` and to Orthanc, alternating runs, over one association and over 8
in parallel.

Run: ``.venv/bin/python -m bench.ingest [--runs N] [--instances N]``. Writes the
``ingest`` section of ``docs/BENCHMARKS.md`` and ``bench/results/ingest.json``.
Each run starts the receiver fresh on an empty storage folder, so nothing is a
re-send; only the ``storescu`` processes are timed (from their start to the
last one's exit). ichnode runs as ``ichnode serve --role receiver``: the
scheduler and workers would start analysing the series while it is still
being measured. Its PostgreSQL is a cluster of the benchmark's own in a
temporary folder with fsync on (``tests.pg``), one new database per run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import (
    REPO,
    dcmtk_env,
    free_port,
    machine,
    tool_version,
    wait_for_port,
    write_benchmark_section,
    write_ct_series,
)

#: ichnode variants: (index backend, receiver processes).
ICHNODE_PEERS = {
    "ichnode": ("sqlite", 1),
    "ichnode-2r": ("sqlite", 2),
    "ichnode-pg": ("postgresql", 1),
    "ichnode-pg-2r": ("postgresql", 2),
}
PEERS = (*ICHNODE_PEERS, "storescp", "orthanc", "pynetdicom-noop")
ORTHANC = "/usr/sbin/Orthanc"


@contextmanager
def _serving(
    argv: list[str], port: int, log: Path | None, *, env: dict[str, str] | None = None
) -> Iterator[None]:
    """Run ``argv`` until the block ends, once it listens on ``port``; stderr to ``log``."""
    with open(log if log is not None else os.devnull, "wb") as err:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        try:
            wait_for_port(port, 60)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise


@contextmanager
def ichnode_peer(
    work: Path, synchronous: str, receivers: int = 1, database_url: str = ""
) -> Iterator[tuple[str, int]]:
    """Run ``ichnode serve --role receiver`` on a free port; yield (AE title, port)."""
    port = free_port()
    cfg = work / "ichnode.toml"
    cfg.write_text(
        f"[node]\nport = {port}\nmax_associations = 16\nreceivers = {receivers}\n"
        f'[storage]\nroot = "{work / "ichnode-data"}"\nmin_free_disk_mb = 64\n'
        f'sqlite_synchronous = "{synchronous}"\ndatabase_url = "{database_url}"\n'
        "[metrics]\nenabled = false\n"
    )
    argv = [sys.executable, "-m", "node.cli", "--log-level", "WARNING", "serve",
            "--config", str(cfg), "--role", "receiver"]
    with _serving(argv, port, work / "ichnode.log"):
        if receivers > 1:
            _wait_for_receivers(work / "ichnode.log", port, receivers)
        yield "ICHNODE", port


def _listening_sockets(port: int) -> int:
    """How many sockets listen on TCP ``port`` (IPv4), from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
            count += 1
    return count


def _wait_for_receivers(log: Path, port: int, receivers: int, timeout: float = 60.0) -> None:
    """Wait until every receiver process listens on ``port`` (SO_REUSEPORT: one socket each)."""
    deadline = time.monotonic() + timeout
    while _listening_sockets(port) < receivers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{receivers} receivers did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)


@contextmanager
def noop_peer(work: Path) -> Iterator[tuple[str, int]]:
    """pynetdicom with ichnode's AE settings and a handler that stores nothing: the floor."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.ingest", "--serve-noop", str(port)]
    with _serving(argv, port, work / "noop.log"):
        yield "ICHNODE", port


@contextmanager
def storescp_peer(work: Path) -> Iterator[tuple[str, int]]:
    """Run DCMTK ``storescp --fork`` writing files bit-preserved; yield (AE title, port)."""
    port = free_port()
    out = work / "storescp-data"
    out.mkdir()
    argv = ["storescp", "--fork", "-aet", "STORESCP", "-pdu", "131072", "+B", "-od", str(out),
            str(port)]
    with _serving(argv, port, None, env=dcmtk_env()):
        yield "STORESCP", port


@contextmanager
def orthanc_peer(work: Path) -> Iterator[tuple[str, int]]:
    """Run Orthanc from a temporary config (its defaults otherwise); yield (AE title, port)."""
    port, http_port = free_port(), free_port()
    storage = work / "orthanc-data"
    cfg = work / "orthanc.json"
    cfg.write_text(
        json.dumps(
            {
                "Name": "bench",
                "DicomAet": "ORTHANC",
                "DicomPort": port,
                "HttpPort": http_port,
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False,
                "DicomCheckCalledAet": False,
                "Plugins": [],
            }
        )
    )
    with _serving([ORTHANC, str(cfg)], port, work / "orthanc.log", env=dcmtk_env()):
        yield "ORTHANC", port


def send(files: list[Path], ae_title: str, port: int, associations: int) -> float:
    """Send ``files`` with ``associations`` parallel storescu processes; return seconds."""
    chunks = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCHSCU", "-aec", ae_title, "127.0.0.1", str(port)]
            + [str(p) for p in chunk],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
        if chunk
    ]
    errors = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"storescu failed against {ae_title}: {errors[0]}")
    return elapsed


def count_stored(peer: str, work: Path) -> int | None:
    """Count what the peer stored (checks the run really delivered everything)."""
    if peer == "pynetdicom-noop":
        return None
    if peer in ICHNODE_PEERS:
        return sum(1 for _ in (work / "ichnode-data" / "dicom").rglob("*.dcm"))
    if peer == "storescp":
        return sum(1 for p in (work / "storescp-data").iterdir() if p.is_file())
    return sum(
        1
        for p in (work / "orthanc-data").rglob("*")
        if p.is_file() and len(p.name) == 36 and p.suffix == ""
    )


def run_benchmark(runs: int, instances: int, parallel: int, synchronous: str) -> dict[str, object]:
    """Run every peer and mode ``runs`` times, alternating; return the results."""
    from tests.pg import start_postgres

    root = Path(tempfile.mkdtemp(prefix="ichnode-bench-ingest-"))
    postgres, postgres_root = start_postgres(durable=True)
    try:
        files = write_ct_series(root / "series", instances)
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        samples: dict[str, dict[str, list[float]]] = {
            p: {"single": [], f"parallel{parallel}": []} for p in PEERS
        }
        for run in range(runs):
            for mode, n_assoc in (("single", 1), (f"parallel{parallel}", parallel)):
                for peer in PEERS:
                    work = root / f"{peer}-{mode}-{run}"
                    work.mkdir()
                    if peer in ICHNODE_PEERS:
                        backend, receivers = ICHNODE_PEERS[peer]
                        url = (
                            postgres.url(postgres.create_database())
                            if backend == "postgresql"
                            else ""
                        )
                        ctx = ichnode_peer(work, synchronous, receivers, url)
                    elif peer == "storescp":
                        ctx = storescp_peer(work)
                    elif peer == "pynetdicom-noop":
                        ctx = noop_peer(work)
                    else:
                        ctx = orthanc_peer(work)
                    with ctx as (ae_title, port):
                        # Flush what earlier runs left dirty (storescp does not
                        # fsync), so no peer pays for another's writeback.
                        os.sync()
                        seconds = send(files, ae_title, port, n_assoc)
                        time.sleep(0.5)  # let the last write land before counting
                        stored = count_stored(peer, work)
                    rate = instances / seconds
                    samples[peer][mode].append(rate)
                    print(
                        f"run {run + 1}/{runs} {mode:>10} {peer:>8}: {rate:7.1f} instances/s "
                        f"({seconds:.2f} s, {stored} stored)",
                        file=sys.stderr,
                    )
                    if stored is not None and stored != instances:
                        raise RuntimeError(f"{peer} stored {stored} of {instances} instances")
                    shutil.rmtree(work, ignore_errors=True)
        medians = {
            peer: {mode: statistics.median(v) for mode, v in modes.items()}
            for peer, modes in samples.items()
        }
        ratios = {
            mode: {
                f"{peer}_vs_orthanc": medians[peer][mode] / medians["orthanc"][mode]
                for peer in ICHNODE_PEERS
            }
            | {"ichnode_vs_storescp": medians["ichnode"][mode] / medians["storescp"][mode]}
            for mode in medians["ichnode"]
        }
        return {
            "machine": machine(),
            "instances": instances,
            "series_mb": round(size_mb, 1),
            "runs": runs,
            "parallel_associations": parallel,
            "ichnode_sqlite_synchronous": synchronous,
            "postgresql": _postgres_version(postgres),
            "tools": {
                "storescu": tool_version("storescu"),
                "orthanc": subprocess.run(
                    [ORTHANC, "--version"], capture_output=True, text=True, check=False
                ).stdout.splitlines()[0],
            },
            "instances_per_s": samples,
            "median_instances_per_s": medians,
            "ratios": ratios,
        }
    finally:
        postgres.stop()
        shutil.rmtree(postgres_root, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def _postgres_version(server: object) -> str:
    bin_dir = getattr(server, "bin_dir", None)
    if bin_dir is None:
        return "?"
    out = subprocess.run([str(Path(bin_dir) / "postgres"), "--version"], capture_output=True,
                         text=True, check=False)
    return out.stdout.strip() or "?"


def report(result: dict[str, object]) -> str:
    """Return the Markdown section for docs/BENCHMARKS.md."""
    m = result["machine"]
    medians = result["median_instances_per_s"]
    ratios = result["ratios"]
    assert isinstance(m, dict) and isinstance(medians, dict) and isinstance(ratios, dict)
    par = f"parallel{result['parallel_associations']}"
    lines = [
        "## Ingest (C-STORE from DCMTK storescu)",
        "",
        (
            f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['date']}, Python {m['python']}; "
            "shared with other jobs, so absolute numbers move between runs; the peers "
            "alternate within each run so ratios compare like with like."
        ),
        (
            f"Series: {result['instances']} CT instances 512x512 int16 ({result['series_mb']} MB), "
            f"{result['runs']} runs per peer and mode, median shown. Peers: ichnode "
            f"(`ichnode serve --role receiver`: file fsync + index commit per instance; "
            f"SQLite synchronous={result['ichnode_sqlite_synchronous']}; "
            f"{result.get('postgresql', 'PostgreSQL')} on the same disk with fsync on; "
            "1 or 2 receiver processes on one port), "
            "DCMTK storescp --fork +B (no fsync), Orthanc defaults (SyncStorageArea on). "
            "The page cache is flushed (sync) before each timed run. "
            "`python -m bench.ingest` reproduces it."
        ),
        "",
        (
            "| mode | ichnode SQLite | SQLite, 2 receivers | PostgreSQL | PostgreSQL, 2 receivers "
            "| storescp | Orthanc | pynetdicom no-op | best ichnode / Orthanc |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode in medians["ichnode"]:
        best = max(ICHNODE_PEERS, key=lambda p: medians[p][mode])
        lines.append(
            f"| {mode} | "
            + " | ".join(f"{medians[p][mode]:.0f}/s" for p in ICHNODE_PEERS)
            + f" | {medians['storescp'][mode]:.0f}/s | {medians['orthanc'][mode]:.0f}/s | "
            f"{medians['pynetdicom-noop'][mode]:.0f}/s | "
            f"{ratios[mode][f'{best}_vs_orthanc']:.2f} ({best}) |"
        )
    lines += [
        "",
        (
            "What limits ichnode here: *pynetdicom no-op* is the same AE (same presentation "
            "contexts, unlimited PDU size) with a C-STORE handler that stores nothing, i.e. "
            "the ceiling pynetdicom itself sets: about 2.4 ms of GIL-held Python per instance "
            "(PDU decode, DIMSE assembly, the response's command set encoded by pydicom) in "
            "two threads per association. With 8 associations that ceiling is below Orthanc "
            "on 2 CPUs: one interpreter lock runs all of the node's Python while 8 storescu "
            "processes take the other core. ichnode's handler then adds, per instance, an "
            "fdatasync of the ~0.5 MB file (0.35-2 ms on this shared virtual disk) and an "
            "fsync of its folder, ~0.5 ms of header decoding, and the SQLite commit (0.4 ms "
            "alone; 5-6 ms under 8 associations, when the lock holder waits for a CPU). "
            "Profiled with py-spy and per-stage timers; fixed on the way: ORM upserts (5 ms "
            "of CPU per instance, now DB-API), pydicom's file-meta writer (1 ms, now "
            "hand-encoded), decoding the whole dataset (now stops before Pixel Data), "
            "mkstemp, and the WAL fsync per commit (synchronous=NORMAL, see "
            "storage/index.py). Tried without a measurable gain: event-driven DUL and "
            "association loops instead of pynetdicom's 1 ms polling (select() on the socket "
            "and a wake-up pipe), and a shorter GIL switch interval."
        ),
        "",
        (
            "Receivers and index: one association is one connection and is served by one "
            "process, so a single association gains nothing from `node.receivers = 2`; with "
            f"8 associations two receiver processes took {medians['ichnode-2r'][par]:.0f}/s "
            f"against {medians['ichnode'][par]:.0f}/s for one (the one-process pynetdicom "
            f"ceiling, storing nothing: {medians['pynetdicom-noop'][par]:.0f}/s), on a machine whose "
            "two CPUs also run the 8 storescu processes. On PostgreSQL each instance's commit is "
            "a round trip to the server and a WAL flush on its disk (synchronous_commit on): "
            f"{medians['ichnode-pg']['single']:.0f}/s against {medians['ichnode']['single']:.0f}/s "
            "on SQLite over one association; PostgreSQL is there to share the index between "
            "machines, not to make one receiver faster."
        ),
    ]
    return "\n".join(lines)


def serve_noop(port: int) -> int:
    """Serve C-STORE with ichnode's AE set-up and a handler that only answers 0x0000."""
    import signal

    from pynetdicom import evt

    from config.settings import NodeSettings, StorageSettings
    from node.scp import StorageSCP
    from storage.archive import Archive
    from storage.index import Index

    root = Path(tempfile.mkdtemp(prefix="ichnode-bench-noop-"))
    scp = StorageSCP(
        NodeSettings(port=port),
        StorageSettings(root=root),
        Archive(root),
        Index(f"sqlite:///{root / 'index.sqlite'}"),
    )
    server = scp.ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)]
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    if server is not None:
        server.shutdown()
    shutil.rmtree(root, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--synchronous", default="NORMAL", choices=["FULL", "NORMAL"])
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--serve-noop", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_noop:
        return serve_noop(args.serve_noop)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"bench.ingest: {tool} not found (apt-get install dcmtk)", file=sys.stderr)
            return 2
    if not Path(ORTHANC).exists():
        print(f"bench.ingest: {ORTHANC} not found (apt-get install orthanc)", file=sys.stderr)
        return 2
    result = run_benchmark(args.runs, args.instances, args.parallel, args.synchronous)
    text = report(result)
    print(text)
    if not args.no_write:
        out = REPO / "bench" / "results" / "ingest.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        write_benchmark_section("ingest", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
