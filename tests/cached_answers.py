"""What the cached-answer tests share (tests/test_model_card.py, tests/test_cached_torch.py): a checkpoint of the
tiny CLIP that carries its config, and the four CLI requests (samples, sweep, visualize, text) whose second run
must be answered from the cache."""
import copy
import json

import torch

from neurolens.data import MODEL_CONFIGS
from neurolens.models.checkpoint import save_checkpoint

import sweep_data

TINY_CONFIG = json.loads((MODEL_CONFIGS / "nl-tiny-RN.json").read_text())


def tiny_checkpoint(clip, path, shift=0.0):
    """Save clip's weights (every float tensor + shift) as a neurolens checkpoint carrying its config."""
    model = clip.model
    if shift:
        model = copy.deepcopy(model)
        with torch.no_grad():
            for value in model.state_dict().values():
                if value.is_floating_point():
                    value.add_(shift)
    return str(save_checkpoint(model, path, "nl-tiny-RN", model_config=TINY_CONFIG))


def cached_requests(tmp_path, checkpoint):
    """name -> CLI arguments. Samples and sweep come first: a visualization's JSON names the dataset's top-1 (from
    the scan) and its blur reason may come from the sweep, so both exist before the first visualize as they do
    on the second run."""
    data = tmp_path / "data"
    data.mkdir()
    table = sweep_data.write_table(data)
    vocab = sweep_data.write_vocab(tmp_path / "vocab.txt")
    common = ["--checkpoint", checkpoint, "--device", "cpu", "--cache", str(tmp_path / "cache"),
              "--layer", "image_block_4_0"]
    return {
        "samples": ["samples", *common, "--unit", "1", "--dataset", table, "--top-k", "4", "--out",
                    str(tmp_path / "s.png"), "--json"],
        "sweep": ["sweep", *common, "--dataset", table, "--vocab", vocab, "--top-k", "4", "--text-top-k", "5",
                  "--labels", "captions", "--out", str(tmp_path / "sweep"), "--json"],
        "visualize": ["visualize", *common, "--unit", "1", "--steps", "2", "--out", str(tmp_path / "vis"), "--json"],
        "text": ["text", *common, "--unit", "1", "--vocab", vocab, "--top-k", "5", "--json"],
    }
