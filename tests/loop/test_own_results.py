"""Our result objects must be accepted when a PACS routes them back to the node."""

from __future__ import annotations

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.scp import check_encoding


def _encode(ds: Dataset, implicit: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def test_defined_length_sequence_as_last_element_is_well_formed() -> None:
    # A TID 1500 SR from highdicom ends with a defined-length Content Sequence.
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = "no hemorrhage"
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3.4"
    ds.ContentSequence = Sequence([item])
    ds["ContentSequence"].is_undefined_length = False
    for syntax, implicit in ((ExplicitVRLittleEndian, False), (ImplicitVRLittleEndian, True)):
        raw = _encode(ds, implicit)
        assert raw.endswith((b"no hemorrhage ", b"no hemorrhage"))
        check_encoding(raw, syntax)  # raises MalformedDatasetError when refused
