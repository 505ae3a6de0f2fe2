"""engines/shards.py without Ray: a plan has the dataset's identity and global indices; finished shards and
group records come back on a rerun, each shard once."""
import numpy as np
import torch

from neurolens.datasets.open import open_dataset
from neurolens.engines.ray.shards import plan_dataset
from neurolens.records.shards import ShardStore
from neurolens.activations.stats import ScanStats
from neurolens.storage.cache import Cache
from neurolens.types import LayerSpec
from scan_data import write_img2dataset, write_images

SPEC = LayerSpec("block", "block", "block", "output", channels=5, height=2, width=2)


def test_plans_have_the_identity_and_order_of_open_dataset(tmp_path):
    write_img2dataset(tmp_path / "laion", [4, 3, 5], bad_every=2)
    listed = []

    def mapper(fn, items):
        listed.extend(items)
        return map(fn, items)

    cache = Cache(tmp_path / "cache")
    plan = plan_dataset(str(tmp_path / "laion"), cache, mapper=mapper)
    dataset = open_dataset(str(tmp_path / "laion"))
    assert plan.identity == dataset.identity and plan.total == len(dataset) == 12
    assert [(s.offset, s.count) for s in plan.shards] == [(0, 4), (4, 3), (7, 5)]
    assert plan.keys_and_captions() == (dataset.keys, dataset.captions)
    assert len(listed) == 3
    again = plan_dataset(str(tmp_path / "laion"), cache, mapper=mapper)   # listings come from the cache
    assert len(listed) == 3 and again.identity == plan.identity
    assert again.shards[2].dataset().keys == dataset.keys[7:]

    write_images(tmp_path / "folder", 7)
    folder = open_dataset(str(tmp_path / "folder"))
    sliced = plan_dataset(str(tmp_path / "folder"), cache, shard_size=3)
    assert sliced.identity == folder.identity and [s.count for s in sliced.shards] == [3, 3, 1]
    assert sliced.shards[1].dataset().keys == folder.keys[3:6]


def _stats(indices, skipped=()):
    stats = ScanStats.empty(SPEC, 2)
    generator = torch.Generator().manual_seed(int(indices[0]))
    stats.add(torch.rand(len(indices), 5, 2, 2, generator=generator), torch.as_tensor(indices))
    stats.skipped = list(skipped)
    return stats


def test_shard_and_group_records_resume_each_shard_once(tmp_path):
    write_img2dataset(tmp_path / "laion", [3, 3, 3])
    cache = Cache(tmp_path / "cache")
    plan = plan_dataset(str(tmp_path / "laion"), cache)
    store = ShardStore(cache, "f" * 16, "block", "key")
    parts = [_stats([0, 2], [(1, "failed")]), _stats([3, 5], [(4, "failed")]), _stats([6, 8], [(7, "failed")])]
    for shard, part in zip(plan.shards, parts):
        store.save(shard, part, None, 2)
    group = _stats([0, 2], [(1, "failed")]).merge(_stats([3, 5], [(4, "failed")]))
    store.save_group(store.next_group(), group, plan.shards[:2], per_image=False)
    store.save(plan.shards[0], parts[0], None, 2)   # as if killed between writing the group and deleting this
    empty = lambda: ScanStats.empty(SPEC, 2)       # noqa: E731
    found = store.finished(plan.shards, empty, per_image=False)
    assert sorted((g.is_group, [s.offset for s in g.shards]) for g in found) == [(False, [6]), (True, [0, 3])]
    assert not store.path(plan.shards[0]).exists()   # the leftover shard record is gone
    assert store.skipped([g.path for g in found]) == [(1, "failed"), (4, "failed"), (7, "failed")]
    total = empty()
    for g in found:
        total.merge(g.stats)
    whole = _stats([0, 2]).merge(_stats([3, 5])).merge(_stats([6, 8]))
    np.testing.assert_array_equal(total.topk.indices, whole.topk.indices)
    assert total.count == 6
    assert store.finished(plan.shards, empty, per_image=True) == []   # no per-image chunks: nothing reused
    store.remove_records()
    assert not list((tmp_path / "cache" / "scan-shard").rglob("*.h5"))
