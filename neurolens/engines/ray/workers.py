"""What runs on Ray's workers in a Ray scan: decode_shards (CPU tasks: a shard's items decoded and
preprocessed in batches, with the same decoder and skip rules as the single-process scan) and ModelActor (the
image tower loaded once per actor; one truncated forward per batch and ScanStats.add per shard). Ray itself
is imported only inside the actor (an optional dependency)."""
from __future__ import annotations

import os
import pickle
import resource
from dataclasses import replace
from typing import Dict, List

import numpy as np
import torch

from ...activations.forward import layer_forward
from ...activations.stats import ScanStats
from ...datasets.decode import decode_item_with_image
from ...errors import NeurolensError
from ...models.build import LoadedClip, resolve_device, weights_fingerprint
from ...models.layers import resolve_layer
from .shards import PlannedShard


def decode_shards(batch: Dict[str, np.ndarray], image_size: int, batch_size: int, labels=None):
    """CPU task: the shard's items in order, decoded and preprocessed, in batches of `batch_size` rows; a bad
    item is a row with zero pixels and its reason (the actor counts it as skipped). With a fused sweep's
    labels, also each item's decode-side label scores (captions, columns, NudeNet; NaN for a bad item)."""
    for blob in batch["plan"]:
        shard: PlannedShard = pickle.loads(blob)
        dataset = shard.dataset()
        scores = labels.shard_scores(shard, dataset) if labels is not None else None
        for first in range(0, shard.count, batch_size):
            last = min(first + batch_size, shard.count)
            pixels = np.zeros((last - first, 3, image_size, image_size), dtype=np.uint8)
            reasons = []
            for row, item in enumerate(range(first, last)):
                array, reason, image = decode_item_with_image(dataset, item, image_size)
                if array is not None:
                    pixels[row] = array
                    if labels is not None and labels.needs_images:
                        labels.image_scores(scores, item, image)
                elif scores is not None:
                    scores[item] = np.nan
                reasons.append(reason)
            rows = {"shard": np.full(last - first, shard.index, dtype=np.int64),
                    "index": np.arange(shard.offset + first, shard.offset + last, dtype=np.int64),
                    "pixels": pixels, "reason": np.asarray(reasons, dtype=object)}
            if scores is not None:
                rows["scores"] = scores[first:last]
            yield rows


class ModelActor:
    """Loads the model once; per call, one truncated forward per `batch_size` readable rows and, per shard
    among them, ScanStats.add; returns one partial result per shard in the call. With a fused sweep's labels
    the forward runs to the image embedding when a source needs it, and each shard's part carries its
    label results (fused.LabelPlan.actor_part)."""

    def __init__(self, model, meta: dict, layer: str, device: str, threads: int, top_k: int, batch_size: int,
                 precision: str, keep_per_image: bool, labels=None):
        import ray  # lazy: optional dependency (neurolens[ray])
        torch.set_num_threads(threads)
        if isinstance(model, ray.ObjectRef):  # Ray Data passes constructor arguments as they are
            model = ray.get(model)
        if weights_fingerprint(model) != meta["tower_fingerprint"]:
            raise NeurolensError("the model an actor received differs from the driver's; run the scan again")
        torch_device = resolve_device(device)
        model = model.to(torch_device).eval()
        self.clip = LoadedClip(model=model, name=meta["name"], pretrained=meta["pretrained"], device=torch_device,
                               image_size=int(meta["image_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                               fingerprint=meta["fingerprint"], tokenizer=None)
        self.spec = resolve_layer(self.clip, layer)
        self.top_k, self.batch_size = top_k, batch_size
        if labels is not None and labels.edges is not None:   # arrays from Ray's object store are read-only
            labels = replace(labels, edges=np.array(labels.edges))
        self.precision, self.keep_per_image, self.labels = precision, keep_per_image, labels

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        device = self.clip.device
        shards, index = np.asarray(batch["shard"]), np.asarray(batch["index"])
        reasons = np.asarray(batch["reason"], dtype=object)
        readable = np.flatnonzero(reasons == "")
        embeddings = self.labels is not None and self.labels.needs_embeddings
        stats = {int(s): ScanStats.empty(self.spec, self.top_k, device) for s in np.unique(shards)}
        kept: Dict[int, List[tuple]] = {s: [] for s in stats}     # (rows, values, embeddings) per forward
        for first in range(0, len(readable), self.batch_size):
            rows = readable[first:first + self.batch_size]
            images = torch.from_numpy(np.ascontiguousarray(batch["pixels"][rows])).to(device).float().div_(255.0)
            acts, emb = layer_forward(self.clip, self.spec, images, self.precision, embeddings=embeddings,
                                      pad_to=self.batch_size)
            for shard in np.unique(shards[rows]):
                mine = np.flatnonzero(shards[rows] == shard)
                picked = torch.as_tensor(mine, device=device)
                values = stats[int(shard)].add(acts[picked], torch.as_tensor(index[rows][mine], device=device))
                kept[int(shard)].append((rows[mine], values, emb[picked].cpu().numpy() if emb is not None else None))
        payloads = []
        for shard, part in stats.items():
            bad = (shards == shard) & (reasons != "")
            part.skipped = [(int(i), str(r)) for i, r in zip(index[bad], reasons[bad])]
            rows = np.concatenate([r for r, _, _ in kept[shard]]) if kept[shard] else np.zeros(0, np.int64)
            values = torch.cat([v for _, v, _ in kept[shard]]) if kept[shard] else \
                torch.zeros((0, self.spec.channels), device=device)
            payload = {"covered": index[shards == shard], "state": part.state_dict(), "forwarded": part.count,
                       "indices": index[rows] if self.keep_per_image else np.zeros(0, np.int64),
                       "maxima": values.cpu().numpy().astype(np.float16) if self.keep_per_image
                       else np.zeros((0, self.spec.channels), np.float16)}
            if self.labels is not None:
                emb = np.concatenate([e for _, _, e in kept[shard]]) if embeddings and kept[shard] else None
                payload["labels"] = self.labels.actor_part(values, emb, np.asarray(batch["scores"])[rows],
                                                           index[rows])
            payloads.append(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"shard": np.asarray(list(stats), dtype=np.int64), "payload": np.asarray(payloads, dtype=object),
                "pid": np.full(len(stats), os.getpid(), dtype=np.int64),
                "rss": np.full(len(stats), rss, dtype=np.int64)}
