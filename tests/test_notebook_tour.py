"""docs/notebooks/tour.ipynb runs headless (nbclient, this environment's kernel, offline), and what it shows holds
no raw pixels of a flagged unit: every image of a flagged unit's dashboard is the blur policy's output (pixel for
pixel, and its fine detail under the blur bound), and no raw crop or visualization of a flagged unit appears
anywhere in its outputs. The committed notebook carries no outputs at all (run it to see them)."""
import base64
import hashlib
import io
import json
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from neurolens.labels.blur import DETAIL_BOUND, detail_retained, label_band_height

pytestmark = pytest.mark.integration   # a notebook: a Jupyter kernel, toy training, a sweep

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "notebooks" / "tour.ipynb"
DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")
UNIT_TITLE = re.compile(r"image_block_4_0 · unit (\d+)")

# run in the notebook's kernel after its cells: every pixel the flagged units it showed have, raw and blurred
PROBE = """
import hashlib, json
import numpy as np
def _digest(image):
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes() + str(image.size).encode()).hexdigest()
_report = {}
for _unit in sorted({int(u) for u in UNITS if sweep.scores.flagged[int(u)]}):
    _d = again.unit(_unit)
    _pictures = _d.visualizations.pictures + _d.samples.pictures
    _report[_unit] = [[_digest(p.raw), _digest(p.shown()), p.reason] for p in _pictures]
    for _p in _pictures:
        _p.raw.save(RAW_DIR + "/" + _digest(_p.raw) + ".png")
print(json.dumps({"flagged": [int(u) for u in sweep.flagged_units], "pictures": _report}))
"""


def _digest(image):
    return hashlib.sha1(np.asarray(image.convert("RGB")).tobytes() + str(image.size).encode()).hexdigest()


def _outputs(cell):
    """(html, [decoded images]) of every rich output of a code cell."""
    for output in cell.get("outputs", []):
        data = output.get("data", {})
        html = data.get("text/html", "")
        html = "".join(html) if isinstance(html, list) else html
        images = [base64.b64decode(found) for found in DATA_URI.findall(html)]
        if "image/png" in data:
            images.append(base64.b64decode(data["image/png"]))
        yield html, [Image.open(io.BytesIO(blob)).convert("RGB") for blob in images]


def test_the_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_tour_runs_and_shows_no_raw_pixels_of_a_flagged_unit(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROLENS_TOUR_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)
        shown_units = {int(u) for cell in notebook.cells if cell.cell_type == "code"
                       for html, _ in _outputs(cell) for u in UNIT_TITLE.findall(html)}
        (tmp_path / "raw").mkdir()
        probe = nbformat.v4.new_code_cell(f"UNITS = {sorted(shown_units)}\nRAW_DIR = {str(tmp_path / 'raw')!r}\n{PROBE}")
        notebook.cells.append(probe)
        client.execute_cell(probe, len(notebook.cells) - 1)
        notebook.cells.pop()
    report = json.loads("".join(o["text"] for o in probe.outputs if o.get("name") == "stdout").strip())
    flagged = set(report["flagged"])
    pictures = {int(u): rows for u, rows in report["pictures"].items()}
    assert pictures, "the tour shows no flagged unit"
    raw_of_flagged = {raw for rows in pictures.values() for raw, _, _ in rows}

    seen_flagged_dashboard = False
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        for html, images in _outputs(cell):
            digests = [_digest(image) for image in images]
            assert not raw_of_flagged & set(digests), "a raw image of a flagged unit is in the outputs"
            units = {int(u) for u in UNIT_TITLE.findall(html)}
            if not units & flagged or not images:
                continue
            assert "RAW PIXELS" not in html
            seen_flagged_dashboard = True
            (unit,) = units & flagged
            rows = pictures[unit]
            assert digests == [blurred for _, blurred, _ in rows]          # exactly the blur policy's output
            assert all(reason for _, _, reason in rows)
            for (raw_digest, _, _), image in zip(rows, images):            # and unrecognizable by the blur's measure
                raw = Image.open(tmp_path / "raw" / f"{raw_digest}.png").convert("RGB")
                box = (0, 0, image.width, image.height - label_band_height(image.height))
                assert detail_retained(raw.crop(box), image.crop(box)) < DETAIL_BOUND
    assert seen_flagged_dashboard
    assert any("RAW PIXELS" in html for cell in notebook.cells if cell.cell_type == "code"
               for html, _ in _outputs(cell)), "the tour reveals its unflagged unit"

