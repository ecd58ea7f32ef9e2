"""Training on the phantom: sampling, augmentation, losses, checkpoints, resume and
the weights file it writes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.datasets import phantom_case
from inference.findings import CLASSES
from inference.predictor import Predictor, read_weights
from inference.train import (
    augment,
    lr_at,
    lse_pool,
    mil_seg_loss,
    sample_slices,
    seg_loss,
    to_train_case,
    train,
)
from node.cli import build_parser


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        [
            "train",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--cache-cases",
            "2",
            "--refresh-every",
            "2",
            "--input-size",
            "64",
            "--base-width",
            "4",
            "--phantom-slices",
            "6",
            "--phantom-matrix",
            "64",
            "--val-seeds",
            "900000:900006",
            "--val-slices",
            "6",
            "--device",
            "cpu",
            "--seed",
            "5",
            "--checkpoint-every",
            "2",
            "--out",
            str(tmp_path / "w.pt"),
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--no-progress",
            *extra,
        ]
    )


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = train(_args(tmp_path / "a"))
    monkeypatch.setattr(sys, "argv", ["ichnode", "train", "--stop-at", "2"])
    stopped = train(_args(tmp_path / "b", "--stop-at", "2"))
    assert stopped.name == "checkpoint.pt"
    assert not (tmp_path / "b" / "w.pt").exists()
    assert int(torch.load(stopped, weights_only=True)["step"]) == 2
    monkeypatch.setattr(sys, "argv", ["ichnode", "train", "--resume"])
    resumed = train(_args(tmp_path / "b", "--resume"))
    a, _ = read_weights(straight)
    b, _ = read_weights(resumed)
    # the weights name the command that started the run, and the one that resumed it
    assert b["training"]["command"] == "ichnode train --stop-at 2"
    assert b["training"]["resumed_with"] == "ichnode train --resume"
    assert "resumed_with" not in a["training"]
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-5), key
    assert a["thresholds"] == pytest.approx(b["thresholds"])
    # Resumed at its last step, a run only validates again (the thresholds can be
    # picked anew without training): the same network, the same thresholds.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="inference.train"):
        again = train(_args(tmp_path / "b", "--resume", "--out", str(tmp_path / "again.pt")))
    assert "validation only" in caplog.text and "filled the cache" not in caplog.text
    d, _ = read_weights(again)
    for key, value in b["state_dict"].items():
        assert torch.equal(value, d["state_dict"][key]), key
    assert d["thresholds"] == pytest.approx(b["thresholds"])
    # and a different seed trains a different network
    other = train(_args(tmp_path / "c", "--seed", "6"))
    c, _ = read_weights(other)
    assert not torch.allclose(
        a["state_dict"]["seg_head.weight"], c["state_dict"]["seg_head.weight"]
    )


def test_weights_file_records_how_it_was_made(tmp_path: Path) -> None:
    path = train(_args(tmp_path, "--steps", "2", "--version", "9.9-test"))
    assert path.stat().st_size < 10 * 1024 * 1024
    predictor = Predictor(path, device="cpu")
    assert predictor.model_version == "9.9-test"
    assert set(predictor.thresholds) == set(CLASSES)
    assert all(0.0 < t < 1.0 for t in predictor.thresholds.values())
    assert predictor.training["seed"] == 5
    assert predictor.training["data"] == "phantom"
    assert predictor.training["command"].startswith("ichnode train")
    assert predictor.training["val_seeds"] == "900000:900006"
    assert predictor.config.input_size == 64 and predictor.config.base_width == 4
    assert len(predictor.weights_sha256) == 64


def test_bf16_mixed_precision_trains_float32_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="inference.predictor"):
        fp32, _ = read_weights(train(_args(tmp_path / "a", "--steps", "2")))
        bf16, _ = read_weights(
            train(_args(tmp_path / "b", "--steps", "2", "--precision", "bf16"))
        )
    # thresholds are picked in float32 on a CPU, whatever the training precision
    # and whether the CPU has AMX, so the same command gives the same file anywhere
    picked = [r.getMessage() for r in caplog.records if "in memory" in r.getMessage()]
    assert len(picked) == 2 and all("on cpu, float32" in m for m in picked), picked
    assert bf16["training"]["precision"] == "bf16"
    assert fp32["training"]["precision"] == "fp32"
    for key, value in bf16["state_dict"].items():
        if value.is_floating_point():
            assert value.dtype == torch.float32, key
            assert torch.isfinite(value).all(), key
    # The same seed and batches: the steps differ only by the rounding of the forward pass.
    a, b = fp32["state_dict"]["seg_head.weight"], bf16["state_dict"]["seg_head.weight"]
    assert not torch.equal(a, b)
    assert torch.allclose(a, b, atol=0.05)


def test_loading_processes_change_nothing_but_speed(tmp_path: Path) -> None:
    # Cases made in two spawned processes arrive in the order the loop would make
    # them, so the run, its validation and its thresholds are the same.
    here, _ = read_weights(train(_args(tmp_path / "a", "--steps", "6", "--refresh-every", "1")))
    workers, _ = read_weights(
        train(_args(tmp_path / "b", "--steps", "6", "--refresh-every", "1", "--workers", "2"))
    )
    for key, value in here["state_dict"].items():
        assert torch.equal(value, workers["state_dict"][key]), key
    assert here["thresholds"] == workers["thresholds"]
    assert here["training"]["val_auc"] == pytest.approx(workers["training"]["val_auc"], nan_ok=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_writes_usable_weights(tmp_path: Path) -> None:
    # The path the bundled weights were trained on: cache, augmentation and noise
    # on the GPU, bfloat16 autocast, cases from worker processes.
    path = train(_args(tmp_path, "--device", "cuda", "--precision", "bf16", "--workers", "2"))
    ckpt, _ = read_weights(path)
    for key, value in ckpt["state_dict"].items():
        assert value.device.type == "cpu", key
        if value.is_floating_point():
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    assert Predictor(path, device="cuda").config.input_size == 64


def test_resume_without_checkpoint_and_overlapping_seeds_are_refused(tmp_path: Path) -> None:
    from inference.datasets import DatasetError

    with pytest.raises(ValueError, match="no checkpoint"):
        train(_args(tmp_path, "--resume"))
    with pytest.raises(DatasetError, match="overlap"):
        train(_args(tmp_path, "--train-seeds", "899990:900010"))
    with pytest.raises(DatasetError, match="overlap"):
        train(_args(tmp_path, "--train-seeds", "0:2000000"))


def test_sampling_is_balanced_towards_slices_with_blood() -> None:
    cases = [to_train_case(phantom_case(s, n_slices=8, matrix=64), 32) for s in range(4)]
    assert any(len(c.positive) for c in cases)
    rng = np.random.default_rng(0)
    hu, seg, cls, has_seg = sample_slices(cases, 16, rng, 1)
    assert hu.shape == (16, 3, 32, 32)
    assert seg is not None and seg.shape == (16, 5, 32, 32)
    assert cls.shape == (16, 6)
    assert float(cls[:, 0].sum()) >= 8
    assert torch.all(has_seg == 1)


def test_augmentation_moves_masks_with_the_image() -> None:
    hu = torch.full((6, 3, 48, 48), 20.0)
    seg = torch.zeros((6, 5, 48, 48))
    hu[:, :, 10:20, 25:35] = 400.0
    seg[:, 1, 10:20, 25:35] = 1.0
    gen = torch.Generator().manual_seed(1)
    out_hu, out_seg = augment(hu, seg, gen)
    assert out_seg is not None
    moved = 0
    for b in range(6):
        inside = out_seg[b, 1] > 0.9
        assert int(inside.sum()) > 20
        assert float(out_hu[b, 1][inside].mean()) > 300.0
        moved += int(not torch.equal(inside, seg[b, 1] > 0.9))
    assert moved >= 5
    assert float(out_seg[:, [0, 2, 3, 4]].abs().max()) == 0.0


def test_losses_and_schedule() -> None:
    logits = torch.tensor([[-4.0] * 6, [3.0] * 6, [0.0] * 6])
    pooled = lse_pool(logits)
    assert torch.all(pooled <= logits.max(0).values + 1e-6)
    assert torch.all(pooled >= logits.mean(0) - 1e-6)
    target = torch.zeros((2, 5, 8, 8))
    target[:, 0, 2:5, 2:5] = 1.0
    good = torch.where(target > 0, 8.0, -8.0)
    assert float(seg_loss(good, target, torch.ones(2))) < 0.05
    assert float(seg_loss(-good, target, torch.ones(2))) > 1.0
    assert float(seg_loss(-good, target, torch.zeros(2))) == 0.0
    assert lr_at(0, 1000, 1.0) == pytest.approx(0.01)
    assert lr_at(100, 1000, 1.0) == pytest.approx(1.0)
    assert lr_at(999, 1000, 1.0) < 0.05


def test_qa_negatives_keep_the_skull_and_carry_no_blood() -> None:
    from inference.phantom import generate_case
    from inference.train import qa_negative

    item = qa_negative(3, n_slices=6, matrix=64)
    source = generate_case(3, n_slices=6, matrix=64, subtypes=())
    assert item.masks is not None and not item.masks.any()
    assert not item.series_labels.any()
    assert item.slice_labels is not None and not item.slice_labels.any()
    bone = source.tissue == 2  # BONE
    assert np.array_equal(item.volume.hu[bone], source.hu[bone])
    assert not np.array_equal(item.volume.hu, source.hu)


def test_domain_augment_is_seeded_and_spans_the_scanner_variation() -> None:
    from inference.train import domain_augment

    case = phantom_case(5, n_slices=6, matrix=64)
    hu = torch.from_numpy(case.volume.hu[1:4].copy())[None].repeat(32, 1, 1, 1)
    a = domain_augment(hu, torch.Generator().manual_seed(3))
    b = domain_augment(hu, torch.Generator().manual_seed(3))
    c = domain_augment(hu, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == hu.shape and torch.isfinite(a).all()
    # Brain stays brain: the median HU inside the head moves by a few HU only.
    brain = (hu[0, 1] > 15) & (hu[0, 1] < 45)
    medians = torch.stack([x[1][brain].median() for x in a])
    assert float((medians - hu[0, 1][brain].median()).abs().max()) < 15
    # Some samples are blurred (bone edge spread), some sharp: the steepest step
    # between neighbouring pixels varies across the batch.
    steps = (a[:, 1, :, 1:] - a[:, 1, :, :-1]).abs().amax(dim=(1, 2))
    assert float(steps.min()) < 0.8 * float(steps.max())


def test_matched_negatives_are_drawn_at_the_height_of_blood() -> None:
    from inference.train import TrainCase

    def case(z: int, positive: list[int]) -> TrainCase:
        cls = torch.zeros((z, 6))
        cls[positive, 0] = 1
        # Each slice holds 1000 x (number of slices) + its index.
        hu = (1000.0 * z + torch.arange(z, dtype=torch.float32))[:, None, None]
        hu = hu.expand(z, 8, 8).contiguous()
        return TrainCase(hu=hu, seg=None, cls=cls, bag=cls.amax(0),
                         positive=np.array(positive, dtype=np.int64))

    # Blood only at 70 % of the height of a 21-slice head; a 31-slice head without.
    cache = [case(21, [14]), case(31, [])]
    rng = np.random.default_rng(0)
    heights = {False: [], True: []}
    for matched in (False, True):
        for _ in range(60):
            hu, _, _, _ = sample_slices(cache, 8, rng, 1, matched=matched)
            centre = hu[:, 1, 0, 0]
            for b in (1, 5):
                z, k = divmod(int(centre[b]), 1000)
                heights[matched].append(k / (z - 1))
    near = {m: np.mean(np.abs(np.array(h) - 0.7) <= 0.06) for m, h in heights.items()}
    assert near[True] > 0.9 and near[False] < 0.5


def test_mil_loss_teaches_masks_from_slice_labels_only_where_masks_are_unknown() -> None:
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]] * 2)  # intraventricular on both
    quiet = torch.full((2, 5, 32, 32), -6.0)
    blob = quiet.clone()
    blob[:, 1, 8:12, 20:24] = 6.0  # one 4x4 patch of the labelled subtype
    unknown = torch.tensor([1.0, 1.0])
    # a map with a blob where the label says blood costs little, one without costs much
    assert float(mil_seg_loss(blob, labels, unknown)) < 0.01
    assert float(mil_seg_loss(quiet, labels, unknown)) > 1.0
    # a blob of a subtype the slice is labelled without costs as much
    wrong = quiet.clone()
    wrong[:, 3, 10:14, 20:24] = 6.0
    assert float(mil_seg_loss(wrong, labels, unknown)) > 1.0
    # samples whose masks are known are left to the pixel loss
    assert float(mil_seg_loss(quiet, labels, torch.zeros(2))) == 0.0
    mixed = torch.stack([blob[0], quiet[1]])
    assert float(mil_seg_loss(mixed, labels, torch.tensor([1.0, 0.0]))) < 0.01
    # it has a gradient towards the labelled subtype's strongest patch
    logits = quiet.clone().requires_grad_(True)
    mil_seg_loss(logits, labels, unknown).backward()
    assert logits.grad is not None and float(logits.grad[:, 1].min()) < 0.0


def test_recipe_switches_are_recorded_and_named(tmp_path: Path) -> None:
    path = train(_args(tmp_path, "--steps", "2", "--seg-mil", "--cls-pool", "head"))
    predictor = Predictor(path, device="cpu")
    assert predictor.training["seg_mil"] is True
    assert predictor.training["cls_pool"] == "head" and predictor.config.cls_pool == "head"
    assert predictor.model_version.endswith(".2.mil.hp")
