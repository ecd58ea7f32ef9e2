"""Staging of uploaded files: zips expanded inside the folder, nothing escapes it."""

from __future__ import annotations

import io
import logging
import time
import zipfile
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian

from tests.ui.conftest import make_series
from ui.upload import MB, UploadLimits, UploadRefused, analyse_upload, stage


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("folder/", b"")
    return buffer.getvalue()


def test_zip_members_are_flattened_inside_the_folder(tmp_path: Path) -> None:
    payload = _zip(
        {
            "series/IM0001": b"first",
            "../../escape.dcm": b"second",
            "/abs/path/IM0003.dcm": b"third",
            "__MACOSX/series/._IM0001": b"fork",
        }
    )
    staged = stage([("study.zip", payload), ("single.dcm", b"alone")], tmp_path)
    assert len(staged.paths) == 4
    assert all(p.parent == tmp_path for p in staged.paths)
    assert sorted(p.read_bytes() for p in staged.paths) == [b"alone", b"first", b"second", b"third"]
    assert sorted(staged.names.values()) == [
        "single.dcm",
        "study.zip:../../escape.dcm",
        "study.zip:/abs/path/IM0003.dcm",
        "study.zip:series/IM0001",
    ]
    assert not (tmp_path.parent / "escape.dcm").exists()
    assert staged.problems == []


def test_empty_truncated_and_corrupt_zip(tmp_path: Path) -> None:
    good = _zip({"a": b"x" * 100})
    truncated = good[:-30]  # end of central directory cut off: not recognised as a zip
    corrupt = bytearray(good)
    offset = corrupt.index(b"x" * 100)
    corrupt[offset : offset + 10] = b"y" * 10  # member data no longer matches its CRC
    staged = stage(
        [("empty.dcm", b""), ("truncated.zip", truncated), ("corrupt.zip", bytes(corrupt))],
        tmp_path,
    )
    reasons = {p.name: p.reason for p in staged.problems}
    assert reasons["empty.dcm"] == "empty file"
    assert reasons["corrupt.zip"].startswith("unreadable zip")
    # the truncated one is staged as a plain file; the DICOM reader rejects it later
    assert list(staged.names.values()) == ["truncated.zip"]


# -- limits: expanded size, file count, reading time ----------------------------


def _bomb(members: int, member_bytes: int) -> bytes:
    """A zip of ``members`` members of zeros: a few kB on disk, ``members * member_bytes`` expanded."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for k in range(members):
            with archive.open(f"bomb/{k:03d}.dcm", "w", force_zip64=True) as member:
                zeros = bytes(1024**2)
                for _ in range(member_bytes // len(zeros)):
                    member.write(zeros)
    return buffer.getvalue()


def _staged_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def test_zip_bomb_is_refused_from_its_directory_before_anything_is_extracted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bomb = _bomb(4, 32 * MB)  # 128 MB of zeros
    assert len(bomb) < 1 * MB
    limits = UploadLimits(max_expanded_bytes=16 * MB)
    started = time.monotonic()
    with pytest.raises(UploadRefused) as refused, caplog.at_level(logging.WARNING, "ui.upload"):
        stage([("bomb.zip", bomb)], tmp_path, limits)
    assert time.monotonic() - started < 5
    message = str(refused.value)
    assert "zip bomb.zip expands the upload to 128 MB, more than 16 MB" in message
    assert "ui.upload_max_expanded_mb" in message
    assert list(tmp_path.iterdir()) == []  # refused from the sizes it declares
    assert any("upload refused" in r.getMessage() for r in caplog.records)


def test_expanded_size_counts_every_file_of_the_upload(tmp_path: Path) -> None:
    limits = UploadLimits(max_expanded_bytes=3 * MB)
    files = [(f"plain{k}.dcm", bytes(MB)) for k in range(3)] + [("zip.zip", _bomb(1, MB))]
    with pytest.raises(UploadRefused, match="zip zip.zip expands the upload to 4 MB"):
        stage(files, tmp_path, limits)
    with pytest.raises(UploadRefused, match="plain3.dcm expands the upload to 4 MB"):
        stage([*files[:3], ("plain3.dcm", bytes(MB))], tmp_path, limits)


def _lie_about_sizes(data: bytes) -> bytes:
    """The zip with every size in its central directory (and local headers) set to 1 byte."""
    import struct

    raw = bytearray(data)
    for signature, offsets in ((b"PK\x01\x02", (20, 24)), (b"PK\x03\x04", (18, 22))):
        start = 0
        while (at := raw.find(signature, start)) != -1:
            for offset in offsets:
                if struct.unpack_from("<I", raw, at + offset)[0] != 0xFFFFFFFF:
                    struct.pack_into("<I", raw, at + offset, 1)
            start = at + 4
    return bytes(raw)


def test_declared_sizes_are_not_trusted(tmp_path: Path) -> None:
    # a plain (not zip64) bomb whose directory claims 1 byte per member
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for k in range(4):
            archive.writestr(f"m{k}.dcm", bytes(8 * MB))
    lying = _lie_about_sizes(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(lying)) as archive:
        assert sum(m.file_size for m in archive.infolist()) == 4  # what it declares
    limits = UploadLimits(max_expanded_bytes=2 * MB)
    staged = None
    try:
        staged = stage([("liar.zip", lying)], tmp_path, limits)
    except UploadRefused:
        pass
    # refused or cut short: never more than the limit on disk, nothing used of the liar
    assert _staged_bytes(tmp_path) <= 2 * MB
    if staged is not None:
        assert staged.paths == []
        assert staged.problems and staged.problems[0].reason.startswith("unreadable zip")


def test_member_count_is_refused_from_the_directory(tmp_path: Path) -> None:
    payload = _zip({f"s/{k:03d}": b"x" for k in range(50)})
    limits = UploadLimits(max_files=20)
    with pytest.raises(UploadRefused, match=r"50 files, more than 20 \(ui.upload_max_files\)"):
        stage([("many.zip", payload)], tmp_path, limits)
    assert list(tmp_path.iterdir()) == []
    many_plain = [(f"f{k}", b"x") for k in range(21)]
    with pytest.raises(UploadRefused, match="21 files"):
        stage(many_plain, tmp_path, limits)


def test_reading_time_is_bounded_and_the_model_never_runs(tmp_path: Path) -> None:
    phantom = make_series(tmp_path / "src", 21, ())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for copy in range(60):  # 600 files: far more than 0.05 s of staging and reading
            for path in phantom.paths:
                archive.write(path, f"copy{copy}/{path.name}")

    class NoModel:
        def predict(self, volume: object, *, explain: bool = True) -> object:
            raise AssertionError("the model ran on an upload that was refused")

    limits = UploadLimits(max_read_seconds=0.05)
    (tmp_path / "stage").mkdir()
    started = time.monotonic()
    with pytest.raises(UploadRefused, match=r"longer than 0.05 s \(ui.upload_max_read_seconds\)"):
        analyse_upload(
            [("slow.zip", buffer.getvalue())], tmp_path / "stage", NoModel(), limits=limits
        )  # type: ignore[arg-type]
    assert time.monotonic() - started < 10


def test_deflated_dicom_is_counted_as_it_inflates(tmp_path: Path) -> None:
    # the reader inflates a Deflated Explicit VR Little Endian file whole, in memory
    phantom = make_series(tmp_path / "src", 22, (), transfer_syntax="deflated")
    ds = dcmread(phantom.paths[0])
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    ds.add_new((0x0011, 0x0010), "LO", "PADDING")
    ds.add_new((0x0011, 0x1000), "OB", bytes(64 * MB))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    small = buffer.getvalue()
    assert len(small) < 1 * MB

    class NoModel:
        def predict(self, volume: object, *, explain: bool = True) -> object:
            raise AssertionError("the model ran on an upload that was refused")

    (tmp_path / "stage").mkdir()
    limits = UploadLimits(max_expanded_bytes=16 * MB)
    with pytest.raises(
        UploadRefused, match=r"deflated inflated.dcm expands the upload beyond 16 MB"
    ):
        analyse_upload([("inflated.dcm", small)], tmp_path / "stage", NoModel(), limits=limits)  # type: ignore[arg-type]
