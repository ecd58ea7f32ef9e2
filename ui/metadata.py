"""DICOM metadata for the UI: the summary the paper lists and the searchable full header.

Pure functions on pydicom datasets. Pixel data and other bulk binary values are
never rendered, only their size.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.datadict import dictionary_description, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

logger = logging.getLogger(__name__)

#: Elements whose values are never rendered (pixel data and friends), only their size.
BULK_TAGS = frozenset(
    Tag(t)
    for t in (
        0x7FE00010,  # PixelData
        0x7FE00008,  # FloatPixelData
        0x7FE00009,  # DoubleFloatPixelData
        0x00660023,  # TrianglePointIndexList
        0x00282000,  # ICCProfile
        0x00880200,  # IconImageSequence (rendered as a sequence but its pixels are skipped)
    )
)
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
MAX_VALUE_CHARS = 240


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return " \\ ".join(str(v) for v in value)
    return str(value).strip()


def _date(value: str) -> str:
    value = value.strip()
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def _time(value: str) -> str:
    value = value.strip()
    digits = value.split(".")[0]
    if len(digits) >= 4 and digits.isdigit():
        seconds = f":{digits[4:6]}" if len(digits) >= 6 else ""
        return f"{digits[:2]}:{digits[2:4]}{seconds}"
    return value


def patient_age(ds: Dataset) -> str:
    """Patient Age as written (``045Y`` -> ``45 years``), else computed from the birth and study dates."""
    age = _text(ds, "PatientAge")
    units = {"Y": "years", "M": "months", "W": "weeks", "D": "days"}
    if len(age) == 4 and age[:3].isdigit() and age[3] in units:
        return f"{int(age[:3])} {units[age[3]]}"
    if age:
        return age
    birth = _text(ds, "PatientBirthDate")
    on = _text(ds, "StudyDate") or _text(ds, "AcquisitionDate") or _text(ds, "SeriesDate")
    try:
        born = dt.datetime.strptime(birth, "%Y%m%d").date()
        seen = dt.datetime.strptime(on, "%Y%m%d").date()
    except ValueError:
        return ""
    years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    return f"{years} years" if years >= 0 else ""


def _scan_type(ds: Dataset) -> str:
    # Classic CT: Scan Options (0018,0022); enhanced CT: Acquisition Type (0018,9302).
    return _text(ds, "ScanOptions") or _text(ds, "AcquisitionType")


def _image_size(ds: Dataset) -> str:
    rows, columns = ds.get("Rows"), ds.get("Columns")
    return f"{columns} × {rows}" if rows and columns else ""


def _pixel_spacing(ds: Dataset) -> str:
    spacing = ds.get("PixelSpacing")
    if not spacing or len(spacing) != 2:
        return ""
    return f"{float(spacing[0]):.3g} × {float(spacing[1]):.3g} mm"


def _thickness(ds: Dataset) -> str:
    value = ds.get("SliceThickness")
    if value in (None, ""):
        return ""
    return f"{float(value):.3g} mm"


def _acquisition(ds: Dataset) -> str:
    date = _date(_text(ds, "AcquisitionDate") or _text(ds, "SeriesDate") or _text(ds, "StudyDate"))
    time = _time(_text(ds, "AcquisitionTime") or _text(ds, "SeriesTime") or _text(ds, "StudyTime"))
    return f"{date} {time}".strip()


_SUMMARY: tuple[tuple[str, Callable[[Dataset], str]], ...] = (
    ("Patient name", lambda ds: _text(ds, "PatientName").replace("^", " ").strip()),
    ("Patient ID", lambda ds: _text(ds, "PatientID")),
    ("Sex", lambda ds: _text(ds, "PatientSex")),
    ("Age", patient_age),
    ("Study description", lambda ds: _text(ds, "StudyDescription")),
    ("Series description", lambda ds: _text(ds, "SeriesDescription")),
    ("Modality", lambda ds: _text(ds, "Modality")),
    ("Manufacturer", lambda ds: _text(ds, "Manufacturer")),
    ("Model", lambda ds: _text(ds, "ManufacturerModelName")),
    ("Scan type", _scan_type),
    ("Acquisition", _acquisition),
    ("Image size", _image_size),
    ("Pixel spacing", _pixel_spacing),
    ("Slice thickness", _thickness),
    ("Kernel", lambda ds: _text(ds, "ConvolutionKernel")),
)

SUMMARY_FIELDS: tuple[str, ...] = tuple(label for label, _ in _SUMMARY)


def summary(ds: Dataset) -> list[tuple[str, str]]:
    """The metadata the paper shows, as (label, value) pairs; missing values are ``""``."""
    rows = []
    for label, getter in _SUMMARY:
        try:
            value = getter(ds)
        except (ValueError, TypeError) as exc:  # malformed value in the header
            logger.debug("cannot read %s: %s", label, exc)
            value = "(unreadable)"
        rows.append((label, value))
    return rows


@dataclass(frozen=True)
class HeaderRow:
    """One element of the header, flattened; ``depth`` counts enclosing sequences."""

    tag: str
    keyword: str
    name: str
    vr: str
    value: str
    depth: int

    def matches(self, query: str) -> bool:
        """Case-insensitive substring match on tag, keyword, name and value."""
        q = query.strip().lower()
        if not q:
            return True
        haystack = f"{self.tag} {self.keyword} {self.name} {self.value}".lower()
        return q in haystack or q.replace(",", "").replace("(", "").replace(")", "") in haystack


def _render_value(elem: DataElement) -> str:
    if elem.tag in BULK_TAGS or elem.VR in BINARY_VRS:
        length = len(elem.value) if isinstance(elem.value, bytes | bytearray) else 0
        return f"<binary, {length} bytes>"
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    elif isinstance(value, bytes | bytearray):
        text = f"<binary, {len(value)} bytes>"
    else:
        text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "…"
    return text


def _deferred_row(ds: Dataset, tag: BaseTag, depth: int) -> HeaderRow | None:
    """A row for an element whose value was not read (deferred), without reading it."""
    raw = ds.get_item(tag, keep_deferred=True)
    if not isinstance(raw, RawDataElement) or raw.value is not None:
        return None
    try:
        keyword, name, vr = keyword_for_tag(tag), dictionary_description(tag), dictionary_VR(tag)
    except KeyError:
        keyword, name, vr = "", "Unknown element", str(raw.VR or "UN")
    return HeaderRow(
        f"({tag.group:04X},{tag.element:04X})",
        keyword,
        name,
        str(raw.VR or vr),
        f"<binary, {raw.length} bytes>",
        depth,
    )


def _walk(ds: Dataset, depth: int) -> Iterator[HeaderRow]:
    for tag in list(ds.keys()):
        deferred = _deferred_row(ds, tag, depth)
        if deferred is not None:  # never read a deferred value (pixel data) just to list it
            yield deferred
            continue
        elem = ds[tag]
        tag_text = f"({elem.tag.group:04X},{elem.tag.element:04X})"
        keyword = elem.keyword or ""
        name = elem.name
        if elem.VR == "SQ":
            items = elem.value or []
            yield HeaderRow(tag_text, keyword, name, "SQ", f"{len(items)} item(s)", depth)
            if elem.tag in BULK_TAGS:
                continue
            for index, item in enumerate(items, start=1):
                yield HeaderRow("", "", f"Item {index}", "", "", depth + 1)
                yield from _walk(item, depth + 2)
            continue
        yield HeaderRow(tag_text, keyword, name, str(elem.VR), _render_value(elem), depth)


def header_rows(ds: Dataset, query: str = "", include_meta: bool = True) -> list[HeaderRow]:
    """The full header, flattened, optionally filtered by ``query`` (pixel data never shown).

    Parameters
    ----------
    ds : pydicom.Dataset
        The dataset (its ``file_meta`` is listed first when ``include_meta``).
    query : str
        Case-insensitive text to find in tag, keyword, name or value; empty keeps all.
    include_meta : bool
        List the File Meta Information group too.
    """
    rows: list[HeaderRow] = []
    meta = getattr(ds, "file_meta", None)
    if include_meta and meta is not None:
        rows.extend(_walk(meta, 0))
    rows.extend(_walk(ds, 0))
    return [row for row in rows if row.matches(query)]


def header_table(rows: list[HeaderRow]) -> list[dict[str, str]]:
    """Rows as plain dicts for ``st.dataframe``, nesting shown by indentation."""
    return [
        {
            "tag": row.tag,
            "keyword": ("  " * row.depth) + (row.keyword or row.name),
            "VR": row.vr,
            "value": row.value,
        }
        for row in rows
    ]
