"""Package boundaries of DESIGN.md, checked on the source: who may import whom.

| package | may import |
| config/ | nothing of ours |
| storage/ | config |
| inference/ | config only; never node, storage or networking |
| node/ | all of the above |
| ui/ | config, storage, inference, node.results, and node.analysis: the one
|       analysis path (read -> volume -> model -> result objects) that the worker,
|       ``ichnode analyze`` and the UI upload share; it imports no networking |
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("config", "storage", "inference", "node", "ui")
NETWORKING = ("pynetdicom", "requests", "dicomweb_client", "socket", "http", "urllib")

ALLOWED: dict[str, tuple[str, ...]] = {
    "config": ("config",),
    "storage": ("config", "storage"),
    "inference": ("config", "inference"),
    "node": OURS[:-1],
    "ui": ("config", "storage", "inference", "ui", "node.results", "node.analysis",
           "node.drawing"),
}


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module in ("node", "storage", "inference", "config", "ui"):
                # "from node import results" imports node.results
                found.extend((node.lineno, f"{module}.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, module))
    return found


def allowed(package: str, module: str) -> bool:
    top = module.split(".")[0]
    if top not in OURS:
        return True
    return any(module == rule or module.startswith(rule + ".") for rule in ALLOWED[package])


@pytest.mark.parametrize("package", OURS)
def test_packages_import_only_what_design_allows(package: str) -> None:
    offences = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if "migrations" in path.parts and package == "storage":
            continue  # Alembic scripts import the models only
        for line, module in imports(path):
            if not allowed(package, module):
                offences.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not offences, "\n".join(offences)


def test_inference_and_the_shared_analysis_path_use_no_networking() -> None:
    paths = sorted((ROOT / "inference").rglob("*.py")) + [ROOT / "node" / "analysis.py"]
    offences = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in paths
        for line, module in imports(path)
        if module.split(".")[0] in NETWORKING
    ]
    assert not offences, "\n".join(offences)


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The walker resolves plain, from- and package imports (so the tests above can fail)."""
    assert not allowed("inference", "node.results")
    assert not allowed("ui", "node.scp")
    assert allowed("ui", "node.results")
    assert not allowed("storage", "inference.volume")
    probe = tmp_path / "inference" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(
        "from node import scp\nimport storage.index\nfrom .volume import load_volume\n",
        encoding="utf-8",
    )
    found = [m for _, m in imports(probe, root=tmp_path)]
    assert found == ["node.scp", "storage.index", "inference.volume"]
