"""Key images burned into SC objects and the viewer use one window table and one
colour table: the same slice shows the same grey levels and the same finding the
same colour in the PACS and in the UI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from inference import windows
from inference.findings import SUBTYPES
from node import results
from tests.node.conftest import hu_volume, make_ct_series, make_findings
from ui import figures, render


def test_windows_come_from_one_table() -> None:
    assert render.WINDOW_PRESETS == windows.WINDOW_PRESETS
    assert results.drawing.BRAIN_WINDOW == windows.WINDOW_PRESETS["brain"]
    # the network's input channels are the same windows, brain first
    assert windows.WINDOWS == tuple(windows.WINDOW_PRESETS.values())
    assert windows.WINDOWS[0] == windows.BRAIN_WINDOW


def test_subtype_colours_come_from_one_table() -> None:
    assert set(render.SUBTYPE_COLOURS) == set(SUBTYPES)
    for name in SUBTYPES:
        assert render.SUBTYPE_COLOURS[name] == results.drawing.SUBTYPE_COLOURS[name]
        assert render.SUBTYPE_COLOURS[name] == results.SUBTYPE_COLOURS[name]
        assert render.legend((name,)) == [(name, figures._css(render.SUBTYPE_COLOURS[name]))]


def test_key_image_and_viewer_show_the_same_pixels(tmp_path: Path) -> None:
    """A key image written as DICOM and the viewer's overlay of the same slice:
    same grey levels outside the banner and the outline, same outline colour."""
    datasets = make_ct_series(5, 128)
    mask = np.zeros((5, 128, 128), dtype=bool)
    mask[2, 80:100, 40:70] = True  # below the banner
    findings = make_findings(datasets, {"subdural": mask}, gradcam=False)
    hu = hu_volume(datasets)
    paths = results.write_results(findings, datasets, tmp_path, hu=hu)
    (sc,) = [
        ds
        for ds in (pydicom.dcmread(p) for p in paths)
        if ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    ]
    burned = sc.pixel_array
    grey = render.apply_window(hu[2], *render.WINDOW_PRESETS["brain"])
    masks = np.zeros((len(SUBTYPES), 128, 128), dtype=bool)
    masks[SUBTYPES.index("subdural")] = mask[2]
    viewer = render.composite(
        grey,
        masks,
        None,
        render.OverlayOptions(subtypes=("subdural",), opacity=0.0, outline=True),
    )
    edge = results.drawing.outline(mask[2])
    below_banner = np.zeros(edge.shape, dtype=bool)
    below_banner[60:] = True
    plain = below_banner & ~edge
    np.testing.assert_array_equal(burned[plain], viewer[plain])
    colour = np.array(render.SUBTYPE_COLOURS["subdural"], dtype=np.uint8)
    assert (burned[edge] == colour).all()
    assert (viewer[render.mask_edge(mask[2])] == colour).all()
