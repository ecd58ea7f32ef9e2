"""Routing rules: which received series ichnode analyses.

A series that does not match is kept in the archive and the index with status
``skipped`` and the reason returned here (shown by ``ichnode studies``). The
rules come from the ``[routing]`` section of the configuration; our own SEG,
SR and SC objects are never analysed, whatever the rules say.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from pydicom import Dataset

from config.settings import RoutingSettings

logger = logging.getLogger(__name__)


def _own_output_check() -> Callable[[Dataset], bool]:
    from node.results import is_ichnode_output

    return is_ichnode_output


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value)


def _image_types(ds: Dataset) -> list[str]:
    value = ds.get("ImageType", None)
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip().upper() for v in value.split("\\")]
    return [str(v).strip().upper() for v in value]


def _check_patterns(label: str, value: str, include: list[str], exclude: list[str]) -> str | None:
    if include and not any(re.search(p, value, re.IGNORECASE) for p in include):
        return f"{label} {value!r} matches no include pattern"
    for pattern in exclude:
        if re.search(pattern, value, re.IGNORECASE):
            return f"{label} {value!r} matches exclude pattern {pattern!r}"
    return None


def skip_reason(ds: Dataset, n_instances: int, rules: RoutingSettings) -> str | None:
    """Return why the series of ``ds`` is not analysed, or None when it is.

    Parameters
    ----------
    ds : pydicom.Dataset
        A header of the series (one of its instances; pixel data not needed).
    n_instances : int
        How many instances of the series the index holds.
    rules : config.settings.RoutingSettings
        The ``[routing]`` section.
    """
    if _own_output_check()(ds):
        return "ichnode result object (never analysed)"
    modality = _text(ds, "Modality").upper()
    allowed = [m.upper() for m in rules.modalities]
    if allowed and modality not in allowed:
        return f"modality {modality or '(none)'} not in routing.modalities {allowed}"
    excluded = {t.upper() for t in rules.exclude_image_types}
    hit = sorted(excluded.intersection(_image_types(ds)))
    if hit:
        return f"image type {hit[0]} is excluded by routing.exclude_image_types"
    if n_instances < rules.min_slices:
        return f"{n_instances} instance(s), routing.min_slices is {rules.min_slices}"
    for label, keyword, include, exclude in (
        ("body part", "BodyPartExamined", rules.body_part_include, rules.body_part_exclude),
        (
            "study description",
            "StudyDescription",
            rules.study_description_include,
            rules.study_description_exclude,
        ),
        (
            "series description",
            "SeriesDescription",
            rules.series_description_include,
            rules.series_description_exclude,
        ),
    ):
        reason = _check_patterns(label, _text(ds, keyword), include, exclude)
        if reason:
            return reason
    return None
