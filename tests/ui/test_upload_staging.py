"""Staging of uploaded files: zips expanded inside the folder, nothing escapes it."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from ui.upload import stage


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
