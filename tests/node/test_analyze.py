"""``ichnode analyze`` as a subprocess: the JSON document, skip reasons, exit codes,
nothing but JSON on stdout, result objects that validate, and (with the bundled
weights) right answers on held-out phantoms and the real series."""

from __future__ import annotations

import importlib.resources
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from inference.findings import CLASSES, SUBTYPES
from node import results
from tests.interop import REAL_5MM, REAL_TILT, REPO, require_real_data
from tests.node.conftest import make_ct_series, make_findings

SERIES_KEYS = {
    "study_instance_uid",
    "series_instance_uid",
    "hemorrhage",
    "subtypes",
    "slices",
    "outputs",
    "missing",
    "skipped",
}
SKIPPED_KEYS = {"study_instance_uid", "series_instance_uid", "outputs", "skipped"}


def _volume_loader_ready() -> bool:
    from inference.volume import read_series

    try:
        read_series([])
    except NotImplementedError:
        return False
    return True


def _bundled_weights_present() -> bool:
    resource = importlib.resources.files("inference").joinpath("weights/ichnode-ich.pt")
    return resource.is_file()


needs_loader = pytest.mark.skipif(
    not _volume_loader_ready(),
    reason="inference.volume.read_series/load_volume are still the contract stubs",
)
needs_bundled_weights = pytest.mark.skipif(
    not _bundled_weights_present(), reason="bundled weights inference/weights/ichnode-ich.pt absent"
)


@pytest.fixture
def trained_bundled_weights() -> str:
    """The bundled weights' version; skips while they declare themselves interim.

    Interim weights (a few training steps, committed so integration can start)
    are not expected to be accurate; the accuracy checks below run on the
    weights meant for release.
    """
    from inference.predictor import read_weights

    checkpoint, _ = read_weights(None)
    version = str(checkpoint.get("version", ""))
    if "interim" in version.lower():
        pytest.skip(f"bundled weights are interim ({version}); accuracy is checked on final ones")
    return version


def run_analyze(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m node.cli analyze ARGS`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "analyze", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


def parse_document(stdout: str) -> dict[str, Any]:
    """The one JSON document on stdout (and nothing else)."""
    document = json.loads(stdout)  # raises when there is anything else on stdout
    assert stdout.endswith("\n") and stdout.count("\n") == 1
    assert set(document) == {"series"}
    return dict(document)


def write_series(datasets: list[Dataset], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _make_weights(path: Path, threshold: float) -> Path:
    """A small randomly initialised network in the real weights format.

    ``threshold`` 0 makes every class present (the positive path: SEG, SR, key
    images); above 1 makes every class absent.
    """
    import torch

    from inference.model import HemorrhageNet, ModelConfig
    from inference.predictor import make_checkpoint

    torch.manual_seed(1234)
    net = HemorrhageNet(ModelConfig(base_width=8, input_size=64))
    checkpoint = make_checkpoint(
        net,
        thresholds=dict.fromkeys(CLASSES, threshold),
        version=f"test-threshold-{threshold}",
        training={"purpose": "ichnode analyze tests"},
        mask_threshold=0.5,
    )
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def positive_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_weights(tmp_path_factory.mktemp("weights") / "all-present.pt", 0.0)


@pytest.fixture(scope="module")
def negative_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_weights(tmp_path_factory.mktemp("weights") / "all-absent.pt", 1.5)


def _assert_analysed(entry: dict[str, Any], n_slices: int) -> None:
    assert set(entry) == SERIES_KEYS
    assert entry["skipped"] is None
    assert set(entry["hemorrhage"]) == {"present", "probability"}
    assert set(entry["subtypes"]) == set(SUBTYPES)
    for sub in entry["subtypes"].values():
        assert set(sub) == {"present", "probability", "volume_ml"}
        assert 0.0 <= sub["probability"] <= 1.0
        assert sub["volume_ml"] >= 0.0
    assert len(entry["slices"]) == n_slices
    for item in entry["slices"]:
        assert set(item) == {"sop_instance_uid", "probabilities"}
        assert set(item["probabilities"]) == set(CLASSES)


def test_missing_path_is_a_one_line_error(tmp_path: Path) -> None:
    done = run_analyze(str(tmp_path / "nowhere"), "--json")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"ichnode analyze: no such file or folder: {tmp_path / 'nowhere'}"
    ]


@needs_loader
@pytest.mark.interop
def test_mixed_inputs_give_one_document_skip_reasons_and_valid_objects(
    tmp_path: Path,
    positive_weights: Path,
    dciodvfy: Callable[[Path], list[str]],
) -> None:
    ct = make_ct_series(6, 64)
    write_series(ct, tmp_path / "in" / "ct")
    mr = make_ct_series(3, 32, modality="MR")
    for ds in mr:
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    write_series(mr, tmp_path / "in" / "mr")
    localizer = make_ct_series(1, 32)
    localizer[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    write_series(localizer, tmp_path / "in" / "localizer")
    junk = tmp_path / "in" / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not DICOM\n")
    (junk / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    truncated_src = make_ct_series(2, 64)
    paths = write_series(truncated_src, tmp_path / "in" / "truncated")
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 2])
    # our own output from an earlier run: must be skipped, never analysed
    own = make_ct_series(3, 32)
    mask = np.zeros((3, 32, 32), dtype=bool)
    mask[1, 8:12, 8:12] = True
    own_paths = results.write_results(
        make_findings(own, {"subdural": mask}), own, tmp_path / "in" / "own"
    )
    own_series = {str(pydicom.dcmread(p).SeriesInstanceUID) for p in own_paths}
    assert len(own_series) == 3  # SEG, SR, key images

    out_dir = tmp_path / "out"
    done = run_analyze(
        str(tmp_path / "in"),
        "--json",
        "--out",
        str(out_dir),
        "--device",
        "cpu",
        "--weights",
        str(positive_weights),
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr
    document = parse_document(done.stdout)
    entries = {e["series_instance_uid"]: e for e in document["series"]}

    ct_entry = entries[str(ct[0].SeriesInstanceUID)]
    _assert_analysed(ct_entry, 6)
    assert ct_entry["study_instance_uid"] == str(ct[0].StudyInstanceUID)
    assert ct_entry["hemorrhage"]["present"] is True  # threshold 0: everything present
    assert ct_entry["outputs"], "positive series must produce objects"
    kinds = sorted(Path(p).name.split("-")[1] for p in ct_entry["outputs"])
    assert "SR" in kinds
    for output in ct_entry["outputs"]:
        assert Path(output).parent == out_dir
        assert dciodvfy(Path(output)) == []

    skipped_uids = [
        (str(mr[0].SeriesInstanceUID), "CT"),
        (str(localizer[0].SeriesInstanceUID), "locali"),
    ] + [(uid, "ichnode") for uid in sorted(own_series)]
    for series_instance_uid, word in skipped_uids:
        entry = entries[series_instance_uid]
        assert set(entry) == SKIPPED_KEYS
        assert entry["outputs"] == []
        assert word.lower() in entry["skipped"].lower()
    # the truncated series is either skipped with a reason or its file reported unreadable
    truncated_uid = str(truncated_src[0].SeriesInstanceUID)
    if truncated_uid in entries and entries[truncated_uid]["skipped"] is None:
        assert str(paths[1]) in done.stderr or paths[1].name in done.stderr
    elif truncated_uid in entries:
        assert entries[truncated_uid]["skipped"]
    assert "notes.txt" in done.stderr and "image.png" in done.stderr
    for line in done.stderr.splitlines():
        assert "Traceback" not in line


@needs_loader
def test_negative_series_exit_zero_and_report_only(tmp_path: Path, negative_weights: Path) -> None:
    ct = make_ct_series(4, 48)
    write_series(ct, tmp_path / "ct")
    done = run_analyze(
        str(tmp_path / "ct"),
        "--json",
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--weights",
        str(negative_weights),
    )
    assert done.returncode == 0, done.stderr
    (entry,) = parse_document(done.stdout)["series"]
    _assert_analysed(entry, 4)
    assert entry["hemorrhage"]["present"] is False
    assert not any(sub["present"] for sub in entry["subtypes"].values())
    assert [Path(p).name.split("-")[1] for p in entry["outputs"]] == ["SR"]


@needs_loader
@pytest.mark.parametrize("n_slices", [1, 2])
def test_single_slice_and_two_slices_are_analysed(
    tmp_path: Path, positive_weights: Path, n_slices: int
) -> None:
    ct = make_ct_series(n_slices, 64)
    files = write_series(ct, tmp_path / "ct")
    precision = "fp32" if n_slices == 2 else "auto"
    done = run_analyze(
        *map(str, files), "--json", "--device", "cpu", "--weights", str(positive_weights),
        "--precision", precision,
    )
    assert done.returncode == 0, done.stderr
    if precision == "fp32":  # the model says how it runs
        assert "on cpu, float32" in done.stderr, done.stderr
    (entry,) = parse_document(done.stdout)["series"]
    _assert_analysed(entry, n_slices)
    assert entry["outputs"] == []  # no --out: nothing written


@needs_loader
def test_unusable_weights_are_a_one_line_error(tmp_path: Path) -> None:
    write_series(make_ct_series(2, 32), tmp_path / "ct")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    done = run_analyze(str(tmp_path / "ct"), "--json", "--weights", str(bad))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("ichnode analyze: cannot load the model:")
    assert "Traceback" not in done.stderr


@needs_loader
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path: Path, negative_weights: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    write_series(make_ct_series(2, 32), tmp_path / "ct")
    done = run_analyze(
        str(tmp_path / "ct"), "--json", "--device", "cuda", "--weights", str(negative_weights)
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("ichnode analyze: cannot load")
    assert "CUDA" in done.stderr and "Traceback" not in done.stderr


@needs_loader
def test_folder_without_dicom_fails_with_reasons(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    (folder / "b.bin").write_bytes(b"\0" * 300)
    done = run_analyze(str(folder), "--json")
    assert done.returncode == 1
    assert parse_document(done.stdout) == {"series": []}
    assert "a.txt" in done.stderr and "b.bin" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------
# with the bundled (trained) weights
# ---------------------------------------------------------------------------

# One case per subtype and three negatives, from the reserved test seeds
# (inference.train.TEST_SEEDS, never used in training or validation, apart from
# those of tests/inference): for each, the next seed from 1000160 on whose bleed
# is at least 1 mL, the size the project's targets speak of. Every bleed must be
# found and every negative called negative (the model's specificity on the test
# seeds is 0.99, docs/MODEL_CARD.md; weights s20261127.3800 give the negatives
# p 0.36, 0.45 and 0.22 against a threshold of 0.86, the bleeds 0.99-1.0).
HELD_OUT_SUBTYPES: list[tuple[str, ...]] = [
    ("intraparenchymal",),
    ("intraventricular",),
    ("subdural",),
    ("epidural",),
    ("subarachnoid",),
    (),
    (),
    (),
]


@needs_loader
@needs_bundled_weights
@pytest.mark.slow
def test_bundled_weights_on_held_out_phantoms(tmp_path: Path, trained_bundled_weights: str) -> None:
    from inference.phantom import generate_case
    from inference.phantom import write_series as write_phantom

    expected: dict[Path, tuple[str, ...]] = {}
    seed = 1000160
    for subtypes in HELD_OUT_SUBTYPES:
        while True:
            case = generate_case(seed, n_slices=24, matrix=256, subtypes=subtypes)
            seed += 1
            if all(ml >= 1.0 for ml in case.volumes_ml.values()):
                break
        folder = tmp_path / f"case-{case.seed}"
        write_phantom(case, folder)
        expected[folder] = subtypes
    done = run_analyze(*map(str, expected), "--json", "--device", "cpu", timeout=600)
    assert done.returncode == 0, done.stderr
    entries = parse_document(done.stdout)["series"]
    assert len(entries) == len(expected)
    by_series: dict[str, dict[str, Any]] = {e["series_instance_uid"]: e for e in entries}
    positive_p, negative_p = [], []
    for folder, subtypes in expected.items():
        first = pydicom.dcmread(next(p for p in sorted(folder.iterdir()) if p.is_file()))
        entry = by_series[str(first.SeriesInstanceUID)]
        found = {name for name, sub in entry["subtypes"].items() if sub["present"]}
        if subtypes:
            assert entry["hemorrhage"]["present"] is True, (folder.name, entry)
            assert set(subtypes) <= found, (folder.name, found)
            positive_p.append(entry["hemorrhage"]["probability"])
        else:
            # The bundled weights' threshold is set on real CT (sensitivity 0.90),
            # where phantom specificity is 0.69 (docs/MODEL_CARD.md): a negative
            # phantom may be called positive, but must score below every bleed.
            negative_p.append(entry["hemorrhage"]["probability"])
    assert negative_p and max(negative_p) < min(positive_p), (negative_p, positive_p)


@needs_loader
@needs_bundled_weights
@pytest.mark.slow
def test_bundled_weights_find_no_hemorrhage_in_the_real_series(
    tmp_path: Path, trained_bundled_weights: str
) -> None:
    require_real_data()
    done = run_analyze(
        str(REAL_5MM),
        str(REAL_TILT),
        "--json",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    entries = parse_document(done.stdout)["series"]
    assert len(entries) == 2
    for entry in entries:
        assert entry["skipped"] is None, entry["skipped"]
        assert entry["hemorrhage"]["present"] is False, entry["hemorrhage"]
        assert [Path(p).name.split("-")[1] for p in entry["outputs"]] == ["SR"]
