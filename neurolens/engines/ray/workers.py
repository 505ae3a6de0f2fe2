"""What runs on Ray's workers in a Ray scan: decode_shards (CPU tasks: a shard's items prepared in batches, with
the same decoders and skip rules as the single-process scan) and ModelActor (the image tower loaded once per
actor; the batched JPEG decode of `--decode torchvision` on its device, one truncated forward per batch and
ScanStats.add per shard). Ray itself is imported only inside the actor (an optional dependency)."""
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
from ...datasets.decode import Prepared, prepare_item
from ...errors import NeurolensError
from ...models.build import LoadedClip, resolve_device, weights_fingerprint
from ...models.layer_table import resolve_layer
from ..decode import assemble
from .shards import PlannedShard


def decode_shards(batch: Dict[str, np.ndarray], image_size: int, batch_size: int, labels=None,
                  decoder: str = "pil"):
    """CPU task: the shard's items in order, prepared as the single-process scan's decode workers prepare them
    (datasets.decode.prepare_item with `decoder`), in batches of `batch_size` rows; a bad item is a row with zero
    pixels and its reason (the actor counts it as skipped). With decoder "torchvision" a JPEG left to the batched
    decoder is a row with zero pixels and its bytes in the `jpeg` column (the actor decodes it). With a fused
    sweep's labels, also each item's decode-side label scores (captions, columns, NudeNet on the decoded PIL
    image; NaN for a bad item)."""
    keep_image = labels is not None and labels.needs_images
    for blob in batch["plan"]:
        shard: PlannedShard = pickle.loads(blob)
        dataset = shard.dataset()
        scores = labels.shard_scores(shard, dataset) if labels is not None else None
        for first in range(0, shard.count, batch_size):
            last = min(first + batch_size, shard.count)
            pixels = np.zeros((last - first, 3, image_size, image_size), dtype=np.uint8)
            reasons, jpegs = [], []
            for row, item in enumerate(range(first, last)):
                prepared = prepare_item(dataset, item, image_size, decoder, keep_image=keep_image)
                if prepared.array is not None:
                    pixels[row] = prepared.array
                if not prepared.reason:
                    if keep_image:
                        labels.image_scores(scores, item, prepared.image)
                elif scores is not None:
                    scores[item] = np.nan
                reasons.append(prepared.reason)
                jpegs.append(prepared.jpeg or b"")
            rows = {"shard": np.full(last - first, shard.index, dtype=np.int64),
                    "index": np.arange(shard.offset + first, shard.offset + last, dtype=np.int64),
                    "pixels": pixels, "reason": np.asarray(reasons, dtype=object)}
            if decoder == "torchvision":
                rows["jpeg"] = np.asarray(jpegs, dtype=object)
            if scores is not None:
                rows["scores"] = scores[first:last]
            yield rows


class ModelActor:
    """Loads the model once; per call, one truncated forward per `batch_size` readable rows and, per shard
    among them, ScanStats.add; returns one partial result per shard in the call. Rows holding a JPEG (decode
    "torchvision") are decoded here in batches on the actor's device (engines.decode.assemble; what the
    batched decoder refuses is decoded by PIL, and skipped with PIL's reason if that fails too). Per-image
    values stay on the device until the call's results are put together. With a fused sweep's labels the
    forward runs to the image embedding when a source needs it, and each shard's part carries its label
    results (fused.LabelPlan.actor_part)."""

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

    def _images(self, batch: Dict[str, np.ndarray], rows: np.ndarray, reasons: np.ndarray):
        """(images in [0, 1] on the device, the rows they are) for `rows`; rows the decoder skips get their
        reason in `reasons` and are left out."""
        jpegs = batch.get("jpeg")
        if jpegs is None or not any(len(jpegs[row]) for row in rows):
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][rows]))
            return pixels.to(self.clip.device).float().div_(255.0), rows
        items = [Prepared(int(row), jpeg=bytes(jpegs[row])) if len(jpegs[row]) else
                 Prepared(int(row), array=np.array(batch["pixels"][row])) for row in rows]
        built = assemble(items, self.clip.image_size, self.clip.device)
        for row, reason in built.skipped:
            reasons[row] = reason
        rows = np.asarray(built.indices, dtype=np.int64)
        return (None if built.pixels is None else built.pixels.float().div_(255.0)), rows

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        device = self.clip.device
        shards, index = np.asarray(batch["shard"]), np.asarray(batch["index"])
        reasons = np.array(batch["reason"], dtype=object)        # a copy: the actor's decoder may add skips
        readable = np.flatnonzero(reasons == "")
        embeddings = self.labels is not None and self.labels.needs_embeddings
        stats = {int(s): ScanStats.empty(self.spec, self.top_k, device) for s in np.unique(shards)}
        kept: Dict[int, List[tuple]] = {s: [] for s in stats}     # (rows, values, embeddings) per forward
        for first in range(0, len(readable), self.batch_size):
            images, rows = self._images(batch, readable[first:first + self.batch_size], reasons)
            if images is None:
                continue
            acts, emb = layer_forward(self.clip, self.spec, images, self.precision, embeddings=embeddings,
                                      pad_to=self.batch_size)
            for shard in np.unique(shards[rows]):
                mine = np.flatnonzero(shards[rows] == shard)
                picked = torch.as_tensor(mine, device=device)
                values = stats[int(shard)].add(acts[picked], torch.as_tensor(index[rows][mine], device=device))
                kept[int(shard)].append((rows[mine], values, emb[picked] if emb is not None else None))
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
                emb = torch.cat([e for _, _, e in kept[shard]]).cpu().numpy() if embeddings and kept[shard] else None
                payload["labels"] = self.labels.actor_part(values, emb, np.asarray(batch["scores"])[rows],
                                                           index[rows])
            payloads.append(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"shard": np.asarray(list(stats), dtype=np.int64), "payload": np.asarray(payloads, dtype=object),
                "pid": np.full(len(stats), os.getpid(), dtype=np.int64),
                "rss": np.full(len(stats), rss, dtype=np.int64)}
