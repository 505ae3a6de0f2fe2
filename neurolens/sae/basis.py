"""A basis of a layer: the units every command inspects. Neurons (the layer's channels) or the features of an SAE.

A basis knows
  id          what cache keys hash ("neurons", or "sae-<name>-<hash of the weights>")
  units       how many units it has
  activations (B, C, H, W) layer activations -> (B, units, H, W): what `scan` ranks images by (spatial max)
  objective   what `visualize` maximizes
  directions  each unit's direction in the joint embedding space, from the layer's Jacobian (`text`)
  tag/label   how file names and pages name a unit

For an SAE feature f (W_enc, b_enc, W_dec, b_dec in SAELens's layout, see model.py):
  activation at a cell x   the SAE's feature activation z_f(x) (TopK: zero unless f is among the k largest
                           pre-activations of that cell); the per-image value of a scan is its max over cells
  visualize objective      the pre-TopK encoder activation pre_f(x) = (n(x) - b_dec) . W_enc[:, f] + b_enc[f],
                           averaged over cells (objective "channel") or at the centre cell ("neuron"): it has a
                           gradient everywhere, where z_f is flat zero outside the top k
  text direction           J W_dec[f] normalized: the derivative of the image embedding when the layer moves
                           along the feature's decoder direction on every cell, with J the Jacobian that gives
                           the neurons' directions (neurolens.text.encode)
`load_basis` is the one call that turns `--sae NAME_OR_PATH` (or nothing: neurons) into a basis.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NeurolensError
from ..models.layer_table import resolve_layer
from ..optvis.objectives import Objective
from ..records.keys import NEURONS, as_cache
from ..records.sae import sae_folder
from ..records.visualize import unit_tag
from ..types import LayerSpec
from .io import load_sae
from ..records.sae import read_config
from .model import SparseAutoencoder
from .neurons import NeuronBasis, check_basis_unit
from .registry import list_saes, locate


class SaeBasis:
    """The features of one SAE on one layer."""
    kind = "sae"
    unit_word = "feature"

    def __init__(self, sae: SparseAutoencoder, name: str, spec: LayerSpec, path: Optional[Path] = None):
        if sae.d_in != spec.channels:
            hook = sae.config.metadata.get("hook_name") or sae.config.metadata.get("hook_point")
            made_for = f" (it was made for {hook})" if hook else ""
            raise NeurolensError(f"the SAE {name} reads {sae.d_in}-channel vectors but layer {spec.name} has "
                                 f"{spec.channels} channels{made_for}; use an SAE made for this layer")
        self.sae = sae.eval()
        for param in self.sae.parameters():
            param.requires_grad_(False)
        self.name, self.spec, self.path = name, spec, path
        self.units = sae.d_sae
        self.digest = weights_digest(sae)
        self.id = f"sae-{name}-{self.digest[:12]}"

    # -------------------------------------------------------------------------------------- scan

    def activations(self, acts: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, F, H, W) feature activations of every cell (or (B, C) -> (B, F))."""
        sae = self.sae.to(acts.device)
        if acts.dim() == 2:
            return sae.encode(acts.float())
        batch, channels, height, width = acts.shape
        flat = acts.float().permute(0, 2, 3, 1).reshape(-1, channels)
        if sae.config.architecture == "topk":
            values, indices = sae.encode_topk(flat)
            dense = torch.zeros(flat.shape[0], self.units, device=acts.device, dtype=values.dtype)
            dense.scatter_(1, indices, values)
        else:
            dense = sae.encode(flat)
        return dense.reshape(batch, height, width, self.units).permute(0, 3, 1, 2)

    # --------------------------------------------------------------------------------- visualize

    def pre_activation_map(self, acts: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H, W): each image's own feature's pre-TopK activation on every cell."""
        sae = self.sae.to(acts.device)
        cells = acts.float().permute(0, 2, 3, 1)                       # (N, H, W, C)
        encoder_in = sae.encoder_input(cells)
        weights = sae.W_enc.t()[units]                                  # (N, C)
        return torch.einsum("nhwc,nc->nhw", encoder_in, weights) + sae.b_enc[units][:, None, None]

    def objective(self, kind: str, layer: str, units: Sequence[int]) -> Objective:
        if kind not in ("channel", "neuron"):
            raise NeurolensError(f"unknown objective {kind!r}; use channel or neuron")
        index = torch.as_tensor(list(units), dtype=torch.long)

        def fn(acts) -> torch.Tensor:
            act = acts[layer]
            if act.dim() == 2:
                act = act[:, :, None, None]
            pre = self.pre_activation_map(act, index.to(act.device))
            if kind == "neuron":
                return pre[:, pre.shape[1] // 2, pre.shape[2] // 2]
            return pre.flatten(1).mean(1)
        return Objective(fn, [layer], f"sae_feature_{kind}({layer}, {self.name})")

    # -------------------------------------------------------------------------------------- text

    def directions(self, jacobian: torch.Tensor) -> np.ndarray:
        """(F, D): normalize(J @ W_dec[f]) for every feature f, J (D, C) the layer's Jacobian."""
        jac = torch.as_tensor(jacobian).float()
        decoder = self.sae.W_dec.detach().float().cpu()
        return F.normalize(decoder @ jac.t(), dim=-1).numpy()

    # ----------------------------------------------------------------------------------- naming

    def tag(self, unit: int) -> str:
        return unit_tag(unit, self)

    def label(self, unit: int) -> str:
        return f"feature {int(unit)} of SAE {self.name}"

    def check_unit(self, unit: int) -> None:
        check_basis_unit(self, unit)

    def describe(self) -> dict:
        config = self.sae.config
        return {"basis": self.id, "kind": self.kind, "name": self.name, "path": str(self.path) if self.path else None,
                "units": self.units, "architecture": config.architecture, "k": config.k, "d_in": config.d_in,
                "quality": (config.metadata.get("neurolens") or {}).get("quality")}


Basis = Union[NeuronBasis, SaeBasis]


def weights_digest(sae: SparseAutoencoder) -> str:
    """sha1 of the architecture, k, normalization and every tensor's bytes: the SAE's identity in cache keys."""
    config = sae.config
    digest = hashlib.sha1(repr((config.architecture, config.k, config.apply_b_dec_to_input,
                                config.normalize_activations)).encode())
    for name, tensor in sorted(sae.state_tensors().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_basis(clip, layer: str, sae: Union[None, str, Path, SparseAutoencoder, NeuronBasis, SaeBasis] = None,
               cache=None, name: Optional[str] = None) -> Basis:
    """The basis of `layer` named by `sae`: None -> the neurons; a name -> the SAE trained for this model and
    layer (`neurolens sae train --out NAME`); a path -> an SAE folder made anywhere (SAELens or Prisma layout);
    a SparseAutoencoder -> its features (named `name`). Raises NeurolensError with one line when the SAE is
    missing or does not fit the layer."""
    spec = resolve_layer(clip, layer)
    if sae is None or isinstance(sae, NeuronBasis):
        return NeuronBasis(spec)
    if isinstance(sae, SaeBasis):
        if sae.spec.name != spec.name:
            raise NeurolensError(f"the SAE basis {sae.name} is of layer {sae.spec.name}, not {spec.name}")
        return sae
    if isinstance(sae, SparseAutoencoder):
        return SaeBasis(sae.to(clip.device), name or "custom", spec)
    path, found_name, _ = locate(clip, spec.name, str(sae), cache)
    model = load_sae(path, device=clip.device)
    return SaeBasis(model, name or found_name, spec, path)


def available_bases(clip, layer: str, cache=None) -> list:
    """What a page can offer for `layer`: the neurons, then every SAE trained for this model and layer, as
    JSON-able dicts {sae (the value for load_basis / --sae; None for neurons), kind, name, units, label,
    quality}. Reads only the SAEs' cfg.json files (no weights); an SAE whose cfg.json is not usable is listed
    with `unreadable` (the one-line reason) instead."""
    spec = resolve_layer(clip, layer)
    rows = [{"sae": None, "kind": NEURONS, "name": "", "units": spec.channels, "label": f"{spec.channels} neurons",
             "quality": None}]
    for name in list_saes(clip, spec.name, cache):
        try:
            cfg = read_config(sae_folder(as_cache(cache), clip.fingerprint, spec.name, name))
        except NeurolensError as exc:
            rows.append({"sae": name, "kind": "sae", "name": name, "units": None, "label": f"SAE {name}: unreadable",
                         "quality": None, "unreadable": str(exc)})
            continue
        info = (cfg.get("metadata") or {}).get("neurolens") or {}
        rows.append({"sae": name, "kind": "sae", "name": name, "units": cfg.get("d_sae"),
                     "label": f"SAE {name}: {cfg.get('d_sae')} features, k={cfg.get('k')}",
                     "quality": info.get("quality")})
    return rows
