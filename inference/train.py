"""Training of the hemorrhage network: ``ichnode train``.

Owns the training loop: data sources (the phantom generated on the fly from a
seed range disjoint from the held-out seeds, the RSNA ICH and CQ500 layouts),
the in-memory case cache, balanced slice sampling, augmentation (rotation,
flip, scale, shift, contrast, noise), the losses (BCE with positive weights for
the six class logits, BCE + soft Dice for the five masks, multiple-instance
pooling for scan-level CQ500 labels), checkpoints every N steps with
``--resume``, and the final step: thresholds picked on a held-out validation
set for a sensitivity of at least 0.95, saved in the weights file with the
model config, version, training command and seed.

Every step draws its sample and augmentation from generators seeded with
``(seed, step)``, so a run resumed from a checkpoint follows the same path as an
uninterrupted one. Torch is imported inside the functions: ``add_arguments``
is called by ``ichnode --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import logging
import math
import os
import shlex
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.findings import CLASSES, SUBTYPES

if TYPE_CHECKING:
    import torch

    from inference.datasets import LabelledVolume
    from inference.model import HemorrhageNet

logger = logging.getLogger(__name__)

#: Phantom seeds used for training by default; the held-out ranges below never overlap.
DEFAULT_TRAIN_SEEDS = "0:500000"
#: Validation seeds (threshold choice at the end of training).
DEFAULT_VAL_SEEDS = "900000:900080"
#: Test seeds reserved for ``ichnode evaluate`` and the model card.
TEST_SEEDS = "1000000:1000200"
#: Class weights of the positive examples in the class loss (``CLASSES`` order).
POS_WEIGHT = (1.0, 2.0, 2.0, 2.0, 2.0, 2.0)
TARGET_SENSITIVITY = 0.95
#: Weight of blood pixels in the mask BCE.
SEG_POS_WEIGHT = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ichnode train`` (imports nothing heavy)."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", choices=["phantom", "rsna", "cq500", "ctich"], default="phantom")
    data.add_argument("--train-seeds", default=DEFAULT_TRAIN_SEEDS, help="phantom seeds A:B")
    data.add_argument("--val-seeds", default=DEFAULT_VAL_SEEDS, help="phantom seeds A:B")
    data.add_argument("--phantom-slices", type=int, default=24, help="slices per phantom case")
    data.add_argument("--phantom-matrix", type=int, default=256)
    data.add_argument(
        "--val-slices", type=int, default=32, help="slices per phantom validation case"
    )
    data.add_argument(
        "--qa-negatives", type=float, default=0.1,
        help="share of phantom training cases turned into QA-phantom-like negatives "
        "(skull around air or water with plastic inserts, no blood)",
    )
    data.add_argument("--rsna-csv", type=Path, help="RSNA stage_2_train.csv")
    data.add_argument("--rsna-dir", type=Path, help="folder of RSNA ID_<hex>.dcm files")
    data.add_argument("--cq500-reads", type=Path, help="CQ500 reads.csv")
    data.add_argument("--cq500-dir", type=Path, help="folder holding CQ500-CT-<n> scans")
    data.add_argument(
        "--ctich-dir", type=Path,
        help="CT-ICH folder, v1.0.0 (Patients_CT/, JPEG windows) or v1.3.1 (ct_scans/ NIfTI)",
    )
    data.add_argument(
        "--mix-phantom", type=float, default=0.0,
        help="with real data: share of training cases drawn from the phantom "
        "(--train-seeds), which still teaches masks and rare subtypes",
    )
    data.add_argument(
        "--exclude-patients", default="",
        help="CT-ICH patient numbers left out of training, comma-separated (cross-validation)",
    )
    data.add_argument(
        "--thresholds-from", type=Path,
        help="series thresholds and pooling from this JSON (written by ichnode crossval from "
        "out-of-fold predictions) instead of a validation set",
    )
    data.add_argument(
        "--val-fraction", type=float, default=0.1, help="held-out share of real series"
    )
    data.add_argument("--cache-cases", type=int, default=48, help="cases kept in memory")
    data.add_argument(
        "--matched-negatives", action=argparse.BooleanOptionalAction, default=False,
        help="draw a quarter of each batch at the height in the head of a slice with blood "
        "(see sample_slices)",
    )
    data.add_argument(
        "--seg-mil", action=argparse.BooleanOptionalAction, default=False,
        help="slices labelled without a mask also teach the mask head: the highest "
        "4x4-pixel mean of each subtype map must agree with the slice's label "
        "(see mil_seg_loss)",
    )
    data.add_argument(
        "--domain-augment", action=argparse.BooleanOptionalAction, default=True,
        help="resolution, slice-thickness, noise-texture, streak and window jitter "
        "(inference.train.domain_augment)",
    )
    data.add_argument(
        "--refresh-every", type=int, default=2, help="replace one cached case every N steps"
    )
    data.add_argument(
        "--workers", type=int, default=0,
        help="processes that generate or load cases ahead of the training loop and the "
        "validation (0: in the loop); the run is the same for any number",
    )
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=3000)
    opt.add_argument("--batch-size", type=int, default=16)
    opt.add_argument("--lr", type=float, default=2e-3)
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    opt.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    opt.add_argument("--init", type=Path, help="start from these weights (fine-tuning)")
    opt.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32",
        help="bf16: mixed precision (bfloat16 autocast) on CPU or CUDA; about 2x faster on "
        "CPUs with AMX or AVX512-BF16, the weights stay float32",
    )
    net = parser.add_argument_group("network")
    net.add_argument("--input-size", type=int, default=128, help="working matrix (pixels)")
    net.add_argument("--base-width", type=int, default=16)
    net.add_argument("--depth", type=int, default=3)
    net.add_argument(
        "--cls-pool", choices=["global", "head"], default=None,
        help="what the class head pools: the whole matrix or the head only (default: as "
        "the --init weights, else global); fine-tuning may change it",
    )
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("runs/ichnode-ich.pt"), help="weights")
    out.add_argument("--checkpoint-dir", type=Path, default=Path("runs/train"))
    out.add_argument("--checkpoint-every", type=int, default=250)
    out.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    out.add_argument(
        "--stop-at", type=int, default=0,
        help="stop after this step with a checkpoint and no weights (resume later)",
    )
    out.add_argument("--version", default="", help="model version stored in the weights")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    """``ichnode train``: exit code 0 on success, 2 with a one-line message on bad input."""
    from inference.datasets import DatasetError
    from inference.predictor import WeightsError

    try:
        result = train(args)
    except (DatasetError, WeightsError) as exc:
        print(f"ichnode train: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        logger.debug("training stopped", exc_info=True)
        print(f"ichnode train: {exc}", file=sys.stderr)
        return 2
    print(f"ichnode train: wrote {result}", file=sys.stderr)
    return 0


# --- data ---------------------------------------------------------------------


@dataclass
class TrainCase:
    """One series at the working matrix, ready to sample.

    ``hu`` (z, S, S) float32; ``seg`` (5, z, S, S) float16 area fractions or None;
    ``cls`` (z, 6) float32 slice labels or None (scan-level labels only);
    ``bag`` (6,) float32 series labels; ``positive`` indices of slices with blood;
    ``seg_known`` (z,) float32 weight of each slice's mask loss (1 where its masks
    are known, 0 where they are not), None when all are known.
    """

    hu: torch.Tensor
    seg: torch.Tensor | None
    cls: torch.Tensor | None
    bag: torch.Tensor
    positive: np.ndarray
    seg_known: np.ndarray | None = None


def to_train_case(item: LabelledVolume, size: int) -> TrainCase:
    """Resample a labelled volume to the working matrix."""
    import torch

    from inference.windows import resize_plane

    hu = torch.from_numpy(np.asarray(item.volume.hu, dtype=np.float32))
    small = resize_plane(hu[:, None], (size, size))[:, 0].contiguous()
    seg = None
    if item.masks is not None:
        m = torch.from_numpy(np.asarray(item.masks, dtype=np.float32))  # (5, z, y, x)
        seg = resize_plane(m.permute(1, 0, 2, 3), (size, size)).permute(1, 0, 2, 3)
        seg = seg.clamp(0, 1).to(torch.float16).contiguous()
    cls = None
    positive = np.zeros(0, dtype=np.int64)
    if item.slice_labels is not None:
        cls = torch.from_numpy(np.asarray(item.slice_labels, dtype=np.float32))
        positive = np.flatnonzero(item.slice_labels[:, 0])
    bag = torch.from_numpy(np.asarray(item.series_labels, dtype=np.float32))
    known = None if item.mask_slices is None else np.asarray(item.mask_slices, dtype=np.float32)
    return TrainCase(hu=small, seg=seg, cls=cls, bag=bag, positive=positive, seg_known=known)


class CaseStream:
    """A deterministic, endless stream of training items: item ``i`` depends only on
    ``(seed, i)``, so a resumed run can skip to where it stopped without loading."""

    def __init__(self, keys: list[Any], loader: Callable[[Any], LabelledVolume | None], seed: int):
        if not keys:
            raise ValueError("no training series")
        self.keys = keys
        self.loader = loader
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def key(self, index: int) -> Any:
        """The key of item ``index`` (a fresh permutation of the keys each epoch)."""
        epoch, pos = divmod(index, len(self.keys))
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.keys)))
        return self.keys[int(self._perm[1][pos])]

    def cases(
        self, start: int, size: int, workers: int = 0
    ) -> Generator[TrainCase, None, None]:
        """Items from index ``start`` on as :class:`TrainCase` at ``size`` pixels,
        skipping those the loader rejects.

        With ``workers`` > 0 they are loaded and resampled in that many processes,
        a few items ahead, and still yielded in index order: the sequence is the
        same for any number of workers.
        """
        load: Callable[[Any], TrainCase | None] = _CaseLoader(self.loader, size)
        if workers <= 0:
            load = _Memo(load)
        keys = (self.key(i) for i in itertools.count(start))
        for case in prefetched(load, keys, workers):
            if case is not None:
                yield case


@dataclass(frozen=True)
class _CaseLoader:
    """Load one item and resample it to the working matrix (picklable for workers)."""

    loader: Callable[[Any], LabelledVolume | None]
    size: int

    def __call__(self, key: Any) -> TrainCase | None:
        item = self.loader(key)
        return None if item is None else to_train_case(item, self.size)


class _Memo:
    """Keep the resampled cases of real series (keys with a ``key`` attribute) in
    memory, up to ``limit`` of them: a small real data set is read from disk once."""

    def __init__(self, load: Callable[[Any], TrainCase | None], limit: int = 256) -> None:
        self.load = load
        self.limit = limit
        self.cases: dict[str, TrainCase | None] = {}

    def __call__(self, key: Any) -> TrainCase | None:
        ref = key[1] if isinstance(key, tuple) and key[0] == "real" else key
        name = getattr(ref, "key", None)
        if not isinstance(name, str):
            return self.load(key)
        if name not in self.cases:
            if len(self.cases) >= self.limit:
                return self.load(key)
            self.cases[name] = self.load(key)
        return self.cases[name]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def prefetched(
    fn: Callable[[Any], Any], keys: Iterable[Any], workers: int
) -> Generator[Any, None, None]:
    """``fn(key)`` for each key, in order; computed in ``workers`` spawned processes
    (at most 3 x workers ahead) or here when ``workers`` is 0.

    ``fn`` must be picklable. Spawned rather than forked processes: the parent may
    hold a CUDA context, which a forked child cannot use or safely inherit.
    """
    if workers <= 0:
        for key in keys:
            yield fn(key)
        return
    import multiprocessing

    depth = 3 * workers
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        pending: deque[Any] = deque()
        for key in keys:
            pending.append(pool.apply_async(fn, (key,)))
            if len(pending) >= depth:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass(frozen=True)
class PhantomLoader:
    """One phantom training case per seed; a share of them QA-phantom-like negatives."""

    qa_negatives: float
    n_slices: int
    matrix: int

    def __call__(self, seed: int) -> LabelledVolume:
        from inference.datasets import phantom_case

        if np.random.default_rng([seed, 7]).random() < self.qa_negatives:
            return qa_negative(seed, n_slices=self.n_slices, matrix=self.matrix)
        return phantom_case(seed, n_slices=self.n_slices, matrix=self.matrix)


@dataclass(frozen=True)
class _RealLoader:
    """One real series, or None (logged) when it cannot be analysed."""

    dataset: Any

    def __call__(self, ref: Any) -> LabelledVolume | None:
        from inference.volume import SeriesSkipped

        try:
            item: LabelledVolume = self.dataset.load(ref)
        except SeriesSkipped as exc:
            logger.warning("skipping series %s: %s", ref.key, exc.reason)
            return None
        return item


def build_sources(
    args: argparse.Namespace,
) -> tuple[CaseStream, Callable[[], Iterator[LabelledVolume]], str]:
    """The training stream, a factory of the validation items, and the loss mode
    (``slice`` for per-slice labels, ``bag`` for scan-level labels)."""
    from inference.datasets import (
        Cq500Dataset,
        CtIchDataset,
        DatasetError,
        RsnaDataset,
        iter_loaded,
        parse_seeds,
        phantom_case,
        split_of,
    )

    if args.data == "phantom":
        train_seeds = parse_seeds(args.train_seeds)
        val_seeds = parse_seeds(args.val_seeds)
        overlap = set(range(max(train_seeds.start, val_seeds.start),
                            min(train_seeds.stop, val_seeds.stop)))
        test = parse_seeds(TEST_SEEDS)
        if overlap or (train_seeds.start < test.stop and test.start < train_seeds.stop):
            raise DatasetError("training seeds overlap the validation or test seeds")

        load_phantom = PhantomLoader(args.qa_negatives, args.phantom_slices, args.phantom_matrix)
        stream = CaseStream(list(train_seeds), load_phantom, args.seed)
        load_val = functools.partial(
            phantom_case, n_slices=args.val_slices, matrix=args.phantom_matrix
        )

        def val_phantoms() -> Iterator[LabelledVolume]:
            return prefetched(load_val, val_seeds, args.workers)

        return stream, val_phantoms, "slice"

    dataset: RsnaDataset | Cq500Dataset | CtIchDataset
    excluded = parse_patients(getattr(args, "exclude_patients", ""))
    if args.data == "ctich":
        if args.ctich_dir is None:
            raise DatasetError("--data ctich needs --ctich-dir")
        dataset = CtIchDataset(args.ctich_dir)
        mode = "slice"
    elif args.data == "rsna":
        if args.rsna_csv is None or args.rsna_dir is None:
            raise DatasetError("--data rsna needs --rsna-csv and --rsna-dir")
        dataset = RsnaDataset(args.rsna_csv, args.rsna_dir)
        mode = "slice"
    else:
        if args.cq500_reads is None or args.cq500_dir is None:
            raise DatasetError("--data cq500 needs --cq500-reads and --cq500-dir")
        dataset = Cq500Dataset(args.cq500_reads, args.cq500_dir)
        mode = "bag"
    if excluded:
        if args.data != "ctich":
            raise DatasetError("--exclude-patients applies to --data ctich")
        unknown = excluded - {r.number for r in dataset.series}  # type: ignore[union-attr]
        if unknown:
            raise DatasetError(f"--exclude-patients: no CT-ICH patient {sorted(unknown)}")
    refs: list[Any] = [r for r in dataset.series if getattr(r, "number", None) not in excluded]
    mix = float(getattr(args, "mix_phantom", 0.0))
    if not 0.0 <= mix < 1.0:
        raise DatasetError("--mix-phantom must be at least 0 and below 1")
    if mix and mode != "slice":
        raise DatasetError("--mix-phantom needs per-slice labels (not --data cq500)")
    phantom_loader = PhantomLoader(args.qa_negatives, args.phantom_slices, args.phantom_matrix)
    if getattr(args, "thresholds_from", None) is not None:
        # Thresholds come from out-of-fold predictions: every series trains.
        logger.info("%s: %d training series, thresholds from %s", args.data, len(refs),
                    args.thresholds_from)
        stream = _real_stream(refs, dataset, args.seed, mix, args.train_seeds, phantom_loader)
        return stream, lambda: iter(()), mode
    train_refs = [r for r in refs if split_of(r.key, args.val_fraction) == "train"]
    val_refs = [r for r in refs if split_of(r.key, args.val_fraction) == "val"]
    if not train_refs or not val_refs:
        # Tiny data sets: hold out the last series so both sides exist.
        if len(refs) < 2:
            raise DatasetError("need at least two series (one for validation)")
        train_refs, val_refs = refs[:-1], refs[-1:]
    logger.info("%s: %d training and %d validation series", args.data, len(train_refs),
                len(val_refs))

    stream = _real_stream(train_refs, dataset, args.seed, mix, args.train_seeds, phantom_loader)
    return stream, lambda: iter_loaded(dataset, val_refs), mode


def parse_patients(text: str) -> set[int]:
    """``"49,51"`` to ``{49, 51}``; a clear error otherwise."""
    from inference.datasets import DatasetError

    try:
        return {int(part) for part in text.split(",") if part.strip()}
    except ValueError as exc:
        raise DatasetError(f"patient numbers must be integers separated by commas, "
                           f"not {text!r}") from exc


def _real_stream(
    refs: list[Any], dataset: Any, seed: int, mix: float, train_seeds: str,
    phantom_loader: PhantomLoader,
) -> CaseStream:
    """Real series, with a share ``mix`` of phantom cases from ``train_seeds``."""
    from inference.datasets import parse_seeds

    real = _RealLoader(dataset)
    if not mix:
        return CaseStream(refs, real, seed)
    seeds = parse_seeds(train_seeds)
    return MixedStream(refs, real, seed, mix=mix, phantom_seeds=seeds, phantom=phantom_loader)


class MixedStream(CaseStream):
    """Real series mixed with phantom cases: item ``i`` is a phantom case with
    probability ``mix`` (drawn from ``(seed, i)``), otherwise the real series the
    epoch's permutation puts at ``i``; still a function of ``(seed, i)`` alone."""

    def __init__(self, keys: list[Any], loader: Callable[[Any], LabelledVolume | None],
                 seed: int, *, mix: float, phantom_seeds: range,
                 phantom: Callable[[int], LabelledVolume]) -> None:
        super().__init__(keys, _MixedLoader(loader, phantom), seed)
        self.mix = mix
        self.phantom_seeds = phantom_seeds

    def key(self, index: int) -> Any:
        rng = np.random.default_rng([self.seed, index, 17])
        if rng.random() < self.mix:
            return ("phantom", int(self.phantom_seeds[int(rng.integers(len(self.phantom_seeds)))]))
        return ("real", super().key(index))


@dataclass(frozen=True)
class _MixedLoader:
    """Dispatch ``("real", ref)`` and ``("phantom", seed)`` keys to their loaders."""

    real: Callable[[Any], LabelledVolume | None]
    phantom: Callable[[int], LabelledVolume]

    def __call__(self, key: tuple[str, Any]) -> LabelledVolume | None:
        kind, value = key
        return self.phantom(value) if kind == "phantom" else self.real(value)


def qa_negative(seed: int, *, n_slices: int, matrix: int) -> LabelledVolume:
    """A negative case shaped like a head QA phantom: the phantom's scalp and skull
    around air, water or fat, holding cylinders and boxes of plastic (-200 to
    400 HU, the range of acrylic, nylon, polyethylene and bone-like inserts).

    Teaches the network that bright objects inside a skull are not blood by
    themselves; no real QA phantom data is used.
    """
    from inference import phantom
    from inference.datasets import LabelledVolume, phantom_volume

    case = phantom.generate_case(seed, n_slices=n_slices, matrix=matrix, subtypes=())
    if case.tissue is None:
        raise ValueError(f"phantom case {seed} came without its tissue map")
    rng = np.random.default_rng([seed, 11])
    hu = case.hu.copy()
    inside = ~np.isin(case.tissue, [phantom.AIR, phantom.SCALP, phantom.BONE, phantom.SOFT])
    fill = float(rng.choice([-1000.0, 0.0, -100.0], p=[0.5, 0.3, 0.2]))
    noise = case.noise_sd * rng.standard_normal(hu.shape).astype(np.float32)
    hu[inside] = fill + noise[inside]
    zz, yy, xx = np.nonzero(inside)
    if len(zz):
        py, px = case.spacing[1], case.spacing[2]
        rows, cols = np.mgrid[0 : hu.shape[1], 0 : hu.shape[2]]
        for _ in range(int(rng.integers(1, 7))):
            i = int(rng.integers(len(zz)))
            cy, cx = yy[i], xx[i]
            size = float(rng.uniform(3.0, 25.0)) / py  # half-size in pixels
            if rng.random() < 0.6:
                shape = (rows - cy) ** 2 + (cols - cx) ** 2 <= size**2
            else:
                shape = (np.abs(rows - cy) <= size) & (np.abs(cols - cx) <= size * px / py)
            k0 = int(rng.integers(0, hu.shape[0]))
            k1 = min(hu.shape[0], k0 + int(rng.integers(1, hu.shape[0] + 1)))
            value = float(rng.uniform(-200.0, 400.0))
            for k in range(k0, k1):
                m = shape & inside[k]
                hu[k][m] = value + noise[k][m]
    key = f"qa{seed}"
    z = hu.shape[0]
    return LabelledVolume(
        key=key,
        volume=phantom_volume(hu, case.spacing, key),
        series_labels=np.zeros(len(CLASSES), dtype=bool),
        slice_labels=np.zeros((z, len(CLASSES)), dtype=bool),
        masks=np.zeros((len(SUBTYPES), *hu.shape), dtype=bool),
    )


# --- sampling and augmentation ------------------------------------------------


def sample_slices(
    cache: list[TrainCase], batch_size: int, rng: np.random.Generator, neighbours: int,
    matched: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """A balanced batch of slices: half from slices with blood when the cache has any.

    With ``matched``, half of the other half is drawn at the height in the head
    (relative slice position, +-1 slice) of a random slice with blood: real
    bleeds sit mostly in the middle of the series, and without matched negatives
    a network learns "a slice through the lateral ventricles" as a sign of blood.

    Returns HU stacks (B, 2n+1, S, S), mask targets (B, 5, S, S) or None, class
    targets (B, 6) and a per-sample weight of the mask loss (B,) (0 where the case
    has no masks).
    """
    import torch

    from inference.windows import neighbour_index

    hus, segs, clss, has_seg = [], [], [], []
    size = cache[0].hu.shape[-1]
    for b in range(batch_size):
        case = cache[int(rng.integers(len(cache)))]
        if b % 2 == 0 and len(case.positive) == 0:
            candidates = [c for c in cache if len(c.positive)]
            if candidates:
                case = candidates[int(rng.integers(len(candidates)))]
        z = case.hu.shape[0]
        if b % 2 == 0 and len(case.positive):
            k = int(case.positive[int(rng.integers(len(case.positive)))])
        elif matched and b % 4 == 1 and any(len(c.positive) for c in cache):
            ref = [c for c in cache if len(c.positive)]
            other = ref[int(rng.integers(len(ref)))]
            height = float(other.positive[int(rng.integers(len(other.positive)))])
            height /= max(1, other.hu.shape[0] - 1)
            k = int(np.clip(round(height * (z - 1)) + int(rng.integers(-1, 2)), 0, z - 1))
        else:
            k = int(rng.integers(z))
        idx = torch.from_numpy(neighbour_index(z, neighbours)[k]).to(case.hu.device)
        hus.append(case.hu[idx])
        if case.cls is None:
            raise ValueError("a training case without slice labels")
        clss.append(case.cls[k])
        if case.seg is not None:
            segs.append(case.seg[:, k].float())
            has_seg.append(1.0 if case.seg_known is None else float(case.seg_known[k]))
        else:
            segs.append(torch.zeros((len(SUBTYPES), size, size), device=case.hu.device))
            has_seg.append(0.0)
    seg = torch.stack(segs) if any(has_seg) else None
    return torch.stack(hus), seg, torch.stack(clss), torch.tensor(has_seg)


def augment(
    hu: torch.Tensor,
    seg: torch.Tensor | None,
    gen: torch.Generator,
    noise_gen: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random rotation (+-15 deg), left-right flip, scale (0.85-1.2), shift (+-6%),
    contrast (x0.92-1.08, +-6 HU) and Gaussian noise (0-6 HU) on a HU batch
    (B, C, S, S); the masks follow the geometry.

    The parameters come from ``gen`` (a CPU generator); the work is done on the
    batch's device. The noise image is drawn from ``gen`` too, or from
    ``noise_gen`` (a generator on the batch's device) when one is given.
    """
    import torch
    import torch.nn.functional as F

    b = hu.shape[0]

    def uniform(low: float, high: float, n: int = b) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=gen)

    angle = uniform(-math.pi / 12, math.pi / 12)
    scale = uniform(0.85, 1.2)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin
    theta[:, 1, 0] = sin * flip
    theta[:, 1, 1] = cos
    theta[:, :, 2] = uniform(-0.06, 0.06, 2 * b).view(b, 2)
    grid = F.affine_grid(theta.to(hu.device), list(hu.shape), align_corners=False)
    # Air outside the image: shift so that zero padding means -1024 HU.
    hu = F.grid_sample(hu + 1024.0, grid, mode="bilinear", align_corners=False) - 1024.0
    if seg is not None:
        seg = F.grid_sample(seg, grid, mode="bilinear", align_corners=False)
    gain = uniform(0.92, 1.08).view(b, 1, 1, 1).to(hu.device)
    offset = uniform(-6.0, 6.0).view(b, 1, 1, 1).to(hu.device)
    sd = uniform(0.0, 6.0).view(b, 1, 1, 1).to(hu.device)
    if noise_gen is None:
        noise = torch.randn(hu.shape, generator=gen).to(hu.device)
    else:
        noise = torch.randn(hu.shape, generator=noise_gen, device=hu.device)
    return hu * gain + offset + noise * sd, seg


def domain_augment(hu: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What real scanners vary and the phantom does not, on a HU batch (B, C, S, S):

    * resolution (half of the samples): blurred by down- and up-sampling to 55-100 %
      of the matrix, which also spreads bone into the first millimetres inside the
      inner table (the partial volume that a sharp phantom skull lacks);
    * slice thickness (a third): each slice mixed with its neighbours by up to 35 %;
    * noise texture: Gaussian noise of 0-10 HU smoothed over 0-1.5 pixels, as
      reconstruction kernels correlate CT noise;
    * streaks (a quarter): 1-4 straight lines of +-15-60 HU across the image;
    * window: the HU scale stretched by 0.9-1.1 around 40 HU and offset by up to +-8 HU.

    Parameters come from ``gen`` (a CPU generator); the work is on ``hu``'s device.
    """
    import torch
    import torch.nn.functional as F

    b, c, size, _ = hu.shape
    device = hu.device

    def uniform(low: float, high: float, n: int = b) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=gen)

    out = hu.clone()
    blur = torch.rand(b, generator=gen) < 0.5
    factor = uniform(0.55, 1.0)
    for i in torch.nonzero(blur).flatten().tolist():
        small = max(8, round(size * float(factor[i])))
        x = F.interpolate(out[i : i + 1], size=(small, small), mode="area")
        out[i : i + 1] = F.interpolate(x, size=(size, size), mode="bilinear",
                                       align_corners=False)
    if c >= 3:
        mix = uniform(0.0, 0.35) * (torch.rand(b, generator=gen) < 0.33)
        m = mix.view(b, 1, 1).to(device)
        centre = c // 2
        neighbours = 0.5 * (out[:, centre - 1] + out[:, centre + 1])
        out[:, centre] = (1 - m) * out[:, centre] + m * neighbours
    sd = uniform(0.0, 10.0)
    sigma = uniform(0.0, 1.5)
    noise = torch.randn((b, c, size, size), generator=gen)
    radius = 3
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    for i in range(b):
        if float(sigma[i]) > 0.3:
            k = torch.exp(-0.5 * (grid / float(sigma[i])) ** 2)
            k = k / k.sum()
            n = noise[i : i + 1].reshape(c, 1, size, size)
            n = F.conv2d(F.pad(n, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
            n = F.conv2d(F.pad(n, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
            n = n / n.std().clamp_min(1e-6)
            noise[i] = n.reshape(c, size, size)
    out = out + noise.to(device) * sd.view(b, 1, 1, 1).to(device)
    streaky = torch.rand(b, generator=gen) < 0.25
    if bool(streaky.any()):
        coords = torch.linspace(-1.0, 1.0, size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        for i in torch.nonzero(streaky).flatten().tolist():
            lines = torch.zeros(size, size)
            for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
                theta = float(uniform(0.0, math.pi, 1))
                r = float(uniform(-0.6, 0.6, 1))
                amp = float(uniform(15.0, 60.0, 1)) * (1 if float(uniform(0, 1, 1)) < 0.5 else -1)
                width = float(uniform(0.5, 2.0, 1)) * 2.0 / size
                d = xx * math.cos(theta) + yy * math.sin(theta) - r
                lines += amp * torch.exp(-((d / width) ** 2))
            out[i] = out[i] + lines.to(device)
    gain = uniform(0.9, 1.1).view(b, 1, 1, 1).to(device)
    offset = uniform(-8.0, 8.0).view(b, 1, 1, 1).to(device)
    return (out - 40.0) * gain + 40.0 + offset


def to_input(hu: torch.Tensor) -> torch.Tensor:
    """HU stacks (B, 2n+1, S, S) to windowed network input (B, 3(2n+1), S, S)."""
    from inference.windows import apply_windows

    win = apply_windows(hu)  # (B, 2n+1, 3, S, S)
    return win.reshape(hu.shape[0], -1, *hu.shape[-2:])


# --- losses -------------------------------------------------------------------


def seg_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """BCE (blood pixels weighted x10) + soft Dice over the batch, on samples with masks.

    Dice counts only the subtypes with blood in the batch: a Dice term for an
    absent subtype only pushes every output to zero, which starves the rare
    positive pixels of gradient and collapses the masks.
    """
    import torch
    import torch.nn.functional as F

    w = weight.view(-1, 1, 1, 1).to(logits.dtype)
    if float(w.sum()) == 0:
        return logits.sum() * 0.0
    pos_weight = torch.full((logits.shape[1], 1, 1), SEG_POS_WEIGHT, device=logits.device)
    bce = F.binary_cross_entropy_with_logits(
        logits, target, reduction="none", pos_weight=pos_weight
    )
    bce = (bce * w).sum() / (w.sum() * logits[0].numel())
    prob = torch.sigmoid(logits) * w
    t = target * w
    inter = (prob * t).sum(dim=(0, 2, 3))
    t_sum = t.sum(dim=(0, 2, 3))
    dice = (2 * inter + 1.0) / (prob.sum(dim=(0, 2, 3)) + t_sum + 1.0)
    present = t_sum > 0.5
    if not bool(present.any()):
        return bce
    return bce + (1.0 - dice[present]).mean()


def mil_seg_loss(
    logits: torch.Tensor, labels: torch.Tensor, unknown: torch.Tensor
) -> torch.Tensor:
    """Multiple-instance loss of the mask head on slices whose masks are not known.

    A slice labelled with a subtype holds at least one blob of it somewhere; a
    slice labelled without it holds none. The strongest 4 x 4-pixel patch of
    each subtype map (mean logit) stands for the slice and is held to the
    slice's label by BCE. ``logits`` (B, 5, H, W), ``labels`` (B, 5) in
    ``SUBTYPES`` order, ``unknown`` (B,) 1 where the sample's mask is unknown
    (those with masks are taught pixel by pixel by :func:`seg_loss`).
    """
    import torch.nn.functional as F

    w = unknown.to(logits.dtype)
    if float(w.sum()) == 0:
        return logits.sum() * 0.0
    patch = F.avg_pool2d(logits, 4, ceil_mode=True).amax(dim=(2, 3))  # (B, 5)
    bce = F.binary_cross_entropy_with_logits(patch, labels.to(patch.dtype), reduction="none")
    return (bce.mean(dim=1) * w).sum() / w.sum()


def lse_pool(logits: torch.Tensor, r: float = 5.0) -> torch.Tensor:
    """Log-sum-exp pooling of (z, 6) slice logits to (6,) series logits (a smooth max)."""
    import torch

    n = logits.shape[0]
    return (torch.logsumexp(r * logits, dim=0) - math.log(n)) / r


# --- the loop -----------------------------------------------------------------


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up then cosine decay to 2% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _checkpoint_path(args: argparse.Namespace) -> Path:
    return Path(args.checkpoint_dir) / "checkpoint.pt"


def train(args: argparse.Namespace) -> Path:
    """Train, pick thresholds on the validation set, write the weights; return their path."""
    import torch
    from torch.nn import functional as F

    from inference.model import HemorrhageNet, ModelConfig, count_parameters
    from inference.predictor import read_weights, resolve_device
    from inference.windows import input_channels

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.steps < 1 or args.batch_size < 2:
        raise ValueError("--steps must be >= 1 and --batch-size >= 2")
    torch.manual_seed(args.seed)
    config = ModelConfig(
        in_channels=input_channels(1),
        base_width=args.base_width,
        depth=args.depth,
        input_size=args.input_size,
        neighbours=1,
        cls_pool=args.cls_pool or "global",
    )
    model = HemorrhageNet(config)
    if args.init:
        ckpt, _ = read_weights(args.init)
        init_config = ModelConfig.from_dict(dict(ckpt["model_config"]))
        if args.cls_pool:
            # The pooling has no weights of its own: the init's weights fit either.
            init_config = dataclasses.replace(init_config, cls_pool=args.cls_pool)
        if init_config != config:
            config = init_config
            model = HemorrhageNet(config)
            logger.info("network config taken from --init weights: %s", config)
        model.load_state_dict(ckpt["state_dict"])
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    start_step = 0
    command = shlex.join(["ichnode", "train", *_cli_argv()])
    started_with = command  # a resumed run: the command that started it, from the checkpoint
    ckpt_path = _checkpoint_path(args)
    if args.resume:
        if not ckpt_path.is_file():
            raise ValueError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step = int(state["step"])
        started_with = str(state.get("command", "")) or command
        logger.info("resumed from %s at step %d", ckpt_path, start_step)
    logger.info(
        "network: %d parameters, input %d px, device %s", count_parameters(model),
        config.input_size, device,
    )

    stream, val_items, mode = build_sources(args)
    if start_step >= args.steps:
        # Resumed at its last step: only the validation and the weights file are left.
        logger.info("checkpoint is at step %d of %d: validation only", start_step, args.steps)
        return finish(args, model, config, val_items, started_with, command)
    cache_size = max(1, args.cache_cases)
    refresh = max(1, args.refresh_every)
    drawn_at_start = start_step // refresh
    cases = stream.cases(drawn_at_start, config.input_size, args.workers)
    # The cache lives on the training device: batches are cut and augmented there.
    cache: deque[TrainCase] = deque(maxlen=cache_size)
    t0 = time.monotonic()
    for _ in range(cache_size):
        cache.append(_to_device(next(cases), device))
    logger.info("filled the cache with %d cases in %.1f s", len(cache), time.monotonic() - t0)
    cuda = device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    noise_gen = torch.Generator(device=device) if cuda else None

    pos_weight = torch.tensor(POS_WEIGHT, device=device)

    def autocast() -> Any:
        # bfloat16 keeps float32's exponent range: no loss scaling is needed.
        return torch.autocast(
            device_type=device, dtype=torch.bfloat16, enabled=args.precision == "bf16"
        )

    progress = _progress(args, start_step)
    model.train()
    last_loss = float("nan")
    timer = (time.monotonic(), start_step)
    for step in range(start_step, args.steps):
        if step > start_step and step % refresh == 0:
            cache.append(_to_device(next(cases), device))
        rng = np.random.default_rng([args.seed, step])
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        if noise_gen is not None:
            noise_gen.manual_seed(args.seed * 1_000_033 + step)
        torch.manual_seed(args.seed * 7919 + step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        if mode == "slice":
            hu, seg, cls, has_seg = sample_slices(
                list(cache), args.batch_size, rng, 1, matched=args.matched_negatives
            )
            hu, seg = augment(hu, seg, gen, noise_gen)
            if args.domain_augment:
                hu = domain_augment(hu, gen)
            with autocast():
                out = model(to_input(hu).to(device))
            # Losses in float32 whatever the precision of the forward pass.
            loss = F.binary_cross_entropy_with_logits(
                out["cls"].float(), cls.to(device), pos_weight=pos_weight
            )
            if seg is not None:
                loss = loss + seg_loss(out["seg"].float(), seg.to(device), has_seg.to(device))
            if args.seg_mil:
                loss = loss + mil_seg_loss(
                    out["seg"].float(), cls[:, 1:].to(device), 1.0 - has_seg.to(device)
                )
        else:
            case = list(cache)[int(rng.integers(len(cache)))]
            z = case.hu.shape[0]
            keep = np.linspace(0, z - 1, min(z, args.batch_size * 3)).round().astype(int)
            from inference.windows import neighbour_index

            idx = torch.from_numpy(neighbour_index(z, 1)[keep]).to(case.hu.device)
            hu, _ = augment(case.hu[idx], None, gen, noise_gen)
            with autocast():
                out = model(to_input(hu).to(device))
            loss = F.binary_cross_entropy_with_logits(
                lse_pool(out["cls"].float()), case.bag.to(device), pos_weight=pos_weight
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        last_loss = 0.9 * last_loss + 0.1 * loss.item() if math.isfinite(last_loss) else loss.item()
        progress.update(1)
        progress.set_postfix(loss=f"{last_loss:.3f}", refresh=False)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps:
            _save_checkpoint(ckpt_path, model, optimizer, step + 1, started_with)
            now = time.monotonic()
            rate = (step + 1 - timer[1]) / max(now - timer[0], 1e-9)
            timer = (now, step + 1)
            logger.info("step %d loss %.4f, %.2f steps/s (checkpoint)", step + 1, last_loss, rate)
        if args.stop_at and step + 1 >= args.stop_at:
            _save_checkpoint(ckpt_path, model, optimizer, step + 1, started_with)
            progress.close()
            cases.close()
            logger.info("stopped at step %d; continue with --resume", step + 1)
            return ckpt_path
    progress.close()
    cases.close()  # stops the loading processes before the validation starts its own
    return finish(args, model, config, val_items, started_with, command)


def _to_device(case: TrainCase, device: str) -> TrainCase:
    if device == "cpu":
        return case
    return TrainCase(
        hu=case.hu.to(device),
        seg=None if case.seg is None else case.seg.to(device),
        cls=None if case.cls is None else case.cls.to(device),
        bag=case.bag.to(device),
        positive=case.positive,
        seg_known=case.seg_known,
    )


def _progress(args: argparse.Namespace, start: int) -> Any:
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        total=args.steps,
        initial=start,
        desc="train",
        file=sys.stderr,
        disable=args.no_progress,
        mininterval=0.5 if interactive else 30.0,
        dynamic_ncols=interactive,
    )


def _save_checkpoint(
    path: Path, model: HemorrhageNet, optimizer: torch.optim.Optimizer, step: int, command: str
) -> None:
    """Model, optimiser and step, with the command that started the run."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "command": command}, tmp)
    os.replace(tmp, path)


def finish(
    args: argparse.Namespace,
    model: HemorrhageNet,
    config: Any,
    val_items: Callable[[], Iterator[LabelledVolume]],
    started_with: str,
    command: str,
) -> Path:
    """Pick thresholds on the validation set and write the weights file.

    The weights record the command that started the run (``started_with``) and,
    for a resumed run, this process's ``command`` as ``resumed_with``.
    """
    import torch

    from config import ICHNODE_VERSION
    from inference.evaluate import collect, pick_threshold, roc_auc
    from inference.predictor import (
        POOLINGS,
        Predictor,
        make_checkpoint,
        pool_slices,
        resolve_device,
    )

    model.eval()
    # The recipe's switches that change what the network learns are in the name, so
    # two weights files of one data set, seed and length are told apart.
    recipe = ".mn" if getattr(args, "matched_negatives", False) else ""
    recipe += ".mil" if getattr(args, "seg_mil", False) else ""
    recipe += ".hp" if config.cls_pool == "head" else ""
    version = args.version or f"{ICHNODE_VERSION}+{args.data}.s{args.seed}.{args.steps}{recipe}"
    training = {
        "command": started_with,
        "seed": int(args.seed),
        "data": args.data,
        "steps": int(args.steps),
        "precision": args.precision,
        "train_seeds": args.train_seeds if args.data == "phantom" else "",
        "val_seeds": args.val_seeds if args.data == "phantom" else "",
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": str(torch.__version__),
        "matched_negatives": bool(getattr(args, "matched_negatives", False)),
        "domain_augment": bool(getattr(args, "domain_augment", True)),
        "seg_mil": bool(getattr(args, "seg_mil", False)),
        "cls_pool": config.cls_pool,
    }
    if args.resume:
        training["resumed_with"] = command
    if getattr(args, "ctich_dir", None) is not None and args.data == "ctich":
        training["ctich_dir"] = str(args.ctich_dir)
        training["mix_phantom"] = float(args.mix_phantom)
        training["train_seeds"] = args.train_seeds if args.mix_phantom else ""
        if args.exclude_patients:
            training["excluded_patients"] = args.exclude_patients
    if getattr(args, "thresholds_from", None) is not None:
        chosen = read_thresholds(args.thresholds_from)
        training["thresholds_from"] = chosen.get("source", str(args.thresholds_from))
        ckpt = make_checkpoint(
            model.cpu(), thresholds=chosen["thresholds"], version=version, training=training,
            pooling=chosen["pooling"],
        )
        return _write_weights(ckpt, Path(args.out))
    provisional = make_checkpoint(
        model.cpu(), thresholds=dict.fromkeys(CLASSES, 0.5), version=version, training=training
    )
    # Thresholds are picked in float32 on a CPU (bfloat16 autocast would make them
    # depend on whether this CPU has AMX) and in float16 on CUDA, as always.
    predictor = Predictor.from_checkpoint(
        provisional,
        device=args.device,
        precision="fp32" if resolve_device(args.device) == "cpu" else "auto",
    )
    results = collect(predictor, val_items(), explain=False)
    best: tuple[float, str, dict[str, float]] | None = None
    for pooling in POOLINGS:
        pooled = np.stack([pool_slices(p, pooling) for p in results.per_series_slices])
        aucs = {
            name: roc_auc(results.series_labels[:, i], pooled[:, i])
            for i, name in enumerate(CLASSES)
        }
        score = float(np.nanmean([aucs["any"], np.nanmean(list(aucs.values()))]))
        logger.info("validation AUC with %s pooling: %s", pooling,
                    {k: round(v, 4) for k, v in aucs.items()})
        if best is None or score > best[0]:
            best = (score, pooling, aucs)
    if best is None:
        raise ValueError("no pooling to choose from (inference.predictor.POOLINGS is empty)")
    _, pooling, val_auc = best
    pooled = np.stack([pool_slices(p, pooling) for p in results.per_series_slices])
    thresholds = {
        name: pick_threshold(results.series_labels[:, i], pooled[:, i], TARGET_SENSITIVITY)
        for i, name in enumerate(CLASSES)
    }
    training["val_auc"] = val_auc
    training["val_series"] = len(results.series_labels)
    training["pooling_chosen_on"] = "validation AUC (any, and mean of all classes)"
    logger.info("pooling %s, thresholds %s", pooling,
                {k: round(v, 4) for k, v in thresholds.items()})
    ckpt = make_checkpoint(
        model, thresholds=thresholds, version=version, training=training, pooling=pooling
    )
    return _write_weights(ckpt, Path(args.out))


def _write_weights(ckpt: dict[str, Any], out: Path) -> Path:
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, out)
    return out


def read_thresholds(path: Path) -> dict[str, Any]:
    """``{"pooling", "thresholds": {class: value}, "source"}`` from a crossval JSON."""
    import json

    from inference.predictor import POOLINGS

    try:
        doc = json.loads(Path(path).read_text())
        thresholds = {name: float(doc["thresholds"][name]) for name in CLASSES}
        pooling = str(doc.get("pooling", "max"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--thresholds-from {path}: not a thresholds file ({exc})") from exc
    if pooling not in POOLINGS or not all(0.0 < v < 1.0 for v in thresholds.values()):
        raise ValueError(f"--thresholds-from {path}: bad pooling or thresholds")
    return {"pooling": pooling, "thresholds": thresholds, "source": doc.get("source", str(path))}


def _cli_argv() -> list[str]:
    """The ``ichnode train`` arguments of this process (after the sub-command)."""
    argv = sys.argv[1:]
    return argv[argv.index("train") + 1 :] if "train" in argv else argv
