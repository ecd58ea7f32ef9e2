"""The DICOM byte walker: checks a received dataset's encoding without pydicom.

pydicom reads a truncated value as a shorter one and an element header that
lies about its length as whatever bytes follow; the receiver must refuse such
data instead of storing it. :func:`check_encoding` walks every element, item
and fragment of the raw bytes in their transfer syntax (implicit or explicit
VR, either byte order, deflated data inflated up to a bound) and raises
:class:`MalformedDatasetError` at the first one that does not fit, or
:class:`OversizeDatasetError` when deflated data inflates past the bound. The
:class:`Walk` it returns holds what the receiver needs next: where the header
ends (the first top-level element at or after Pixel Data), the length of
native Pixel Data, whether there is pixel data and whether the dataset carries
File Meta Information. :func:`read_header` decodes those header bytes with
pydicom, :func:`expected_pixel_bytes` says how many bytes of native Pixel Data
the Image Pixel attributes call for.

This module knows nothing of the network or of pynetdicom: bytes in, facts or
an exception out.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID


class MalformedDatasetError(ValueError):
    """The received bytes are not a well-formed dataset in the context's transfer syntax."""


class OversizeDatasetError(ValueError):
    """The dataset is larger than the node accepts (``node.max_instance_mb``)."""


_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, _PIXEL_DATA})
# Explicit VRs with a reserved 2 bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
# Every VR of PS3.5 6.2.
_VRS = _LONG_VRS | frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split()
)
_MAX_DEPTH = 32


@dataclass
class Walk:
    """Position-independent facts gathered while checking the structure."""

    pixel_data_length: int | None = None
    #: Offset of the first top-level element at or after (7FE0,0010): the
    #: header that :func:`read_header` decodes ends there.
    header_end: int | None = None
    has_pixels: bool = False  # Pixel Data, Float or Double Float Pixel Data
    has_file_meta: bool = False


def _walk_elements(
    buf: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    endian: str,
    depth: int,
    walk: Walk,
    *,
    in_item: bool = False,
) -> int:
    """Check the elements in ``buf[pos:end]``; return where they end.

    With ``in_item`` and an undefined-length item, the elements end at an Item
    Delimitation Item, which must be there.
    """
    if depth > _MAX_DEPTH:
        raise MalformedDatasetError(f"sequences nested deeper than {_MAX_DEPTH}")
    tag_fmt, len4, len2 = endian + "HH", endian + "L", endian + "H"
    while pos < end:
        if end - pos < 8:
            raise MalformedDatasetError(f"{end - pos} stray bytes at offset {pos}")
        group, element = struct.unpack_from(tag_fmt, buf, pos)
        tag = (group << 16) | element
        if tag == _ITEM_END and in_item:
            return pos + 8
        if group == 0xFFFE:
            raise MalformedDatasetError(f"unexpected delimiter ({group:04X},{element:04X})")
        if depth == 0:
            walk.has_file_meta |= group == 0x0002
            walk.has_pixels |= tag in _PIXEL_TAGS
            if walk.header_end is None and tag >= _PIXEL_DATA:
                walk.header_end = pos
        vr: bytes | None = None
        if implicit:
            (length,) = struct.unpack_from(len4, buf, pos + 4)
            pos += 8
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr not in _VRS:
                raise MalformedDatasetError(
                    f"({group:04X},{element:04X}) has no valid VR at offset {pos + 4}"
                )
            if vr in _LONG_VRS:
                if end - pos < 12:
                    raise MalformedDatasetError(f"truncated element header at offset {pos}")
                (length,) = struct.unpack_from(len4, buf, pos + 8)
                pos += 12
            else:
                (length,) = struct.unpack_from(len2, buf, pos + 6)
                pos += 8
        if length == _UNDEFINED:
            if vr == b"UN":
                # PS3.5 6.2.2: an undefined-length UN is an implicit VR LE sequence.
                pos = _walk_items(buf, pos, end, True, "<", depth + 1, walk, fragments=False)
            elif vr in (None, b"SQ"):
                pos = _walk_items(buf, pos, end, implicit, endian, depth + 1, walk, fragments=False)
            elif tag == _PIXEL_DATA and vr in (b"OB", b"OW"):
                pos = _walk_items(buf, pos, end, implicit, endian, depth + 1, walk, fragments=True)
            else:
                raise MalformedDatasetError(f"({group:04X},{element:04X}) has an undefined length")
            continue
        if length > end - pos:
            raise MalformedDatasetError(
                f"({group:04X},{element:04X}) declares {length} bytes, {end - pos} remain"
            )
        if vr == b"SQ":
            _walk_items(
                buf,
                pos,
                pos + length,
                implicit,
                endian,
                depth + 1,
                walk,
                fragments=False,
                defined=True,
            )
        if tag == _PIXEL_DATA and depth == 0:
            walk.pixel_data_length = length
        pos += length
    if in_item:
        raise MalformedDatasetError("item without its delimitation item")
    return pos


def _walk_items(
    buf: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    endian: str,
    depth: int,
    walk: Walk,
    *,
    fragments: bool,
    defined: bool = False,
) -> int:
    """Check the items of a sequence (or encapsulated fragments); return where they end.

    A defined-length sequence (``defined``) ends at ``end``, also when it is the
    last element of the dataset; an undefined-length one at its Sequence
    Delimitation Item, which must be there.
    """
    while True:
        if defined and pos == end:
            return pos
        if end - pos < 8:
            raise MalformedDatasetError("sequence runs past the end of the data")
        group, element = struct.unpack_from(endian + "HH", buf, pos)
        (length,) = struct.unpack_from(endian + "L", buf, pos + 4)
        tag = (group << 16) | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise MalformedDatasetError(f"({group:04X},{element:04X}) where an item should be")
        if length == _UNDEFINED:
            if fragments:
                raise MalformedDatasetError("a pixel data fragment has an undefined length")
            pos = _walk_elements(buf, pos, end, implicit, endian, depth, walk, in_item=True)
            continue
        if length > end - pos:
            raise MalformedDatasetError(f"an item declares {length} bytes, {end - pos} remain")
        if not fragments:
            _walk_elements(buf, pos, pos + length, implicit, endian, depth, walk)
        pos += length


def check_encoding(
    raw: bytes | memoryview, transfer_syntax: str, *, max_inflated: int = 1 << 31
) -> Walk:
    """Check that ``raw`` is a well-formed dataset in ``transfer_syntax``.

    Every element, item and fragment must fit in the bytes that arrived; every
    explicit VR must be one of PS3.5 6.2. pydicom alone would read a
    truncated value as a shorter one. Deflated data is inflated up to
    ``max_inflated`` bytes, never further.

    Raises
    ------
    MalformedDatasetError
        Naming the first problem.
    OversizeDatasetError
        When deflated data inflates to more than ``max_inflated`` bytes.
    """
    uid = UID(transfer_syntax)
    if uid.is_deflated:
        try:
            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            raw = inflater.decompress(raw, max_inflated + 1)
        except zlib.error as exc:
            raise MalformedDatasetError(f"deflated data cannot be inflated: {exc}") from None
        if len(raw) > max_inflated:
            raise OversizeDatasetError(f"deflated data inflates to more than {max_inflated} bytes")
    # A memoryview is used as it is: a second view of it would be an export
    # that keeps the caller from releasing it.
    buf = raw if isinstance(raw, memoryview) else memoryview(raw)
    walk = Walk()
    endian = "<" if uid.is_little_endian else ">"
    # An undefined-length sequence at the top level may run to the last byte.
    _walk_elements(buf, 0, len(buf), uid.is_implicit_VR, endian, 0, walk)
    return walk


def expected_pixel_bytes(ds: Dataset) -> int:
    """Bytes of native Pixel Data the Image Pixel attributes call for."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        raise MalformedDatasetError(f"Pixel Data without usable image attributes ({exc})") from None
    if min(rows, columns, samples, bits, frames) < 1:
        raise MalformedDatasetError("Pixel Data with zero or negative image attributes")
    return (rows * columns * samples * frames * bits + 7) // 8


def _before_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) >= 0x7FE00010


def read_header(raw: memoryview, transfer_syntax: str, walk: Walk) -> Dataset:
    """Decode a dataset that is not deflated up to (not including) Pixel Data.

    Only the header bytes (``raw[:walk.header_end]``) are copied for pydicom.
    """
    uid = UID(transfer_syntax)
    end = len(raw) if walk.header_end is None else walk.header_end
    stream = BytesIO(raw[:end])
    return read_dataset(
        stream, uid.is_implicit_VR, uid.is_little_endian, stop_when=_before_pixel_data
    )
