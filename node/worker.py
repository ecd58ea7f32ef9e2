"""Analysis workers: processes that take jobs from the index and produce results.

Each worker is a separate process (``multiprocessing`` *spawn*) that loads the
model once and keeps it warm. It claims a job atomically
(:func:`node.scheduler.claim_job`), keeps a heartbeat on the row while it
works, runs the series' archive files through the one analysis path that
``ichnode analyze`` and the UI upload take too (:func:`node.analysis.analyse_series`:
read, volume, predictor, SEG/SR/SC objects), writes them with the one result
writer (:func:`node.results.write_result_files`) under
``<root>/results/<job id>/<NNN>-<SEG|SR|SC>-<SOPInstanceUID>.dcm`` and
then, in one transaction, records the ``results`` rows, the series finding,
the ``deliveries`` rows of the outbox and the job's timings. The files are
keyed by the job, so a job taken up again after a crash overwrites its own
partial output and commits exactly one set of rows.

A failing job (the images cannot be read, the model or the SR encoder
raises, the disk fails) is retried with backoff (``[jobs]``) and then marked
``failed`` with the reason; a series the volume loader refuses, or one with
more slices or voxels than ``jobs.max_series_slices`` / ``max_series_voxels``
(checked before its pixel data is read), is ``skipped``. Either way the
series gets a "not analysed" SR with the reason (``jobs.report_not_analysed``),
delivered like any result, so silence never means "no bleed". A result object
that cannot be built (a SEG highdicom refuses) is named with its reason in the
SR while the others still go out.

Workers share only lock-free booleans with the main process (stop, ready): a
worker that dies at any moment, or gets the SIGTERM that systemd sends the
whole group, can never block the main process's stop.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from config.settings import Settings
from node.restarts import RestartPolicy
from storage.index import Index
from storage.jobs import Finished, JobQueue, NewResult, SeriesFinding
from storage.models import Instance, ResultKind, SeriesStatus
from storage.notify import JOBS, Wakeups
from storage.queue import ClaimedJob
from storage.runtime import process_id

if TYPE_CHECKING:
    from inference.predictor import Predictor
    from inference.volume import SeriesLimits
    from node.service import NodeService

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
#: With LISTEN/NOTIFY (PostgreSQL) an idle worker or sender looks at the index
#: this often even without a notification (one lost while reconnecting).
NOTIFIED_POLL_SECONDS = 1.0


@dataclass
class JobOutcome:
    """What processing one job produced (for logs and tests)."""

    job_id: int
    state: str
    results: list[str]
    reason: str | None = None


def _kind(ds: Dataset) -> ResultKind:
    modality = str(ds.get("Modality", "")).upper()
    if modality == "SEG":
        return ResultKind.SEG
    if modality == "SR":
        return ResultKind.SR
    return ResultKind.SC


def destinations_for(settings: Settings, calling_aets: set[str]) -> list[str]:
    """Names of the destinations that get the results of a series.

    Every configured destination, or with ``delivery.return_to_sender`` only
    those whose AE title sent the series (all of them when none did).
    """
    names = [d.name for d in settings.destinations]
    if settings.delivery.return_to_sender:
        back = [d.name for d in settings.destinations if d.ae_title in calling_aets]
        if back:
            return back
    return names


class _Heartbeat:
    """Refresh the job's heartbeat (:meth:`storage.jobs.JobQueue.heartbeat`) while it runs."""

    def __init__(self, queue: JobQueue, job_id: int, claimed_by: str, every: float) -> None:
        self.queue = queue
        self.job_id = job_id
        self.claimed_by = claimed_by
        self.every = every
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if not self.queue.heartbeat(self.job_id, self.claimed_by):
                self.lost = True
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class JobRunner:
    """Processes claimed jobs with one warm predictor (used inside a worker process).

    Parameters
    ----------
    settings : Settings
        The node's configuration.
    index : Index
        The index (this process's own engine).
    predictor : Predictor
        The loaded model.
    """

    def __init__(self, settings: Settings, index: Index, predictor: Predictor) -> None:
        self.settings = settings
        self.index = index
        self.predictor = predictor
        self.claimed_by = process_id()
        self.results_root = Path(settings.storage.root) / "results"
        self.queue = JobQueue(index, settings.jobs)

    def claim(self) -> ClaimedJob | None:
        """Claim the next due job, if any."""
        return self.queue.claim(self.claimed_by)

    def run_one(self) -> JobOutcome | None:
        """Claim and process one job; None when the queue is empty."""
        job = self.claim()
        if job is None:
            return None
        return self.process(job)

    def process(self, job: ClaimedJob) -> JobOutcome:
        """Process a claimed job to its end state (done, skipped, retry or failed)."""
        from inference.volume import SeriesSkipped

        logger.info("job %s: series %s, attempt %d", job.id, job.series_id, job.attempts)
        with _Heartbeat(self.queue, job.id, self.claimed_by, self.settings.jobs.heartbeat_seconds):
            try:
                if job.attempts > self.settings.jobs.max_attempts:
                    # Its workers died during every attempt (requeue_orphans): no
                    # further try, only the answer that it could not be analysed.
                    return self._give_up(job)
                return self._analyse(job)
            except SeriesSkipped as exc:
                return self._finish_skipped(job, exc.reason)
            except Exception as exc:
                # Any failure of the model, the encoders or the disk is recorded on the
                # job (traceback in the log) and retried with backoff, then ``failed``.
                logger.exception("job %s failed", job.id)
                return self._finish_failed(job, f"{type(exc).__name__}: {exc}")

    def _series_files(self, series_id: int) -> tuple[list[str], set[str]]:
        with self.index.session(readonly=True) as session:
            rows = session.execute(
                select(Instance.path, Instance.calling_ae)
                .where(Instance.series_id == series_id)
                .order_by(Instance.instance_number, Instance.sop_instance_uid)
            ).all()
        return [str(r[0]) for r in rows], {str(r[1]) for r in rows if r[1]}

    def limits(self) -> SeriesLimits:
        """The ``[jobs]`` size limits of an analysed series."""
        from inference.volume import SeriesLimits

        jobs = self.settings.jobs
        return SeriesLimits(max_slices=jobs.max_series_slices, max_voxels=jobs.max_series_voxels)

    def _analyse(self, job: ClaimedJob) -> JobOutcome:
        from node.analysis import analyse_series
        from node.results import write_result_files

        paths, calling_aets = self._series_files(job.series_id)
        if not paths:
            return self._finish_skipped(job, "no instances in the archive")
        # The one analysis path (node.analysis): the size limits are checked on the
        # first header before any pixel data is read, and pixel data stays in the
        # files until it is decoded slice by slice into the HU volume.
        analysis = analyse_series([Path(p) for p in paths], self.predictor, limits=self.limits())
        if analysis.skipped is not None:
            return self._finish_skipped(job, analysis.skipped)
        if analysis.failed is not None or analysis.findings is None or analysis.results is None:
            reason = analysis.failed or "analysis produced no findings"
            logger.error("job %s failed: %s", job.id, reason, exc_info=analysis.error)
            return self._finish_failed(job, reason)
        findings, built = analysis.findings, analysis.results
        inference_seconds = analysis.inference_seconds
        started = time.perf_counter()
        objects = built.objects
        files = write_result_files(self.results_root / str(job.id), objects, replace=True)
        encoding_seconds = analysis.encoding_seconds + time.perf_counter() - started
        destinations = destinations_for(self.settings, calling_aets)
        ended = self.queue.complete(
            job,
            self.claimed_by,
            results=_new_results(objects, files),
            destinations=destinations,
            finding=SeriesFinding(
                bool(findings.hemorrhage_present), float(findings.hemorrhage_probability)
            ),
            reason="; ".join(m.sentence() for m in built.missing) if built.missing else None,
            error="; ".join(m.sentence() for m in built.missing) if built.missing else None,
            inference_seconds=inference_seconds,
            encoding_seconds=encoding_seconds,
        )
        if ended.state != "done":
            return self._not_done(job, ended)
        logger.info(
            "job %s done: hemorrhage=%s, %d objects, %d missing, %d deliveries "
            "(inference %.2f s, encoding %.2f s)",
            job.id,
            findings.hemorrhage_present,
            len(files),
            len(built.missing),
            len(files) * len(destinations),
            inference_seconds,
            encoding_seconds,
        )
        return JobOutcome(job.id, "done", [str(p) for p in files])

    def _not_done(self, job: ClaimedJob, ended: Finished) -> JobOutcome:
        """The outcome of a job that ended other than planned (superseded or lost)."""
        if ended.state == "superseded":
            # A newer job of the series exists: this one's files are not wanted.
            shutil.rmtree(self.results_root / str(job.id), ignore_errors=True)
            return JobOutcome(job.id, "superseded", [], ended.detail)
        logger.warning("job %s abandoned: %s", job.id, ended.detail)
        return JobOutcome(job.id, "abandoned", [], ended.detail)

    def _not_analysed_report(
        self, job: ClaimedJob, reason: str
    ) -> tuple[list[Dataset], list[Path], list[str]]:
        """Write the "not analysed" SR of the job's series; empty when none can or should be.

        Its evidence is the first readable instance of the series (pixel data
        not read): enough to place it in the right patient, study and series.
        """
        from node.results import (
            ResultsError,
            build_not_analysed_report,
            is_ichnode_output,
            write_result_files,
        )

        if not self.settings.jobs.report_not_analysed:
            return [], [], []
        paths, calling_aets = self._series_files(job.series_id)
        header = None
        for path in paths:
            try:
                header = dcmread(path, stop_before_pixels=True)
                break
            except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
                logger.warning("job %s: cannot read %s: %s", job.id, path, exc)
        if header is None:
            logger.warning("job %s: no readable instance, no not-analysed report", job.id)
            return [], [], []
        if is_ichnode_output(header):
            return [], [], []  # never answer our own output (it would go round in circles)
        try:
            report = build_not_analysed_report([header], reason, self.predictor)
            files = write_result_files(self.results_root / str(job.id), [report], replace=True)
        except (ResultsError, ValueError, TypeError, AttributeError, OSError) as exc:
            logger.error("job %s: the not-analysed report cannot be written: %s", job.id, exc)
            return [], [], []
        return [report], files, destinations_for(self.settings, calling_aets)

    def _finish_skipped(self, job: ClaimedJob, reason: str) -> JobOutcome:
        objects, files, destinations = self._not_analysed_report(job, reason)
        ended = self.queue.complete(
            job,
            self.claimed_by,
            results=_new_results(objects, files),
            destinations=destinations,
            series_status=SeriesStatus.SKIPPED,
            reason=reason,
            error=f"skipped: {reason}",
        )
        if ended.state != "done":
            return self._not_done(job, ended)
        logger.info(
            "job %s: series skipped: %s (not-analysed report: %s)",
            job.id,
            reason,
            "yes" if objects else "no",
        )
        return JobOutcome(job.id, "skipped", [str(p) for p in files], reason)

    def _give_up(self, job: ClaimedJob) -> JobOutcome:
        error = self.queue.last_error(job.id) or "worker stopped"
        return self._finish_failed(job, error, attempts=job.attempts - 1)

    def _finish_failed(
        self, job: ClaimedJob, reason: str, *, attempts: int | None = None
    ) -> JobOutcome:
        tried = job.attempts if attempts is None else attempts
        final = job.attempts >= self.settings.jobs.max_attempts
        series_reason = f"analysis failed after {tried} attempts: {reason}"
        objects: list[Dataset] = []
        files: list[Path] = []
        destinations: list[str] = []
        if final:
            objects, files, destinations = self._not_analysed_report(job, series_reason)
        ended = self.queue.fail(
            job,
            self.claimed_by,
            reason,
            series_reason=series_reason,
            results=_new_results(objects, files),
            destinations=destinations,
        )
        if ended.state == "failed":
            return JobOutcome(job.id, "failed", [str(p) for p in files], reason)
        if ended.state == "retry":
            return JobOutcome(job.id, "retry", [], reason)
        if ended.state == "abandoned":
            return JobOutcome(job.id, "abandoned", [], reason)
        return self._not_done(job, ended)


def _new_results(objects: Sequence[Dataset], files: Sequence[Path]) -> list[NewResult]:
    """The result rows of written objects."""
    return [
        NewResult(
            kind=_kind(ds),
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            path=str(path),
        )
        for ds, path in zip(objects, files, strict=True)
    ]


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphaned workers)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        logger.debug("prctl(PR_SET_PDEATHSIG) not available; relying on the parent check")


def release_free_heap() -> bool:
    """Hand the heap memory that a job freed back to the system (glibc ``malloc_trim``).

    A job allocates and frees hundreds of MB (volumes, network activations,
    encoded objects). glibc keeps much of it in its arenas, so without this the
    worker's resident size wanders by tens of MB from job to job (more with
    bfloat16 autocast on CPU) and looks like a leak. Returns False where there
    is no ``malloc_trim`` (another C library); nothing else changes then.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def _share_cpus(workers: int, device: str) -> int | None:
    """Give this worker its share of the CPUs for PyTorch's threads; return the count.

    Each worker process would otherwise start as many intra-op threads as the
    machine has CPUs: with several workers the threads outnumber the CPUs and
    every series gets slower (``python -m bench.scale``). A CUDA worker keeps
    PyTorch's default (its CPU threads mostly wait on the GPU).
    """
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return None
    cpus = len(os.sched_getaffinity(0))
    threads = max(1, cpus // max(1, workers))
    torch.set_num_threads(threads)
    return threads


def _warm_up(predictor: Predictor) -> None:
    """Run one small synthetic series through the whole job path before reporting ready.

    Loading, the network at the usual 512x512 matrix, Grad-CAM and the SEG/SR/SC
    encoders all have first-call costs (lazy imports, allocator warm-up) that
    would otherwise land on the first real study.
    """
    import tempfile

    from inference.phantom import generate_case, write_series
    from node.analysis import analyse_series

    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="ichnode-warmup-") as tmp:
            case = generate_case(0, n_slices=3, matrix=512, subtypes=("intraparenchymal",))
            files = write_series(case, Path(tmp))
            analysis = analyse_series(files, predictor)
    except (RuntimeError, ValueError, OSError) as exc:
        logger.warning("warm-up failed (%s); the first job will be slower", exc)
        return
    finally:
        release_free_heap()
    if analysis.skipped or analysis.failed:
        logger.warning(
            "warm-up failed (%s); the first job will be slower", analysis.skipped or analysis.failed
        )
        return
    logger.info("warm-up took %.1f s", time.perf_counter() - started)


class _Flag(Protocol):
    """A shared ``ctypes`` boolean (``multiprocessing`` RawValue): no lock, so no deadlock."""

    value: bool


def _sleep_unless(flags: Sequence[Any], seconds: float) -> None:
    """Sleep ``seconds`` in short steps; return early once any of ``flags`` is true."""
    deadline = time.monotonic() + seconds
    while not any(f.value for f in flags):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def worker_main(
    settings_data: dict[str, Any],
    stop: _Flag,
    ready: _Flag,
    log_level: int,
    poll_seconds: float,
) -> None:
    """Entry point of a worker process: load the model, then process jobs until ``stop``.

    ``stop`` and ``ready`` are lock-free shared booleans: a worker that dies at
    any moment (SIGKILL, OOM, the SIGTERM systemd sends the whole process
    group) can never leave a lock or condition behind that the main process
    would then wait on forever. SIGTERM here only asks the worker to stop after
    its current job; the main process decides when to kill it.
    """
    _die_with_parent()
    parent = os.getppid()
    terminated = _LocalFlag()

    def _on_sigterm(signum: int, frame: object) -> None:
        terminated.value = True

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
    )
    if log_level > logging.DEBUG:
        # highdicom logs every attribute it copies at INFO.
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    from inference.predictor import Predictor, WeightsError

    settings = Settings(**settings_data)
    _share_cpus(settings.inference.workers, settings.inference.device)
    try:
        predictor = Predictor(
            weights=settings.inference.weights or None,
            device=settings.inference.device,
            precision=settings.inference.precision,
        )
    except (WeightsError, ValueError, OSError) as exc:
        logger.error("worker cannot load the model: %s", exc)
        raise SystemExit(3) from None
    index = Index(
        settings.storage.effective_database_url,
        sqlite_synchronous=settings.storage.sqlite_synchronous,
    )
    runner = JobRunner(settings, index, predictor)
    # Series descriptions, UIDs and reasons logged here come from the wire too.
    from node.wire import escape_wire_logs

    escape_wire_logs()
    _warm_up(predictor)
    # On PostgreSQL a queued job wakes the worker at once (LISTEN/NOTIFY,
    # storage.notify), whichever machine queued it, so it polls only as a
    # fallback, rarely; on SQLite it polls at poll_seconds.
    wakeups = Wakeups(settings.storage.effective_database_url, [JOBS])
    wait = max(poll_seconds, NOTIFIED_POLL_SECONDS) if wakeups.listens else poll_seconds
    ready.value = True
    logger.info("worker %s ready", runner.claimed_by)
    flags = (stop, terminated)
    while not any(f.value for f in flags) and os.getppid() == parent:
        if runner.run_one() is None:
            if wakeups.listens:
                wakeups.wait(wait)
            else:
                _sleep_unless(flags, wait)
        else:
            release_free_heap()
    logger.info("worker %s stopping", runner.claimed_by)
    wakeups.close()
    index.dispose()


class _LocalFlag:
    """A boolean with the shape of :class:`_Flag`, for this process only."""

    def __init__(self) -> None:
        self.value = False


class WorkerPool:
    """The worker processes of the node; restarts any that dies.

    Parameters
    ----------
    settings : Settings
        Passed to each worker (as plain data).
    count : int
        How many processes (``inference.workers``).
    """

    def __init__(self, settings: Settings, count: int, poll_seconds: float = 0.1) -> None:
        self.settings = settings
        self.count = count
        self.poll_seconds = poll_seconds
        self._ctx = multiprocessing.get_context("spawn")
        # Lock-free shared booleans, never multiprocessing.Event: Event.set() waits
        # on a condition whose sleepers are the workers, and hangs for ever when a
        # worker died while waiting (SIGTERM to the process group, SIGKILL, OOM).
        self._stop: Any = self._ctx.RawValue(ctypes.c_bool, False)
        self._processes: list[SpawnProcess] = []
        self._ready: list[Any] = []
        self._restarts = RestartPolicy(0)
        self._monitor_stop = threading.Event()
        self._monitor: threading.Thread | None = None

    name = "workers"

    def _spawn(self) -> tuple[SpawnProcess, Any]:
        ready = self._ctx.RawValue(ctypes.c_bool, False)
        process = self._ctx.Process(
            target=worker_main,
            args=(
                self.settings.model_dump(mode="json"),
                self._stop,
                ready,
                logging.getLogger().getEffectiveLevel(),
                self.poll_seconds,
            ),
            name="ichnode-worker",
            daemon=True,
        )
        process.start()
        return process, ready

    def start(self) -> None:
        """Start the worker processes (they load the model in the background)."""
        for _ in range(self.count):
            process, ready = self._spawn()
            self._processes.append(process)
            self._ready.append(ready)
            self._restarts.add()
        logger.info("started %d worker process(es)", self.count)
        self._monitor = threading.Thread(target=self._watch, name="ichnode-workers", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        while not self._monitor_stop.wait(1.0):
            self.check()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every worker loaded its model."""
        deadline = time.monotonic() + timeout
        while not all(r.value for r in self._ready):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def check(self) -> int:
        """Restart workers that died; return how many were restarted.

        The rule is :class:`node.restarts.RestartPolicy`'s: a worker that dies
        before its model is loaded (bad weights, no memory) is restarted after a
        growing pause, so a broken installation does not spin; one that dies
        while working is restarted at once; exit code 0 means stopped on purpose.
        """
        if self._stop.value:
            return 0
        restarted = 0
        now = time.monotonic()
        for i, process in enumerate(self._processes):
            if process.is_alive():
                continue
            verdict = self._restarts.dead(i, process.exitcode, not self._ready[i].value, now)
            if verdict.pause:
                logger.error(
                    "worker pid %s exited with %s before its model was ready; "
                    "starting another in %.0f s",
                    process.pid,
                    process.exitcode,
                    verdict.pause,
                )
            if not verdict.start:
                continue
            logger.error(
                "worker pid %s exited with %s; starting another", process.pid, process.exitcode
            )
            self._processes[i], self._ready[i] = self._spawn()
            restarted += 1
        return restarted

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers."""
        return [p.pid for p in self._processes if p.pid is not None]

    def stop(self, timeout: float | None = None) -> None:
        """Let the workers finish their current job, then stop them.

        A worker still busy after ``timeout`` (default ``jobs.stop_grace_seconds``)
        is killed; its job is taken up again at the next start. Nothing here
        waits on a worker's cooperation, so a worker that already died, or got
        the same SIGTERM first, cannot hold the stop up.
        """
        grace = self.settings.jobs.stop_grace_seconds if timeout is None else timeout
        deadline = time.monotonic() + grace
        self._monitor_stop.set()
        if self._monitor is not None:
            self._monitor.join()
        self._stop.value = True
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self._processes:
            if process.is_alive():
                logger.warning(
                    "worker pid %s did not stop within %.0f s; killing it", process.pid, grace
                )
                process.kill()
                process.join(5)


def component(service: NodeService) -> WorkerPool:
    """The worker processes of ``ichnode serve`` (see :mod:`node.service`)."""
    return WorkerPool(service.settings, service.settings.inference.workers)
