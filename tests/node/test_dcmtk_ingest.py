"""Interop with DCMTK: echoscu, and storescu scanning folders of real scanner files
(names without ``.dcm``) as they are and compressed with dcmcjpeg, dcmcjpls,
dcmcrle and dcmcjp2k. Every instance must be indexed with the transfer syntax it
arrived in, and its dataset bytes kept as sent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from bench.common import dcmtk_env
from tests.interop import REAL_TILT, require_real_data, require_tool
from tests.storage.helpers import running_scp

pytestmark = pytest.mark.interop


def _dataset_part(path: Path) -> bytes:
    """The bytes after the File Meta Information group."""
    ds = dcmread(path, stop_before_pixels=True)
    data = path.read_bytes()
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return data[meta_end:]


def _storescu(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    storescu = require_tool("storescu", "dcmtk")
    return subprocess.run(
        [
            storescu,
            "-aet",
            "DCMTKSCU",
            "-aec",
            "ICHNODE",
            *args[:-1],
            "127.0.0.1",
            str(port),
            args[-1],
        ]
        if False
        else [storescu, "-aet", "DCMTKSCU", "-aec", "ICHNODE", "127.0.0.1", str(port), *args],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_echoscu(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu", "dcmtk")
    with running_scp(tmp_path) as r:
        out = subprocess.run(
            [echoscu, "-aet", "DCMTKSCU", "-aec", "ICHNODE", "127.0.0.1", str(r.port)],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        # echoscu to a wrong called AE title is rejected
        bad = subprocess.run(
            [echoscu, "-aet", "DCMTKSCU", "-aec", "NOTME", "127.0.0.1", str(r.port)],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert bad.returncode != 0
        assert "Called AE Title Not Recognized" in (bad.stdout + bad.stderr)


@pytest.mark.parametrize("scan", [["+sd"], ["+sd", "+r"]])
def test_storescu_real_series_uncompressed(tmp_path: Path, scan: list[str]) -> None:
    require_real_data()
    sources = sorted(p for p in REAL_TILT.iterdir() if p.is_file() and p.name.startswith("I"))
    folder = tmp_path / "in"
    nested = folder / "a" / "b"
    if "+r" in scan:
        # +r must find files in sub-folders too
        nested.mkdir(parents=True)
        for src in sources:
            shutil.copy(src, nested / src.name)
        target = folder
    else:
        target = REAL_TILT
    with running_scp(tmp_path / "node") as r:
        out = _storescu(r.port, *scan, str(target))
        assert out.returncode == 0, out.stderr[-2000:]
        assert r.index.count_instances() == len(sources) == 54
        for src in sources:
            sent = dcmread(src, stop_before_pixels=True)
            row = r.index.instance(sent.SOPInstanceUID)
            assert row is not None, src
            assert row["transfer_syntax_uid"] == sent.file_meta.TransferSyntaxUID
            assert row["calling_ae"] == "DCMTKSCU"
            assert _dataset_part(Path(row["path"])) == _dataset_part(src)


_COMPRESSORS = [
    # tool, arguments, expected transfer syntax, storescu option proposing it
    ("dcmcjpeg", ["+e1"], JPEGLosslessSV1, "-xs"),  # JPEG lossless, first-order prediction
    ("dcmcjpeg", ["+ee"], JPEGExtended12Bit, "-xx"),  # JPEG extended (lossy, 12 bit)
    ("dcmcjpls", ["+el"], JPEGLSLossless, "-xt"),
    ("dcmcjpls", ["+en"], JPEGLSNearLossless, "-xu"),
    ("dcmcrle", [], RLELossless, "-xr"),
    ("dcmcjp2k", [], JPEG2000Lossless, "-xv"),
]


@pytest.mark.parametrize(
    ("tool", "args", "transfer_syntax", "propose"),
    _COMPRESSORS,
    ids=[f"{t}{''.join(a)}" for t, a, _, _ in _COMPRESSORS],
)
def test_storescu_compressed_copies(
    tmp_path: Path, tool: str, args: list[str], transfer_syntax: str, propose: str
) -> None:
    require_real_data()
    if tool == "dcmcjp2k" and shutil.which(tool) is None:
        # Not part of the open-source DCMTK packages; JPEG 2000 reception is
        # covered by tests/node/test_scp.py with a pynetdicom SCU.
        pytest.skip("dcmcjp2k is not in this DCMTK build")
    exe = require_tool(tool, "dcmtk")
    sources = sorted(p for p in REAL_TILT.iterdir() if p.is_file() and p.name.startswith("I"))[:12]
    folder = tmp_path / "compressed"
    folder.mkdir()
    for src in sources:
        out = subprocess.run(
            [exe, *args, str(src), str(folder / src.name)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, f"{tool} failed: {out.stderr[-500:]}"
    compressed = sorted(folder.iterdir())
    assert all(
        dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == transfer_syntax
        for p in compressed
    )
    with running_scp(tmp_path / "node") as r:
        # storescu proposes the compressed syntax (and uncompressed ones): the
        # node must take the compressed one and keep the bytes as they were.
        out = _storescu(r.port, propose, "+sd", str(folder))
        assert out.returncode == 0, out.stderr[-2000:]
        assert r.index.count_instances() == len(compressed)
        for path in compressed:
            sop = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            row = r.index.instance(sop)
            assert row is not None
            assert row["transfer_syntax_uid"] == transfer_syntax
            stored = Path(row["path"])
            assert (
                dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID
                == transfer_syntax
            )
            assert _dataset_part(stored) == _dataset_part(path)
