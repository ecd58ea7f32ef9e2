"""Fixtures of the end-to-end loop tests: phantom studies, a real Orthanc and a real node."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.interop import require_tool
from tests.orthanc import Orthanc

NODE_NAME = "ichnode"


@dataclass(frozen=True)
class Study:
    """A phantom study written to disk: its UIDs and files."""

    study_instance_uid: str
    series_instance_uid: str
    files: list[Path]
    subtypes: tuple[str, ...]


def make_study(out_dir: Path, seed: int, subtypes: tuple[str, ...], n_slices: int = 24) -> Study:
    """Generate and write one phantom CT series (256x256) as its own study."""
    from inference.phantom import generate_case, write_series

    case = generate_case(seed, n_slices=n_slices, matrix=256, subtypes=subtypes)
    files = write_series(case, out_dir, patient_id=f"LOOP-{seed}")
    ds = dcmread(files[0], stop_before_pixels=True)
    return Study(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), list(files), subtypes)


def upload(orthanc: Orthanc, paths: list[Path]) -> list[str]:
    """POST files to Orthanc's /instances; return the Orthanc instance IDs."""
    ids = []
    for path in paths:
        request = urllib.request.Request(
            orthanc.http_url + "/instances", data=path.read_bytes(), method="POST"
        )
        request.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(request, timeout=30) as resp:
            ids.append(str(json.loads(resp.read())["ID"]))
    return ids


def register_node(orthanc: Orthanc, ae_title: str, port: int) -> None:
    """Tell Orthanc where the node is (``/modalities/ichnode``)."""
    body = json.dumps({"AET": ae_title, "Host": "127.0.0.1", "Port": port}).encode()
    request = urllib.request.Request(
        f"{orthanc.http_url}/modalities/{NODE_NAME}", data=body, method="PUT"
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def send_to_node(orthanc: Orthanc, resources: list[str]) -> Any:
    """Orthanc sends studies/series/instances to the node (C-STORE SCU, synchronous)."""
    return orthanc.post(
        f"/modalities/{NODE_NAME}/store", {"Resources": resources, "Synchronous": True}
    )


def result_series(orthanc: Orthanc, study_instance_uid: str) -> dict[str, list[str]]:
    """Orthanc's instance IDs of our result series in a study, by kind (SEG, SR, SC)."""
    from node.results import OUR_SERIES_DESCRIPTIONS

    found: dict[str, list[str]] = {}
    for series in orthanc.study_series(study_instance_uid):
        tags = series["MainDicomTags"]
        if tags.get("SeriesDescription") not in OUR_SERIES_DESCRIPTIONS:
            continue
        modality = str(tags.get("Modality"))
        kind = modality if modality in ("SEG", "SR") else "SC"
        found.setdefault(kind, []).extend(series["Instances"])
    return found


def download(orthanc: Orthanc, instance_id: str, out: Path) -> Path:
    """Save one instance from Orthanc to ``out``."""
    with urllib.request.urlopen(
        f"{orthanc.http_url}/instances/{instance_id}/file", timeout=30
    ) as r:
        out.write_bytes(r.read())
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy reports for a file."""
    tool = require_tool("dciodvfy", "dicom3tools")
    run = subprocess.run(
        [tool, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Study]:
    """A study with an intraparenchymal bleed (one spare slice kept back) and a negative one.

    The bleed is 3.0 mL in the 24 slices sent first (seed 103): a clear case for
    a test of the loop. Seed 101, used before, drew 0.76 mL, under the 1 mL
    that the model's targets speak of.
    """
    root = tmp_path_factory.mktemp("phantoms")
    return {
        "bleed": make_study(root / "bleed", 103, ("intraparenchymal",), n_slices=25),
        "negative": make_study(root / "negative", 102, ()),
    }
