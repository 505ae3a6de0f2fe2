"""Hostile weights files and checkpoints.

A pickle whose __reduce__ would create a marker file is handed to every way a file becomes weights
(--checkpoint, --pretrained FILE, a tag's cached file, a tag's downloaded file): it never runs, and the user
gets one line. A checkpoint whose model_name is absolute, full of ../ or the name of a stock open_clip model
writes nothing outside a private temporary folder and changes no open_clip config."""
import json
import pickle
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.errors import NeurolensError
from neurolens.models.build import load_clip
from neurolens.models.checkpoint import save_checkpoint
from neurolens.models import pretrained as pretrainedlib

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = json.loads((ROOT / "neurolens/data/model_configs/nl-tiny-RN.json").read_text())


class RunsCode:
    """Unpickling this object (without weights_only) opens, i.e. creates, the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture()
def hostile(tmp_path, tiny_clip):
    """(marker, {kind: path}): weights files that would create `marker` if anything unpickled them."""
    marker = tmp_path / "code_ran"
    state = {k: v.detach().clone() for k, v in tiny_clip.model.state_dict().items()}
    files = {}
    files["zip"] = tmp_path / "hostile.pt"          # torch.save's zip format, a real state dict beside the payload
    torch.save({"state_dict": state, "model_name": "nl-tiny-RN", "payload": RunsCode(marker)}, files["zip"])
    files["legacy"] = tmp_path / "hostile.bin"      # a bare pickle (torch's legacy, non-zip format)
    files["legacy"].write_bytes(pickle.dumps({"payload": RunsCode(marker)}, protocol=2))
    files["renamed"] = tmp_path / "hostile.safetensors"   # a pickle under a safetensors name
    files["renamed"].write_bytes(files["legacy"].read_bytes())
    # the payload really runs when a file is unpickled without weights_only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(files["zip"], weights_only=False)
    assert marker.exists()
    marker.unlink()
    return marker, files


def _refused(call, marker: Path) -> str:
    with pytest.raises(NeurolensError) as info:
        call()
    assert not marker.exists(), "the pickle's code ran"
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    return message


@pytest.mark.parametrize("kind", ["zip", "legacy", "renamed"])
def test_hostile_checkpoint_and_pretrained_file_never_run(hostile, kind):
    marker, files = hostile
    path = str(files[kind])
    for call in (lambda: load_clip("nl-tiny-RN", checkpoint=path, device="cpu"),
                 lambda: load_clip("nl-tiny-RN", pretrained=path, device="cpu")):
        message = _refused(call, marker)
        assert path in message
        if kind == "zip":
            assert "builtins.open" in message or "io.open" in message   # says what it wanted to run
            assert "never runs code" in message


def test_hostile_cached_pretrained_file_never_runs(hostile, tmp_path, monkeypatch):
    """RN50x4/openai whose Hugging Face cache holds a hostile open_clip_pytorch_model.bin."""
    import huggingface_hub.constants
    import open_clip
    marker, files = hostile
    hub = open_clip.get_pretrained_cfg("RN50x4", "openai").get("hf_hub", "")
    assert hub, "this open_clip has no hub copy of RN50x4/openai"
    repo_id = hub.rstrip("/")
    cache = tmp_path / "hf_cache"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(files["zip"].read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert pretrainedlib._cached_pretrained_file(open_clip.get_pretrained_cfg("RN50x4", "openai")) == \
        str(snapshot / "open_clip_pytorch_model.bin")
    message = _refused(lambda: load_clip("RN50x4", "openai", device="cpu"), marker)
    assert "open_clip_pytorch_model.bin" in message and "never runs code" in message


def test_hostile_downloaded_pretrained_file_never_runs(hostile, tmp_path, monkeypatch):
    import huggingface_hub
    marker, files = hostile
    fetched = []

    def fake_download(repo_id, filename, **kwargs):
        fetched.append((repo_id, filename))
        return str(files["zip"])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pretrainedlib, "_cached_pretrained_file", lambda cfg: None)
    monkeypatch.setattr(pretrainedlib, "_network_reachable", lambda timeout=2.0: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    message = _refused(lambda: load_clip("RN50x4", "openai", device="cpu"), marker)
    assert fetched and fetched[0][1].endswith(".safetensors")   # the safetensors copy is asked for first
    assert str(files["zip"]) in message


def test_cli_refuses_a_hostile_file_in_one_line(hostile):
    marker, files = hostile
    runner = CliRunner()
    for option in ("--checkpoint", "--pretrained"):
        result = runner.invoke(app, ["layers", "--model", "nl-tiny-RN", option, str(files["zip"]), "--device", "cpu"])
        assert result.exit_code == 2, result.output
        assert not marker.exists()
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "never runs code" in lines[0] and "Traceback" not in result.output


def test_a_torchscript_archive_is_refused_with_a_way_out(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "RN50x4.pt"
    torch.jit.save(scripted, str(path))
    with pytest.raises(NeurolensError, match="TorchScript archive"):
        load_clip("nl-tiny-RN", checkpoint=str(path), device="cpu")


CLAIMS = {
    "absolute": lambda outside: str(outside / "planted"),
    "traversal": lambda outside: "../" * 16 + str(outside / "planted").lstrip("/"),
    "stock name": lambda outside: "RN50x4",
}


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("claim", sorted(CLAIMS))
def test_checkpoint_model_name_cannot_write_outside_or_replace_a_config(tiny_clip, tmp_path, monkeypatch,
                                                                         claim, fmt):
    import open_clip
    outside = tmp_path / "outside"
    outside.mkdir()
    private = tmp_path / "private_tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))   # where the private temporary folder goes
    stock = open_clip.get_model_config("RN50x4")
    claimed = CLAIMS[claim](outside)
    path = tmp_path / f"claims.{fmt}"
    if fmt == "pt":
        save_checkpoint(tiny_clip.model, path, claimed, model_config=TINY_CONFIG)
    else:
        from safetensors.torch import save_file
        meta = {"neurolens": json.dumps({"model_name": claimed, "model_config": TINY_CONFIG})}
        save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(path), metadata=meta)
    before = sorted(p for p in tmp_path.rglob("*"))

    loaded = load_clip(checkpoint=str(path), device="cpu")

    assert sorted(p for p in tmp_path.rglob("*")) == before   # nothing written anywhere, temp folder removed
    assert list(outside.iterdir()) == [] and list(private.iterdir()) == []
    assert open_clip.get_model_config("RN50x4") == stock     # the stock config is untouched
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*-cfg[0-9a-f]{12}", loaded.name), loaded.name
    assert loaded.name != "RN50x4" and "/" not in loaded.name
    assert loaded.image_size == 64 and loaded.fingerprint == tiny_clip.fingerprint
    assert open_clip.get_model_config(loaded.name) == TINY_CONFIG


def test_a_config_identical_to_a_known_one_keeps_its_name(tiny_clip, tmp_path):
    path = save_checkpoint(tiny_clip.model, tmp_path / "same.pt", "nl-tiny-RN", model_config=TINY_CONFIG)
    assert load_clip(checkpoint=str(path), device="cpu").name == "nl-tiny-RN"


def test_same_config_same_name_different_config_different_name(tiny_clip, tmp_path):
    first = save_checkpoint(tiny_clip.model, tmp_path / "a.pt", "mine", model_config=TINY_CONFIG)
    again = save_checkpoint(tiny_clip.model, tmp_path / "b.pt", "mine", model_config=TINY_CONFIG)
    other_config = json.loads(json.dumps(TINY_CONFIG))
    other_config["text_cfg"]["layers"] = 1
    state = {k: v for k, v in tiny_clip.model.state_dict().items() if "transformer.resblocks.1." not in k}
    other = tmp_path / "c.pt"
    torch.save({"state_dict": state, "model_name": "mine", "model_config": other_config}, other)
    names = [load_clip(checkpoint=str(p), device="cpu").name for p in (first, again, other)]
    assert names[0] == names[1] and names[2] != names[0]
    assert all(name.startswith("mine-cfg") for name in names)


def test_a_config_that_is_not_an_open_clip_config_is_a_clear_error(tiny_clip, tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"state_dict": tiny_clip.model.state_dict(), "model_name": "odd", "model_config": {"embed_dim": 8}},
               path)
    with pytest.raises(NeurolensError, match="not an open_clip config"):
        load_clip(checkpoint=str(path), device="cpu")
