"""TopK and BatchTopK SAE training (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; Bussmann et
al. 2024, "BatchTopK sparse autoencoders") on a CLIP layer.

The autoencoder (model.py): z = TopK(ReLU-free pre-activations) then ReLU, pre = (x - b_dec) W_enc + b_enc,
x_hat = z W_dec + b_dec, with
  - a pre-encoder bias: b_dec is subtracted before encoding and added back after decoding; it starts at the
    geometric median of the first chunk's vectors;
  - unit-norm decoder rows (SAELens's W_dec [d_sae, d_in]; the dictionary vectors): initialized as random unit
    vectors, W_enc starts as their transpose; after every step each row is renormalized to norm 1, and before it
    the gradient's component parallel to the row is removed (the row can only turn, which is what Adam's
    update then does);
  - Adam (eps 6.25e-10), a linear warm-up over the first 1% of steps and a linear decay to 0 over the last 20%.
Inputs are scaled by one constant so that the first chunk's mean squared distance from its mean is d_in (so the
loss is comparable across layers; Gao et al. normalize likewise); the constant is folded into the saved
weights, which therefore read the layer's raw activations (b_dec and b_enc divided by it, feature activations
in the layer's own units).

Sparsity (`sparsity`):
  - batchtopk: each training batch of n vectors keeps its k * n largest pre-activations, wherever
    they are, so k features per vector on average; a vector that needs few features (a plain background cell)
    leaves the budget to one that needs more, where TopK makes every vector use exactly k (Bussmann et al.
    report a lower reconstruction error at the same average L0). Inference has no batch: at the end of training
    one global threshold is estimated (the mean over full training batches of the smallest activation BatchTopK
    keeps, final weights) and the SAE is saved as SAELens's `jumprelu` with that threshold on every feature, so
    L0 varies per vector and is about k on average; the quality report's L0 is that of the saved form. On the
    toy CLIP it is on a par with TopK for the planted feature's selectivity, leaves more features dead on some
    seeds, and its planted feature's visualization fell short of the dataset's best image: so it is an option,
    not the default (docs/sae.md has the figures).
  - topk (the default): exactly k features per vector, saved as SAELens's `topk` with k.

Loss: normalized MSE = mean ||x - x_hat||^2 / d_in (in the scaled space, so 1 - explained variance of the
first chunk's spread) + 1/32 * AuxK.

Dead features: the AuxK auxiliary loss (Gao et al., section A.2). A feature that has not fired on the last
`dead_after` training vectors is dead; the k_aux = d_in/2 largest pre-activations among dead features
reconstruct the main reconstruction's residual, and the normalized error of that reconstruction is added with
weight 1/32 (scaled down when fewer than k_aux features are dead). The dead features' pre-activations enter
that reconstruction as they are, without the ReLU: a feature whose pre-activation has gone negative on every
input gets no gradient through a ReLU and would stay dead for good. Measured on the toy CLIP's image_block_4_0
(1024 features, 20 epochs, seed 0): k 32: 57 % dead with the ReLU, 1.5 % without; k 16: 47 % dead without
AuxK, 35 % with a straight-through ReLU, 4.4 % as here. Chosen over resampling because it acts on
every step through the ordinary gradient: no optimizer-state surgery, no extra pass over the data to pick
resampling inputs, and it leaves training a pure function of (seed, data, settings), which keeps the run
deterministic and resumable from a plain checkpoint (resampling dead features to training vectors, tried on
the toy, lowered the explained variance from 0.98 to 0.86). Encoder = decoder transpose at init (also Gao et
al.) is the other half: it keeps most features alive from the start.

Determinism: on CPU the same seed, data and settings give the same weights (seeded init, seeded image and
vector orders in buffer.py, no other randomness); a run resumed from its checkpoint continues bit for bit.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NeurolensError
from ..storage import files
from .buffer import ActivationStream, seeded_generator
from .model import SaeConfig, SparseAutoencoder

ADAM_EPS = 6.25e-10
WARMUP_FRACTION = 0.01
DECAY_FRACTION = 0.2
AUX_COEFFICIENT = 1 / 32
GEOMETRIC_MEDIAN_SAMPLES = 8192
GEOMETRIC_MEDIAN_STEPS = 30
MAX_DEAD_AFTER = 10_000_000
CHECKPOINT_FORMAT = 2
SPARSITIES = ("batchtopk", "topk")

Progress = Optional[Callable[[int, int], None]]
MetricsCallback = Optional[Callable[[dict], None]]


@dataclass(frozen=True)
class SaeTrainSettings:
    """Everything a trained SAE depends on besides the model, layer and dataset (hashed into its key)."""
    features: str = "8x"          # "<f>x": f times the layer's channels; or a number of features
    k: int = 32                   # active features per vector
    epochs: int = 0               # passes over the training images; 0 = enough for `min_vectors`
    min_vectors: int = 2_000_000  # with epochs=0: the fewest training vectors (at least one epoch)
    batch_size: int = 1024        # vectors per optimizer step
    lr: float = 0.0               # Adam learning rate; 0 = 2e-4 * sqrt(2^14 / features) (Gao et al.'s scaling) * 4
    aux_k: int = 0                # dead features in the AuxK loss; 0 = d_in / 2
    dead_after: int = 0           # vectors without firing that make a feature dead; 0 = min(10M, one epoch)
    buffer_vectors: int = 0       # shuffle buffer; 0 = as many as fit in 256 MiB
    held_out: float = 0.1         # share of the images kept out of training for the quality report
    max_held_out: int = 2000
    seed: int = 0
    sparsity: str = "topk"        # "topk": exactly k per vector; "batchtopk": k per vector on average over each
                                  # batch, saved as JumpReLU with a global threshold (see the module docstring)

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_features(channels: int, features) -> int:
    """'8x' -> 8 * channels; '4096' or 4096 -> 4096."""
    text = str(features).strip().lower()
    try:
        if text.endswith("x"):
            factor = float(text[:-1])
            count = int(round(factor * channels))
        else:
            count = int(text)
    except ValueError:
        raise NeurolensError(f"--features must be a multiple of the layer's channels such as 8x, or a number "
                             f"such as 4096; got {features!r}") from None
    if count < 1:
        raise NeurolensError(f"--features gives {count} features; it must give at least 1")
    return count


def resolved_lr(settings: SaeTrainSettings, d_sae: int) -> float:
    return settings.lr if settings.lr > 0 else 8e-4 * math.sqrt((2 ** 14) / d_sae)


def default_buffer_vectors(channels: int, budget_bytes: int = 256 * 2 ** 20) -> int:
    return max(4096, budget_bytes // (4 * channels))


@dataclass
class TrainState:
    """What a checkpoint holds besides the SAE and the optimizer."""
    epoch: int = 0
    next_chunk: int = 0
    seen: int = 0                 # training vectors consumed
    step: int = 0
    scale: float = 0.0            # input scaling constant (0: not set yet)
    last_fired: Optional[torch.Tensor] = None   # (d_sae,) int64: `seen` when each feature last fired
    skipped: Dict[int, str] = field(default_factory=dict)
    threshold: Optional[float] = None           # BatchTopK's inference threshold (scaled space), once estimated
    history: list = field(default_factory=list)   # per chunk: [seen, loss, explained variance, dead share]


class Trainer:
    """One SAE's optimizer, schedule, dead-feature bookkeeping and step (in the scaled input space)."""

    def __init__(self, d_in: int, d_sae: int, settings: SaeTrainSettings, total_steps: int, dead_after: int,
                 device: torch.device):
        self.settings = settings
        self.k = int(settings.k)
        if settings.sparsity not in SPARSITIES:
            raise NeurolensError(f"unknown sparsity {settings.sparsity!r}; use {' or '.join(SPARSITIES)}")
        self.batch_topk = settings.sparsity == "batchtopk"
        self.aux_k = int(settings.aux_k or max(1, d_in // 2))
        self.dead_after = int(dead_after)
        self.total_steps = max(1, int(total_steps))
        self.sae = SparseAutoencoder(SaeConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=self.k)).to(device)
        generator = seeded_generator(settings.seed, 11)
        with torch.no_grad():
            directions = torch.randn(d_sae, d_in, generator=generator)
            self.sae.W_dec.copy_(F.normalize(directions, dim=1).to(device))
            self.sae.W_enc.copy_(self.sae.W_dec.t())
        self.lr = resolved_lr(settings, d_sae)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=self.lr, eps=ADAM_EPS)
        self.state = TrainState(last_fired=torch.zeros(d_sae, dtype=torch.int64, device=device))

    # ------------------------------------------------------------------------------------- setup

    def start(self, first_chunk: torch.Tensor) -> None:
        """Scale and pre-encoder bias from the first chunk (raw vectors)."""
        centred = first_chunk - first_chunk.mean(0)
        spread = float(centred.pow(2).sum(1).mean())
        d_in = first_chunk.shape[1]
        self.state.scale = math.sqrt(d_in / spread) if spread > 0 else 1.0
        sample = first_chunk[:GEOMETRIC_MEDIAN_SAMPLES] * self.state.scale
        with torch.no_grad():
            self.sae.b_dec.copy_(geometric_median(sample))

    def learning_rate(self, step: int) -> float:
        warmup = max(1, int(WARMUP_FRACTION * self.total_steps))
        decay_start = int((1 - DECAY_FRACTION) * self.total_steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if step >= decay_start:
            return self.lr * max(0.0, (self.total_steps - step) / max(1, self.total_steps - decay_start))
        return self.lr

    def dead_mask(self) -> torch.Tensor:
        return (self.state.seen - self.state.last_fired) >= self.dead_after

    # -------------------------------------------------------------------------------------- step

    def select(self, pre: torch.Tensor) -> tuple:
        """The active features of a batch of pre-activations: (values ReLU'd, feature indices, offsets).

        topk: the k largest pre-activations of every vector; (n, k) values and indices, offsets None.
        batchtopk: the k * n largest of the whole batch, so that a vector gets as many features as compete for
        the batch's budget and k on average; 1-D values and indices grouped by vector, vector i's from
        offsets[i] on (what embedding_bag takes)."""
        if not self.batch_topk:
            values, indices = pre.topk(self.k, dim=-1, sorted=False)
            return values.relu(), indices, None
        count, width = pre.shape
        values, flat = pre.flatten().topk(min(self.k * count, pre.numel()), sorted=False)
        flat, order = flat.sort()
        rows = torch.div(flat, width, rounding_mode="floor")
        offsets = torch.searchsorted(rows, torch.arange(count, device=rows.device))
        return values[order].relu(), flat - rows * width, offsets

    @torch.no_grad()
    def estimate_threshold(self, raw: torch.Tensor) -> float:
        """BatchTopK's inference threshold (Bussmann et al. 2024): over the full training batches of `raw`, the
        mean of the smallest positive activation that BatchTopK keeps in the batch, with the current weights,
        in the scaled space. Applied to every vector alone (JumpReLU with this one threshold), it keeps about
        the features that BatchTopK keeps in a batch, k per vector on average, without the batch."""
        size = self.settings.batch_size
        batches = [b for b in raw.split(size) if b.shape[0] == size] or [raw]
        minima = []
        for batch in batches:
            x = batch * self.state.scale
            values, _, _ = self.select((x - self.sae.b_dec) @ self.sae.W_enc + self.sae.b_enc)
            positive = values[values > 0]
            if positive.numel():
                minima.append(float(positive.min()))
        return float(np.mean(minima)) if minima else 0.0

    def step(self, raw: torch.Tensor) -> Dict[str, float]:
        """One optimizer step on a batch of raw vectors; returns loss, explained variance and AuxK loss."""
        sae = self.sae
        x = raw * self.state.scale
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        acts, indices, offsets = self.select(pre)
        x_hat = sae.decode_sparse(acts, indices, offsets=offsets)
        error = x - x_hat
        mse = error.pow(2).sum(1).mean()
        loss = mse / x.shape[1]
        dead = self.dead_mask()
        dead_count = int(dead.sum())
        aux_value = 0.0
        if dead_count:
            k_aux = min(self.aux_k, dead_count)
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            aux_values, aux_indices = dead_pre.topk(k_aux, dim=-1, sorted=False)
            residual = error.detach()
            aux_hat = sae.decode_sparse(aux_values, aux_indices, bias=False)   # no ReLU: see the module docstring
            aux = (residual - aux_hat).pow(2).sum(1).mean() / residual.pow(2).sum(1).mean().clamp_min(1e-12)
            aux_value = float(aux.detach())
            loss = loss + AUX_COEFFICIENT * min(1.0, dead_count / self.aux_k) * aux
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.state.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            grad = sae.W_dec.grad
            if grad is not None:   # keep only the part that turns each unit-norm decoder row
                grad -= (grad * sae.W_dec).sum(1, keepdim=True) * sae.W_dec
        self.optimizer.step()
        with torch.no_grad():
            sae.W_dec.copy_(F.normalize(sae.W_dec, dim=1))
            fired = indices[acts > 0]
            self.state.seen += x.shape[0]
            self.state.last_fired[fired] = self.state.seen
            total = (x - x.mean(0)).pow(2).sum(1).sum()
            explained = 1.0 - float(error.pow(2).sum() / total) if float(total) > 0 else float("nan")
        self.state.step += 1
        return {"loss": float(loss.detach()), "explained_variance": explained, "aux_loss": aux_value}

    # -------------------------------------------------------------------------- export and state

    def export(self) -> SparseAutoencoder:
        """The SAE for raw activations: the input scale folded into the biases (see the module docstring).
        topk: a topk SAE with k; batchtopk: a jumprelu SAE whose threshold is the estimated global threshold on
        every feature (SAELens's inference form of BatchTopK)."""
        sae = self.sae
        scale = self.state.scale
        if self.batch_topk:
            if self.state.threshold is None:
                raise RuntimeError("BatchTopK's threshold is estimated at the end of training, before the export")
            config = SaeConfig(d_in=sae.d_in, d_sae=sae.d_sae, architecture="jumprelu")
        else:
            config = sae.config
        out = SparseAutoencoder(config)
        with torch.no_grad():
            out.W_enc.data = sae.W_enc.detach().clone()
            out.b_enc.data = sae.b_enc.detach() / scale
            out.W_dec.data = sae.W_dec.detach().clone()
            out.b_dec.data = sae.b_dec.detach() / scale
            if self.batch_topk:   # pre-activations of raw inputs are those of scaled inputs divided by the scale
                out.threshold.data = torch.full_like(sae.b_enc.detach(), self.state.threshold / scale)
        return out.to(sae.W_enc.device)

    def checkpoint(self, key: str) -> dict:
        s = self.state
        return {"format": CHECKPOINT_FORMAT, "key": key,
                "sae": {n: t.detach().cpu().clone() for n, t in self.sae.state_tensors().items()},
                "optimizer": self.optimizer.state_dict(), "epoch": s.epoch, "next_chunk": s.next_chunk,
                "seen": s.seen, "step": s.step, "scale": s.scale, "threshold": s.threshold,
                "last_fired": s.last_fired.cpu().clone(),
                "skipped_indices": list(s.skipped), "skipped_reasons": list(s.skipped.values()),
                "history": [list(map(float, row)) for row in s.history]}

    def restore(self, data: dict) -> None:
        device = self.sae.W_enc.device
        self.sae.load_tensors({n: t.to(device) for n, t in data["sae"].items()}, source="the checkpoint")
        self.optimizer.load_state_dict(data["optimizer"])
        s = self.state
        s.epoch, s.next_chunk, s.seen, s.step = (int(data[n]) for n in ("epoch", "next_chunk", "seen", "step"))
        s.scale = float(data["scale"])
        s.threshold = None if data.get("threshold") is None else float(data["threshold"])
        s.last_fired = data["last_fired"].to(device=device, dtype=torch.int64)
        s.skipped = {int(i): str(r) for i, r in zip(data["skipped_indices"], data["skipped_reasons"])}
        s.history = [list(row) for row in data["history"]]


def geometric_median(points: torch.Tensor, steps: int = GEOMETRIC_MEDIAN_STEPS) -> torch.Tensor:
    """Weiszfeld's iteration from the mean (robust start for the pre-encoder bias)."""
    median = points.mean(0)
    for _ in range(steps):
        distances = (points - median).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / distances
        median = (points * weights[:, None]).sum(0) / weights.sum()
    return median


# ----------------------------------------------------------------------------------------------- the loop

@dataclass
class LoopResult:
    sae: SparseAutoencoder            # exported: reads raw activations
    trainer: Trainer
    resumed_from: Optional[int]       # training vectors done when this run started from a checkpoint
    seconds: float


def plan(stream: ActivationStream, settings: SaeTrainSettings) -> tuple:
    """(epochs, total steps, dead_after) for these settings and this stream."""
    per_epoch = max(1, stream.vectors_per_epoch)
    epochs = settings.epochs if settings.epochs > 0 else max(1, math.ceil(settings.min_vectors / per_epoch))
    total_steps = epochs * math.ceil(per_epoch / settings.batch_size)
    dead_after = settings.dead_after if settings.dead_after > 0 else min(MAX_DEAD_AFTER, per_epoch)
    return epochs, total_steps, dead_after


def train_loop(stream: ActivationStream, settings: SaeTrainSettings, d_sae: int, key: str,
               checkpoint_path: Optional[Path] = None, progress: Progress = None, on_metrics: MetricsCallback = None,
               checkpoint_seconds: float = 30.0, stop_after_chunks: Optional[int] = None) -> LoopResult:
    """Train on the stream's epochs, resuming from `checkpoint_path` when it holds this key's checkpoint and
    writing one there at chunk boundaries (at most every `checkpoint_seconds`, and at the end).

    stop_after_chunks: stop (as an interruption would) after that many chunks of this run (tests)."""
    started = time.perf_counter()
    device = stream.clip.device
    epochs, total_steps, dead_after = plan(stream, settings)
    trainer = Trainer(stream.spec.channels, d_sae, settings, total_steps, dead_after, device)
    resumed_from = None
    if checkpoint_path is not None:
        saved = read_checkpoint(checkpoint_path, key)
        if saved is not None:
            trainer.restore(saved)
            resumed_from = trainer.state.seen
    state = trainer.state
    total_vectors = epochs * stream.vectors_per_epoch
    last_save = time.monotonic()
    chunks_done = 0
    if progress is not None:
        progress(min(state.seen, total_vectors), total_vectors)
    while state.epoch < epochs:
        for info, vectors in stream.epoch(state.epoch, state.next_chunk):
            for index, reason in info.skipped:
                state.skipped[int(index)] = reason
            if state.scale == 0.0:
                if vectors.shape[0] == 0:
                    continue
                trainer.start(vectors)
            sums = np.zeros(3)
            for batch in vectors.split(settings.batch_size):
                metrics = trainer.step(batch)
                sums += (metrics["loss"], metrics["explained_variance"], 1)
                if progress is not None:
                    progress(min(state.seen, total_vectors), total_vectors)
            dead_share = float(trainer.dead_mask().float().mean())
            if sums[2]:
                row = [state.seen, sums[0] / sums[2], sums[1] / sums[2], dead_share]
                state.history.append(row)
                if on_metrics is not None:
                    on_metrics({"vectors": state.seen, "total": total_vectors, "loss": row[1],
                                "explained_variance": row[2], "dead_share": dead_share, "epoch": state.epoch,
                                "epochs": epochs})
            state.next_chunk = info.index + 1
            if state.next_chunk >= info.chunks:
                state.epoch, state.next_chunk = state.epoch + 1, 0
            chunks_done += 1
            due = time.monotonic() - last_save >= checkpoint_seconds
            stopping = stop_after_chunks is not None and chunks_done >= stop_after_chunks
            if checkpoint_path is not None and (due or stopping):
                write_checkpoint(checkpoint_path, trainer.checkpoint(key))
                last_save = time.monotonic()
            if stopping:
                raise KeyboardInterrupt("stopped after the requested chunks")
        else:
            if state.next_chunk != 0:   # the epoch's last chunk was done before this run (fits-in-buffer case)
                state.epoch, state.next_chunk = state.epoch + 1, 0
    if state.scale == 0.0:
        raise NeurolensError("no training vector: every training image was unreadable; give a dataset with "
                             "readable images")
    if trainer.batch_topk and state.threshold is None:
        # on the final weights, over the first chunk of the last epoch (in memory when every vector fits; one
        # chunk's forward otherwise): a full-size, shuffled sample of training vectors
        chunks = stream.epoch(epochs - 1, 0)
        try:
            _, calibration = next(chunks)
        finally:
            chunks.close()   # the rest of the epoch is not needed (no model forward for it)
        state.threshold = trainer.estimate_threshold(calibration)
    if checkpoint_path is not None:
        write_checkpoint(checkpoint_path, trainer.checkpoint(key))
    return LoopResult(trainer.export(), trainer, resumed_from, time.perf_counter() - started)


def write_checkpoint(path: Path, data: dict) -> None:
    """The checkpoint, whole or not at all (neurolens.storage.files: temporary name, fsync, rename; a full disk
    is one line naming the file)."""
    with files.atomic_path(path, files.CACHE_OPTION) as tmp:
        torch.save(data, tmp)


def read_checkpoint(path: Path, key: str) -> Optional[dict]:
    """This key's checkpoint, or None (absent, unreadable, or of other settings); NeurolensError for a checkpoint
    of another format (kept, so that an older neurolens can still resume it)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(data, dict):
        return None
    if data.get("format") != CHECKPOINT_FORMAT:   # format 1: TopK only, no threshold, settings without sparsity
        raise NeurolensError(f"{path} is a training checkpoint of another neurolens version (format "
                             f"{data.get('format')}, this one reads {CHECKPOINT_FORMAT}) and cannot be resumed; "
                             f"pass --force to start over, or delete it")
    return data if data.get("key") == key else None
