"""The web interface in a real browser: ``ichnode ui`` as a subprocess, headless Chromium.

Opens the worklist of a node index holding an analysed positive study, finds
the study, opens it in the viewer, and checks the finding and the overlay
colours in the rendered image. Fails on any Streamlit error on the page.
Screenshots go to ``docs/screenshots/`` when ``ICHNODE_UPDATE_SCREENSHOTS=1``
(else to the test's temporary folder). Skips when Chromium or Playwright is
missing, and fails then under ``ICHNODE_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import io
import os
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from config import load_settings
from storage.archive import Archive
from storage.index import Index
from tests.interop import REPO, missing, require_tool
from tests.ui.conftest import NodeData, make_series, serve, store, write_config
from ui.render import SUBTYPE_COLOURS

pytestmark = pytest.mark.interop

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "docs" / "screenshots"
TIMEOUT_MS = 60_000


def _chromium() -> str:
    path = Path("/usr/bin/chromium")
    if path.exists():
        return str(path)
    return require_tool("chromium")


@pytest.fixture
def ui_server(node_data: NodeData) -> Iterator[str]:
    """The interface over the node index with the analysed studies."""
    with serve(node_data.config_path) as url:
        yield url


def _screenshot_folder(tmp_path: Path) -> Path:
    if os.environ.get("ICHNODE_UPDATE_SCREENSHOTS", "") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        return SCREENSHOTS
    return tmp_path


def _save(png: bytes, path: Path, width: int = 1100) -> None:
    """Write a screenshot, scaled down and palette-quantised so the PNG stays small."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    if image.width > width:
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)


def _assert_no_streamlit_error(page: Any) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, page.inner_text("body")
    assert "Traceback" not in page.inner_text("body")


def _option_texts(page: Any, combobox: str, count: int, timeout_s: float = 60.0) -> list[str]:
    """The options of a select box once it lists ``count`` of them (or the last seen).

    When the worklist fragment re-runs with new choices, Streamlit replaces the
    select box, which closes a list that is open. Under load the caption of that
    re-run can show before the new box does, so a click may open the old list
    just before it goes. The texts are therefore read in one step while the list
    is open, and the box is opened again until it lists ``count`` options or
    ``timeout_s`` passes; the caller's assertions judge what was seen last.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    options = page.get_by_role("option")
    texts: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page.get_by_role("combobox", name=combobox).click()
        try:
            options.first.wait_for(timeout=5_000)
        except PlaywrightTimeout:
            pass
        seen = options.all_inner_texts()
        texts = seen or texts
        page.keyboard.press("Escape")
        if len(seen) >= count:
            break
        page.wait_for_timeout(500)
    return texts


def _colour_pixels(png: bytes, colour: tuple[int, int, int]) -> int:
    """Pixels whose chroma points the way of ``colour`` (robust to blending and scaling)."""
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    chroma = pixels - pixels.mean(axis=-1, keepdims=True)
    target = np.asarray(colour, dtype=float)
    target -= target.mean()
    strength = np.linalg.norm(chroma, axis=-1)
    cosine = (chroma @ target) / (strength * np.linalg.norm(target) + 1e-9)
    return int(((strength > 40) & (cosine > 0.95)).sum())


def test_worklist_to_viewer_in_chromium(
    ui_server: str, node_data: NodeData, tmp_path: Path
) -> None:
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Python playwright is not installed (pip install -e '.[test]')")
        return
    shots = _screenshot_folder(tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(ui_server, wait_until="domcontentloaded")

            # worklist: the positive study is the newest, listed first
            page.get_by_role("heading", name="Worklist").wait_for()
            page.locator('[data-testid="stDataFrame"]').wait_for()
            choice = page.get_by_role("combobox", name="Series")
            choice.wait_for()
            chosen = choice.input_value()
            assert chosen.startswith("ICH-POS · 2026-03-01 · Head 5mm"), chosen
            assert "hemorrhage: intraparenchymal" in chosen and "subdural" in chosen
            page.get_by_text("5 of 5 series · 1 with hemorrhage").wait_for()
            _assert_no_streamlit_error(page)
            _save(page.screenshot(full_page=False), shots / "worklist.png")

            # open it: the viewer shows the finding and the overlay
            page.get_by_role("button", name="Open in viewer").click()
            page.get_by_role("heading", name="Viewer").wait_for()
            alert = page.locator('[data-testid="stAlert"]').filter(has_text="Hemorrhage found")
            alert.wait_for()
            assert "subdural" in alert.inner_text() and "intraparenchymal" in alert.inner_text()
            image = page.locator('[data-testid="stImage"] img').first
            image.wait_for()
            page.get_by_text("overlay:", exact=False).first.wait_for()
            _assert_no_streamlit_error(page)
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
            )
            rendered = image.screenshot()
            (tmp_path / "rendered.png").write_bytes(rendered)
            coloured = {
                name: _colour_pixels(rendered, SUBTYPE_COLOURS[name])
                for name in ("subdural", "intraparenchymal")
            }
            caption = page.locator('[data-testid="stImageCaption"]').first.inner_text()
            on_slice = caption.split("overlay: ")[1].split(", ")
            for name in on_slice:
                assert coloured[name] > 20, (name, coloured, caption)
            assert _colour_pixels(rendered, SUBTYPE_COLOURS["epidural"]) == 0
            assert page.url.endswith(f"?series={node_data.positive.series_instance_uid}")
            page.get_by_role("heading", name="Viewer").scroll_into_view_if_needed()
            _save(page.screenshot(full_page=False), shots / "viewer.png")

            # the metadata panel of the same page
            page.get_by_text("Metadata").first.scroll_into_view_if_needed()
            page.get_by_role("tab", name="Summary").wait_for()
            _assert_no_streamlit_error(page)
        finally:
            browser.close()


def test_upload_with_gradcam_in_chromium(ui_server: str, tmp_path: Path) -> None:
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Python playwright is not installed (pip install -e '.[test]')")
        return
    phantom = make_series(tmp_path / "series", 51, ("intraparenchymal",), patient_id="UPLOAD")
    bundle = tmp_path / "head.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        for path in phantom.paths:
            archive.write(path, f"head/{path.name}")
    shots = _screenshot_folder(tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(ui_server, wait_until="domcontentloaded")
            page.get_by_role("heading", name="Worklist").wait_for()
            page.locator('[data-testid="stSidebar"]').get_by_text("Upload").click()
            page.get_by_role("heading", name="Upload", exact=True).wait_for()
            page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(bundle)
            verdict = page.locator('[data-testid="stAlert"]').filter(
                has_text=re.compile("hemorrhage found", re.IGNORECASE)
            )
            verdict.first.wait_for(timeout=180_000)
            _assert_no_streamlit_error(page)
            page.locator('[data-testid="stPlotlyChart"]').first.wait_for()
            page.locator('[data-testid="stCheckbox"]').filter(has_text="Grad-CAM").click()
            page.get_by_text("· Grad-CAM", exact=False).first.wait_for()
            _assert_no_streamlit_error(page)
            rendered = page.locator('[data-testid="stImage"] img').first.screenshot()
            warm = _colour_pixels(rendered, (255, 128, 0)) + _colour_pixels(rendered, (255, 0, 0))
            assert warm > 0, "no Grad-CAM colour in the rendered slice"
            verdict.first.evaluate("element => element.scrollIntoView({block: 'start'})")
            _save(page.screenshot(full_page=False), shots / "upload.png")
        finally:
            browser.close()


def test_worklist_refreshes_itself(tmp_path: Path) -> None:
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Python playwright is not installed (pip install -e '.[test]')")
        return
    config = write_config(tmp_path)
    settings = load_settings(config)
    archive = Archive(settings.storage.root)
    index = Index(settings.storage.effective_database_url, sqlite_synchronous="NORMAL")
    index.upgrade()
    first = make_series(tmp_path / "a", 61, (), patient_id="FIRST", study_date="20260101")
    later = make_series(tmp_path / "b", 62, (), patient_id="LATER", study_date="20260102")
    store(archive, index, first.paths[:2])
    try:
        with serve(config) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(url, wait_until="domcontentloaded")
                page.get_by_text("1 of 1 series", exact=False).wait_for()
                store(archive, index, later.paths[:3])  # the node receives a new series
                # no reload: the worklist fragment picks it up on its own
                page.get_by_text("2 of 2 series", exact=False).wait_for(timeout=30_000)
                # the selection is kept; the new series is among the choices, listed first
                texts = _option_texts(page, "Series", count=2)
                assert len(texts) == 2, texts
                assert texts[0].startswith("LATER · 2026-01-02"), texts
                assert texts[1].startswith("FIRST · 2026-01-01"), texts
                chosen = page.get_by_role("combobox", name="Series").input_value()
                assert chosen.startswith("FIRST · 2026-01-01"), chosen
                _assert_no_streamlit_error(page)
            finally:
                browser.close()
    finally:
        index.dispose()
