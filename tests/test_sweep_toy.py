"""Integration: the sweep on the trained toy CLIP flags the planted units and few others.

Ground truth that does not use the sweep's scores: the ROC AUC with which a unit's per-image spatial max
separates planted from ordinary images of a fresh held-out generated set (generator labels, not captions).
A unit is PLANTED when its AUC >= 0.95 and UNRELATED when its AUC < 0.8; units in between respond to the
planted pattern in part, and flagging them or not is both defensible, so they are not counted. The sweep
runs on another generated set (its captions give the string match, its images the CLIP zero-shot score)
with the default flag rule."""
from pathlib import Path

import numpy as np
import pytest
import torch

LAYER = "image_block_4_0"
PLANTED_AUC = 0.95
UNRELATED_AUC = 0.8
MIN_PLANTED_FLAGGED_SHARE = 0.95
MAX_UNRELATED_FLAGGED_SHARE = 0.15
# measured on two toy models trained with the demo's settings (the toy code changed in between): planted
# units flagged 60/60 and 66/68; unrelated units flagged 12/408 (2.9%) and 46/415 (11.1%). The unrelated
# ones that get flagged correlate with the CLIP zero-shot part of the score, which the small toy model
# gives some ordinary images, not with the planted label (held-out AUC about 0.5).


def _auc(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """ROC AUC per column (Mann-Whitney U / n1 n0), ties counted half."""
    values = np.concatenate([positive, negative])
    ranks = np.apply_along_axis(lambda col: _rankdata(col), 0, values)
    n1, n0 = len(positive), len(negative)
    return (ranks[:n1].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _rankdata(col: np.ndarray) -> np.ndarray:
    order = np.argsort(col, kind="mergesort")
    ranks = np.empty(len(col))
    sorted_col = col[order]
    i = 0
    while i < len(col):
        j = i
        while j + 1 < len(col) and sorted_col[j + 1] == sorted_col[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def planted_auc(clip, n: int = 600, seed: int = 777) -> np.ndarray:
    from neurolens.hooks import forward_to
    from neurolens.models import resolve_layer
    from neurolens.toy.generate import generate_pairs
    held = generate_pairs(n, 64, 0.15, seed)
    images = torch.from_numpy(np.asarray(held.images)).permute(0, 3, 1, 2).float() / 255
    spec = resolve_layer(clip, LAYER)
    with torch.no_grad():
        acts = torch.cat([forward_to(clip.model, clip.normalize(images[i:i + 100]), [spec])[spec.name].amax(dim=(2, 3))
                          for i in range(0, n, 100)]).numpy()
    planted = np.asarray(held.planted, dtype=bool)
    return _auc(acts[planted], acts[~planted])


def measure(root: Path) -> dict:
    """Train (or reuse) the default toy model under root, sweep a generated set, compare with the truth."""
    from neurolens.models import load_clip
    from neurolens.pipelines.demo import DemoSettings, toy_dataset, toy_model
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.store import Cache
    from neurolens.toy.generate import ToySettings, write_dataset

    settings = DemoSettings()
    data = toy_dataset(root, settings=settings.data_settings())
    checkpoint, _, _ = toy_model(root, data, settings.data_settings(), settings.train_settings())
    clip = load_clip(checkpoint=str(checkpoint), device="cpu")
    sweep_set = write_dataset(root / "sweep-set", ToySettings(n=1000, seed=5))
    result = run_sweep(clip, LAYER, str(sweep_set), vocab=f"{sweep_set}:caption", top_k=32, text_top_k=30,
                       cache=Cache(root / "cache"), out=root / "flags")
    auc = planted_auc(clip)
    planted, unrelated = auc >= PLANTED_AUC, auc < UNRELATED_AUC
    flagged = result.scores.flagged
    return {"planted": int(planted.sum()), "planted_flagged": int((flagged & planted).sum()),
            "unrelated": int(unrelated.sum()), "unrelated_flagged": int((flagged & unrelated).sum()),
            "in_between": int((~planted & ~unrelated).sum()),
            "in_between_flagged": int((flagged & ~planted & ~unrelated).sum()), "flagged": int(flagged.sum())}


@pytest.mark.slow
def test_sweep_on_the_toy_model_flags_the_planted_units_and_few_others(tmp_path_factory):
    numbers = measure(tmp_path_factory.mktemp("toy-sweep"))
    assert numbers["planted"] >= 10, numbers
    assert numbers["planted_flagged"] >= MIN_PLANTED_FLAGGED_SHARE * numbers["planted"], numbers
    assert numbers["unrelated_flagged"] <= MAX_UNRELATED_FLAGGED_SHARE * numbers["unrelated"], numbers


if __name__ == "__main__":   # python tests/test_sweep_toy.py ROOT: measure with a reusable root
    import json
    import sys
    print(json.dumps(measure(Path(sys.argv[1]))))
