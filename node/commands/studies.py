"""``ichnode studies``: what the index holds, as a table or as the JSON document of DESIGN.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from config.settings import load_settings
from storage.index import Index, StudySummary


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_table(studies: list[StudySummary]) -> str:
    """Return a readable table: one block per study, one line per series."""
    if not studies:
        return "no studies in the index"
    lines: list[str] = []
    header = ("series", "modality", "description", "inst", "status", "hemorrhage", "deliveries")
    for study in studies:
        lines.append(
            f"study {study.study_instance_uid}  patient {study.patient_id or '-'}  "
            f"date {study.study_date or '-'}  {study.study_description}".rstrip()
        )
        rows = [header]
        for s in study.series:
            deliveries = ", ".join(f"{d}:{state}" for d, state in s.deliveries.items()) or "-"
            status = s.status + (f" ({s.reason})" if s.reason else "")
            rows.append(
                (
                    s.series_instance_uid,
                    s.modality or "-",
                    s.series_description or "-",
                    str(s.instances),
                    status,
                    _cell(s.hemorrhage),
                    deliveries,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            lines.append(
                "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def run(args: argparse.Namespace) -> int:
    """Print the studies of the index; exit 0, or 2 with a one-line message."""
    settings = load_settings(getattr(args, "config", None))
    url = settings.storage.effective_database_url
    sqlite_file = make_url(url).database if url.startswith("sqlite") else None
    if sqlite_file and sqlite_file != ":memory:" and not Path(sqlite_file).exists():
        print(
            f"ichnode studies: no index at {sqlite_file} (nothing received yet?)", file=sys.stderr
        )
        if getattr(args, "json", False):
            print(json.dumps({"studies": []}))
        return 0
    index = Index(url)
    try:
        if index.current_revision() is None:
            studies: list[StudySummary] = []
        else:
            studies = index.list_studies()
    except SQLAlchemyError as exc:
        print(f"ichnode studies: cannot read the index ({exc.__class__.__name__})", file=sys.stderr)
        return 2
    finally:
        index.dispose()
    if getattr(args, "json", False):
        json.dump({"studies": [s.to_json() for s in studies]}, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(studies))
    return 0
