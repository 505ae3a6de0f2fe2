"""A cached `visualize`, `samples`, `text` and `sweep` answer (model card + cache records, --device cpu) imports
neither torch nor open_clip, and answers exactly what the first run answered (JSON, PNG and flags.csv bytes);
a changed weights file is recomputed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.models.devices import auto_device_name, no_gpu_possible

from cached_answers import cached_requests, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


# runs each CLI command in this fresh interpreter; says which of torch / open_clip were imported
RUNNER = """
import json, sys
from neurolens.labels import nudenet
nudenet.available = lambda: False          # as in the run that filled the cache (no NudeNet in tests)
from typer.testing import CliRunner
from neurolens.cli import app
outputs = [[r.exit_code, r.stdout] for r in (CliRunner().invoke(app, args) for args in json.loads(sys.argv[1]))]
print(json.dumps({"outputs": outputs, "torch": "torch" in sys.modules, "open_clip": "open_clip" in sys.modules}))
"""


def _fresh(commands, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)], env=env, capture_output=True,
                          text=True, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cached_visualize_samples_text_sweep_import_no_torch(tiny_clip, tmp_path, no_detector):
    path = tiny_checkpoint(tiny_clip, tmp_path / "w.pt")
    commands = cached_requests(tmp_path, path)
    first = {}
    for name, args in commands.items():
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        first[name] = json.loads(result.stdout)
    pngs = {p: p.read_bytes() for p in [tmp_path / "s.png", *sorted((tmp_path / "vis").glob("*.png")),
                                        *sorted((tmp_path / "sweep").rglob("flags.csv"))]}
    assert len(pngs) == 3
    for png in pngs:
        png.unlink()

    report = _fresh(list(commands.values()), tmp_path)
    assert [code for code, _ in report["outputs"]] == [0, 0, 0, 0], report
    assert report["torch"] is False and report["open_clip"] is False
    again = dict(zip(commands, (json.loads(out) for _, out in report["outputs"])))
    assert [row["cached"] for row in again["visualize"]["results"]] == [True]
    for row in first["visualize"]["results"]:
        row["cached"] = True
    assert again == first
    assert {p: p.read_bytes() for p in pngs} == pngs          # the same pixels and flags.csv, byte for byte

    # the default --device auto: on a machine without a GPU device file it is the CPU, decided without torch
    auto = [arg for arg in commands["text"] if arg not in ("--device", "cpu")]
    report = _fresh([auto], tmp_path)
    assert json.loads(report["outputs"][0][1]) == first["text"]
    assert report["torch"] is (not no_gpu_possible())

    # other weights at the same path: no card answers, the model is loaded and the answer recomputed
    tiny_checkpoint(tiny_clip, path, shift=0.01)
    report = _fresh([commands["visualize"]], tmp_path)
    assert report["torch"] is True and report["open_clip"] is True
    changed = json.loads(report["outputs"][0][1])
    assert changed["fingerprint"] != first["visualize"]["fingerprint"]
    assert [row["cached"] for row in changed["results"]] == [False]


def test_auto_is_the_cpu_without_torch_only_where_no_gpu_can_exist():
    if no_gpu_possible():
        assert not torch.cuda.is_available()          # the file check never hides a GPU torch would see
        assert auto_device_name("auto") == "cpu"
    else:
        assert auto_device_name("auto") == "auto"     # torch decides
    assert auto_device_name("cuda") == "cuda" and auto_device_name("cpu") == "cpu"
