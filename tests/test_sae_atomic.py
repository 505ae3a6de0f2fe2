"""SAE saves and training checkpoints go through the atomic-write helper (issue 20): both SAE files are swapped in
as one folder, so a crash at any step leaves the old SAE or the new one, never new weights with an old
cfg.json; a full disk is one line (WriteError) and leaves the old SAE whole."""
import errno
import os
from pathlib import Path

import pytest
import torch

import neurolens.sae.io as sae_io
from neurolens.sae.model import SaeConfig, SparseAutoencoder
from neurolens.sae.io import load_sae, save_sae
from neurolens.sae.train import write_checkpoint
from neurolens.storage.files import WriteError


def random_sae(d_sae: int, seed: int) -> SparseAutoencoder:
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=6, d_sae=d_sae, architecture="topk", k=2))
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    return sae


class Crash(BaseException):
    """What a kill does to the writer at that instant (nothing after it runs but `finally` blocks)."""


def test_a_crash_at_any_step_of_a_save_leaves_the_old_or_the_new_sae(tmp_path, monkeypatch):
    old, new = random_sae(8, 0), random_sae(12, 1)
    folder = tmp_path / "registry" / "mine"
    real_replace, real_rename = os.replace, os.rename
    real_exchange = getattr(sae_io, "_exchange", None)
    outcomes = []
    for crash_at in range(1, 20):
        save_sae(old, folder)
        (folder / "checkpoint.pt").write_bytes(b"training state")      # what training leaves beside it
        steps = [0]

        def step(real):
            def wrapped(*args, **kwargs):
                steps[0] += 1
                if steps[0] == crash_at:
                    raise Crash()
                return real(*args, **kwargs)
            return wrapped
        monkeypatch.setattr(os, "replace", step(real_replace))
        monkeypatch.setattr(os, "rename", step(real_rename))
        monkeypatch.setattr(sae_io, "_exchange", step(real_exchange), raising=False)
        try:
            save_sae(new, folder)
            finished = True
        except Crash:
            finished = False
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(os, "rename", real_rename)
            monkeypatch.setattr(sae_io, "_exchange", real_exchange, raising=False)
        loaded = load_sae(folder)                     # a mixed pair would fail: d_sae 8 vs 12
        expected = new if loaded.d_sae == 12 else old
        assert torch.equal(loaded.W_enc.detach(), expected.W_enc.detach())
        outcomes.append(loaded.d_sae)
        if finished:
            assert (folder / "checkpoint.pt").read_bytes() == b"training state"
            break
    assert finished and outcomes[-1] == 12 and 8 in outcomes
    assert sorted(p.name for p in folder.parent.iterdir()) == ["mine"]        # no staging folder left


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_old_sae(tmp_path, full_disk):
    folder = tmp_path / "mine"
    old = random_sae(8, 0)
    save_sae(old, folder)
    full_disk(when=lambda path: "cfg.json" in path, keep=10)
    with pytest.raises(WriteError) as caught:
        save_sae(random_sae(12, 1), folder)
    assert "\n" not in str(caught.value) and "no space left" in str(caught.value)
    assert torch.equal(load_sae(folder).W_enc.detach(), old.W_enc.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_training_checkpoints_are_written_whole(tmp_path, monkeypatch):
    path = tmp_path / "sae" / "checkpoint.pt"
    write_checkpoint(path, {"format": 2, "weights": torch.arange(4)})
    before = path.read_bytes()

    def filling_save(data, target):          # torch writes through C++, not open(): a disk filling up mid-file
        Path(target).write_bytes(b"PK half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
    monkeypatch.setattr(torch, "save", filling_save)
    with pytest.raises(WriteError, match="no space left.*--cache"):
        write_checkpoint(path, {"format": 2, "weights": torch.arange(100_000)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]
