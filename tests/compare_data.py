"""Test data of `neurolens compare` (tests/test_compare.py, tests/test_compare_browser.py): a captioned probe
table of synthetic images and two tiny ResNet checkpoints (nothing real, nothing explicit)."""
import copy
import csv
import json
from pathlib import Path

import torch

from neurolens.models.checkpoint import save_checkpoint
from neurolens.scoring.flags import FlagRule
from sweep_data import synthetic

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = json.loads((ROOT / "neurolens/data/model_configs/nl-tiny-RN.json").read_text())
LOOSE = FlagRule(max_q=1.0, min_auc=0.6)       # random tiny models: flags by AUC alone, so that flags exist
CONCEPTS = [{"name": "adult", "terms": ["adult"]}, {"name": "dogs", "terms": ["dog"], "sensitive": False}]
CONCEPTS_YAML = ("concepts:\n  - name: adult\n    terms: [adult]\n  - name: dogs\n    terms: [dog]\n"
                 "    sensitive: false\n")


def write_probe(root: Path) -> str:
    """48 synthetic images in a CSV table; every 4th caption says 'adult', every 3rd 'dog'."""
    with open(root / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for i in range(48):
            synthetic(300 + i).save(root / f"img_{i:03d}.png")
            words = ["adult content" if i % 4 == 0 else "a photo", "with a dog" if i % 3 == 0 else "of shapes"]
            writer.writerow([f"img_{i:03d}.png", f"{' '.join(words)} number {i}"])
    return str(root / "data.csv")


def write_checkpoints(root: Path, tiny_clip) -> list:
    """Two tiny ResNets: the seeded random one with its weights nudged two ways, saved as checkpoints named
    =alpha.pt (a label that looks like a spreadsheet formula) and beta.pt."""
    paths = []
    for seed, name in ((1, "=alpha"), (2, "beta")):
        model = copy.deepcopy(tiny_clip.model)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.3 * param.std(correction=0) * torch.randn(param.shape, generator=generator))
        paths.append(str(save_checkpoint(model, root / f"{name}.pt", "nl-tiny-RN", model_config=TINY_CONFIG)))
    return paths
