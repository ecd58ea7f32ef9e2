"""Hostile content in a real browser: Markdown in DICOM text and URL parameters, zip bombs.

``ichnode ui`` runs as a subprocess and headless Chromium drives it, as in
test_browser.py. A local HTTP server counts the requests that Markdown images
injected into a Series Description, a ``?series=`` parameter and an upload's file
name would make the browser send: there must be none, and the text must show
literally. A zip bomb must be refused with a clear message, and a small upload
of another user must be answered while a large one is still being staged and read.
Skips when Chromium or Playwright is missing, and fails then under
``ICHNODE_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from config import load_settings
from storage.archive import Archive
from storage.index import Index
from tests.interop import free_port, missing
from tests.ui.conftest import make_series, serve, store, write_config
from tests.ui.test_browser import CHROMIUM_ARGS, TIMEOUT_MS, _assert_no_streamlit_error, _chromium

pytestmark = pytest.mark.interop


@contextlib.contextmanager
def counting_server() -> Iterator[tuple[int, Counter[str]]]:
    """An HTTP server on a free loopback port that counts the paths asked of it."""
    hits: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[self.path] += 1
            self.send_response(404)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port, hits
    finally:
        server.shutdown()
        server.server_close()


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Python playwright is not installed (pip install -e '.[test]')")
    return sync_playwright


def _wait_text(page: Any, text: str) -> None:
    """Wait until the page shows ``text`` (invisible word joiners, U+2060, not counted)."""
    page.wait_for_function(
        "text => document.body.innerText.replaceAll('\\u2060', '').includes(text)", arg=text
    )


def test_dicom_text_and_url_parameters_show_literally(tmp_path: Path) -> None:
    chromium = _chromium()
    sync_playwright = _playwright()
    with counting_server() as (port, hits):
        lure = f"http://127.0.0.1:{port}"
        description = f"![x]({lure}/sd.png) **b**"
        query = f"![q]({lure}/query.png) www.evil.example me@evil.example"
        file_name = f"![f]({lure}/name.png).dcm"
        config = write_config(tmp_path)
        settings = load_settings(config)
        archive = Archive(settings.storage.root)
        index = Index(settings.storage.effective_database_url, sqlite_synchronous="NORMAL")
        index.upgrade()
        hostile = make_series(
            tmp_path / "src",
            71,
            (),
            patient_id="HOSTILE",
            series_description=description,
            overrides={"StudyDescription": f"![s]({lure}/study.png)"},
        )
        store(archive, index, hostile.paths)
        scout = make_series(
            tmp_path / "scout",
            72,
            (),
            series_description=f"![u]({lure}/upload.png)",
            overrides={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
        )
        try:
            with serve(config) as url, sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1500, "height": 1000})
                    page.set_default_timeout(TIMEOUT_MS)
                    # the worklist lists the series by its description
                    page.goto(url, wait_until="domcontentloaded")
                    page.get_by_text("1 of 1 series", exact=False).wait_for()
                    choice = page.get_by_role("combobox", name="Series")
                    assert description in choice.input_value()
                    choice.click()  # the open list renders each option
                    option = page.get_by_role("option").first
                    option.wait_for()
                    assert description in option.inner_text().replace("\u2060", "")
                    page.keyboard.press("Escape")
                    # the viewer's title is the description, shown as it is written
                    page.goto(
                        f"{url}/?series={hostile.series_instance_uid}",
                        wait_until="domcontentloaded",
                    )
                    page.get_by_role("heading", name="Viewer").wait_for()
                    _wait_text(page, description)
                    _assert_no_streamlit_error(page)
                    # a ?series= parameter naming no series is quoted in a warning, as text
                    page.goto(f"{url}/?series={quote(query)}", wait_until="domcontentloaded")
                    _wait_text(page, f"The index holds no instances of series {query}.")
                    # uploads: a file name in the message, a series description in a warning
                    page.locator('[data-testid="stSidebar"]').get_by_text("Upload").click()
                    page.get_by_role("heading", name="Upload", exact=True).wait_for()
                    uploader = page.locator('[data-testid="stFileUploaderDropzoneInput"]')
                    uploader.set_input_files(
                        [{"name": file_name, "mimeType": "application/dicom", "buffer": b""}]
                    )
                    _wait_text(page, f"{file_name}: empty file")
                    uploader.set_input_files(scout.paths[:3])
                    _wait_text(page, f"![u]({lure}/upload.png)")
                    _wait_text(page, "not analysed: localizer")
                    _assert_no_streamlit_error(page)
                    page.wait_for_timeout(1000)  # time for any image request to arrive
                    assert page.locator(f'img[src^="{lure}"]').count() == 0
                    links = page.locator(f'a[href^="{lure}"], a[href*="evil"], a[href^="mailto"]')
                    assert links.count() == 0, links.evaluate_all("e => e.map(a => a.outerHTML)")
                finally:
                    browser.close()
        finally:
            index.dispose()
        assert sum(hits.values()) == 0, dict(hits)


# -- uploads: a zip bomb, and another user's upload while a large one is read -----


def _tiny_mr() -> bytes:
    """An 8 x 8 MR image (not analysed by the model: read, then skipped)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.SeriesDescription = "many small files"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _many_files(path: Path, count: int) -> Path:
    one = _tiny_mr()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for k in range(count):
            archive.writestr(f"series/{k:06d}.dcm", one)
    return path


def _bomb(path: Path, members: int, member_mb: int) -> Path:
    zeros = bytes(1024**2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for k in range(members):
            with archive.open(f"bomb/{k:03d}.dcm", "w", force_zip64=True) as member:
                for _ in range(member_mb):
                    member.write(zeros)
    return path


def _upload_page(browser: Any, url: str) -> Any:
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading", name="Worklist").wait_for()
    page.locator('[data-testid="stSidebar"]').get_by_text("Upload").click()
    page.get_by_role("heading", name="Upload", exact=True).wait_for()
    return page


VERDICT = re.compile("hemorrhage found", re.IGNORECASE)


def test_zip_bomb_refused_and_other_uploads_answered_meanwhile(tmp_path: Path) -> None:
    chromium = _chromium()
    sync_playwright = _playwright()
    config = write_config(
        tmp_path,
        extra="[ui]\nupload_max_expanded_mb = 64\nupload_max_files = 100000\n",
    )
    small = make_series(tmp_path / "small", 81, ("subdural",), patient_id="SMALL")
    other = make_series(tmp_path / "other", 82, (), patient_id="OTHER")
    large = _many_files(tmp_path / "large.zip", 30_000)  # ~12 MB, 30,000 files to read
    bomb = _bomb(tmp_path / "bomb.zip", 4, 32)  # 128 MB of zeros in a few hundred kB
    assert bomb.stat().st_size < 1024**2
    with serve(config) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            a = _upload_page(browser, url)
            b = _upload_page(browser, url)
            c = _upload_page(browser, url)
            dropzone = '[data-testid="stFileUploaderDropzoneInput"]'

            # user B analyses one slice (this also loads the model)
            b.locator(dropzone).set_input_files(small.paths[4])
            b.locator('[data-testid="stAlert"]').filter(has_text=VERDICT).first.wait_for(
                timeout=180_000
            )

            # user A drops 30,000 files; while they are staged and read, C drops one slice
            a.locator(dropzone).set_input_files(large)
            a.get_by_text("Analysing…").wait_for(timeout=60_000)
            started = time.monotonic()
            c.locator(dropzone).set_input_files(other.paths[4])
            c.locator('[data-testid="stAlert"]').filter(has_text=VERDICT).first.wait_for(
                timeout=180_000
            )
            answered_s = time.monotonic() - started
            a_busy = a.get_by_text("Analysing…").count() > 0
            a_done = a.locator('[data-testid="stAlert"]').count()
            assert a_busy and a_done == 0, (
                f"C was answered after {answered_s:.1f} s, but only once A had finished"
            )
            _assert_no_streamlit_error(c)

            # A's large upload ends in an answer too, not a hang
            a.locator('[data-testid="stAlert"]').first.wait_for(timeout=300_000)
            a_s = time.monotonic() - started
            print(f"one slice answered after {answered_s:.1f} s; 30,000 files after {a_s:.1f} s")
            _assert_no_streamlit_error(a)

            # the zip bomb is refused at once, from the sizes its directory declares
            started = time.monotonic()
            b.reload()
            b.locator('[data-testid="stSidebar"]').get_by_text("Upload").click()
            b.locator(dropzone).set_input_files(bomb)
            refusal = b.locator('[data-testid="stAlert"]').filter(has_text="Upload refused")
            refusal.wait_for(timeout=60_000)
            print(f"zip bomb refused after {time.monotonic() - started:.1f} s")
            text = refusal.inner_text()
            assert "zip bomb.zip expands the upload to 128 MB, more than 64 MB" in text, text
            assert "ui.upload_max_expanded_mb" in text, text
            _assert_no_streamlit_error(b)
        finally:
            browser.close()
