"""Model loading: random weights, checkpoints, offline failure, device handling."""
import time

import pytest
import torch

from neurolens.errors import NeurolensError, WeightsUnavailableError
from neurolens.models import load_clip, read_checkpoint, save_checkpoint


def test_random_weights_are_seeded_and_respond_to_input(tiny_clip):
    again = load_clip("nl-tiny-RN", "none", device="cpu")
    assert again.fingerprint == tiny_clip.fingerprint
    assert any("BatchNorm" in note for note in tiny_clip.notes)
    bn3 = [m.weight for n, m in tiny_clip.model.named_modules() if n.endswith("bn3") and "layer" in n]
    assert bn3 and all(torch.all(w != 0) for w in bn3)
    x = torch.rand(2, 3, 64, 64)
    out = tiny_clip.model.encode_image(tiny_clip.normalize(x))
    assert not torch.allclose(out[0], out[1])


def test_clip_normalization_is_openai_not_imagenet(tiny_clip):
    import open_clip
    assert tuple(tiny_clip.mean) == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert tuple(tiny_clip.std) == tuple(open_clip.OPENAI_DATASET_STD)


def test_offline_without_cached_weights_fails_fast_with_ways_out():
    start = time.time()
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("RN50x4", "openai", device="cpu")
    assert time.time() - start < 5
    assert "--checkpoint" in str(info.value) and "--pretrained none" in str(info.value)


def test_unknown_model_and_tag_are_clear_errors():
    with pytest.raises(NeurolensError, match="unknown model"):
        load_clip("RN50x5", "none")
    with pytest.raises(NeurolensError, match="unknown pretrained tag"):
        load_clip("nl-tiny-RN", "laion2b")


def test_checkpoint_roundtrip_carries_config(tiny_clip, tmp_path):
    import json
    from pathlib import Path
    config = json.loads((Path(__file__).parent.parent / "neurolens/data/model_configs/nl-tiny-RN.json").read_text())
    path = save_checkpoint(tiny_clip.model, tmp_path / "toy.pt", "nl-checkpoint-test", model_config=config)
    state, meta = read_checkpoint(path)
    assert meta["model_name"] == "nl-checkpoint-test" and "visual.conv1.weight" in state
    loaded = load_clip(model="RN50x4", checkpoint=str(path), device="cpu")  # config in the file wins
    assert loaded.name == "nl-checkpoint-test"
    assert loaded.fingerprint == tiny_clip.fingerprint


def test_safetensors_checkpoint(tiny_clip, tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip.model.state_dict().items()}, str(path))
    loaded = load_clip(model="nl-tiny-RN", checkpoint=str(path), device="cpu")
    assert loaded.fingerprint == tiny_clip.fingerprint


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(NeurolensError, match="does not exist"):
        load_clip("nl-tiny-RN", checkpoint=str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(NeurolensError, match="could not be read"):
        load_clip("nl-tiny-RN", checkpoint=str(junk))
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, wrong)
    with pytest.raises(NeurolensError, match="does not fit"):
        load_clip("nl-tiny-RN", checkpoint=str(wrong))


def test_cuda_request_without_gpu_is_clear():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(NeurolensError, match="no CUDA"):
        load_clip("nl-tiny-RN", "none", device="cuda")
