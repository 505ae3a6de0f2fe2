"""Reading and writing SAEs on disk.

neurolens writes SAELens's layout (v6):
    <folder>/cfg.json                  architecture, d_in, d_sae, k, dtype, apply_b_dec_to_input,
                                       normalize_activations, metadata (model, layer, training, quality)
    <folder>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
Both files are written to temporary names and renamed into place, weights first, so a folder with a cfg.json
always has the weights that belong to it.

It reads:
  - SAELens folders, v6 configs (architecture + k at the top level) and older ones (activation_fn_str "topk"
    with activation_fn_kwargs {"k": ...}, hook_point instead of hook_name); a TopK SAE with
    rescale_acts_by_decoder_norm has its decoder norms folded into the encoder, and a JumpReLU log_threshold is
    exponentiated (plain_tensors);
  - Prisma (ViT-Prisma) folders: config.json (d_in, expansion_factor or d_sae, activation_fn_str,
    activation_fn_kwargs, architecture, normalize_activations) with a .pt or .safetensors state dict holding the
    same four tensors. Prisma's checkpoints may pickle their config object next to the state dict
    ({"cfg": ..., "state_dict": ...}); those are read with torch's weights_only loader, the config object
    rebuilt as an inert attribute holder (it is never used: config.json is).
A path may name the folder or the weights file in it. Shapes come from the tensors and must agree with the
config; anything unreadable is one NeurolensError line.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import NeurolensError
from ..records.sae import CFG_NAME, WEIGHTS_NAME
from .model import SaeConfig, SparseAutoencoder

PRISMA_CFG_NAME = "config.json"
SAELENS_FORMAT_VERSION = "6.0.0"   # the cfg.json layout written (SAELens reads metadata.sae_lens_version)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ writing

def save_sae(sae: SparseAutoencoder, folder: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Write `sae` to `folder` in SAELens's layout; returns the folder. metadata is merged into cfg.json's."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NeurolensError(f"cannot create the SAE folder {folder} ({exc.strerror}); pass --cache PATH") from None
    tensors = {name: t.cpu() for name, t in sae.state_tensors().items()}
    dtype = str(tensors["W_enc"].dtype).replace("torch.", "")
    config = sae.config
    meta = dict(config.metadata)
    meta.update(metadata or {})
    meta.setdefault("sae_lens_version", SAELENS_FORMAT_VERSION)
    meta.setdefault("sae_lens_training_version", None)
    cfg = {"architecture": config.architecture, "d_in": config.d_in, "d_sae": config.d_sae, "dtype": dtype,
           "device": "cpu", "apply_b_dec_to_input": config.apply_b_dec_to_input,
           "normalize_activations": config.normalize_activations, "reshape_activations": "none",
           "metadata": meta}
    if config.architecture == "topk":
        cfg["k"] = int(config.k)
        cfg["rescale_acts_by_decoder_norm"] = False
    tag = uuid.uuid4().hex[:8]
    weights_tmp, cfg_tmp = folder / f".{WEIGHTS_NAME}.{tag}.tmp", folder / f".{CFG_NAME}.{tag}.tmp"
    try:
        save_file(tensors, str(weights_tmp))
        cfg_tmp.write_text(json.dumps(cfg, indent=2, default=_jsonable))
        os.replace(weights_tmp, folder / WEIGHTS_NAME)
        os.replace(cfg_tmp, folder / CFG_NAME)
    finally:
        for tmp in (weights_tmp, cfg_tmp):
            if tmp.exists():
                tmp.unlink()
    sae.config = SaeConfig(**{**_config_fields(sae.config), "metadata": meta})
    return folder


def _config_fields(config: SaeConfig) -> dict:
    return dict(d_in=config.d_in, d_sae=config.d_sae, architecture=config.architecture, k=config.k,
                apply_b_dec_to_input=config.apply_b_dec_to_input,
                normalize_activations=config.normalize_activations)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to cfg.json")


# ------------------------------------------------------------------------------------------------ reading

def find_files(path: str | os.PathLike) -> Tuple[Path, Path, str]:
    """(config file, weights file, layout 'saelens' | 'prisma') for a folder or a weights file."""
    path = Path(path)
    if not path.exists():
        raise NeurolensError(f"no SAE at {path}: the path does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        weights = path
    else:
        candidates = [folder / WEIGHTS_NAME] + sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pt"))
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise NeurolensError(f"no SAE weights in {folder}: expected {WEIGHTS_NAME} (SAELens) or a .pt/"
                                 f".safetensors state dict next to config.json (Prisma)")
        weights = found[0]
    if (folder / CFG_NAME).is_file():
        return folder / CFG_NAME, weights, "saelens"
    if (folder / PRISMA_CFG_NAME).is_file():
        return folder / PRISMA_CFG_NAME, weights, "prisma"
    raise NeurolensError(f"no SAE config next to {weights}: expected {CFG_NAME} (SAELens) or "
                         f"{PRISMA_CFG_NAME} (Prisma) in {folder}")


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An SAE from a SAELens or Prisma folder (or the weights file in it), in float32 on `device`."""
    cfg_path, weights_path, layout = find_files(path)
    try:
        raw_cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise NeurolensError(f"cannot read the SAE config {cfg_path} ({exc}); it must be a JSON object") from None
    if not isinstance(raw_cfg, dict):
        raise NeurolensError(f"the SAE config {cfg_path} is not a JSON object")
    tensors = {name: t.to(torch.float32) for name, t in read_tensors(weights_path).items()}
    config = parse_config(raw_cfg, tensors, str(cfg_path), layout)
    sae = SparseAutoencoder(config)
    sae.load_tensors(plain_tensors(raw_cfg, tensors, config), source=str(weights_path))
    return sae.to(device=device, dtype=torch.float32)


def plain_tensors(cfg: dict, tensors: Dict[str, torch.Tensor], config: SaeConfig) -> Dict[str, torch.Tensor]:
    """SAELens's variants of the layout, turned into the plain form with the same encode and decode:
      - JumpReLU weights saved by SAELens before 6.x hold log_threshold: threshold = exp(log_threshold) (what
        SAELens's own loader does);
      - a TopK SAE with rescale_acts_by_decoder_norm multiplies the pre-activations by the decoder rows' norms
        before TopK and divides the activations by them before decoding; folding the norms into W_enc, b_enc
        and W_dec (SAELens's _fold_norm_topk, which its training applies when it saves) gives the same feature
        activations and reconstruction with a plain TopK. The norms are clamped at 1e-8 as SAELens does."""
    tensors = dict(tensors)
    if config.architecture == "jumprelu" and "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if config.architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm") and \
            {"W_enc", "b_enc", "W_dec"} <= set(tensors) and tensors["W_dec"].dim() == 2:
        norms = tensors["W_dec"].norm(dim=-1).clamp(min=1e-8)
        tensors["W_enc"] = tensors["W_enc"] * norms
        tensors["b_enc"] = tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms.unsqueeze(1)
    return tensors


def read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise NeurolensError(f"cannot read the SAE weights {path} ({exc}); it must be a safetensors file") from None
    state = _torch_load(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise NeurolensError(f"{path} does not hold a state dict of tensors (W_enc, b_enc, W_dec, b_dec)")
    return {str(k): v for k, v in state.items()}


class _InertObject:
    """Stands in for a class pickled next to Prisma weights (its config object): keeps the pickled state as
    attributes, runs no code of the class."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_MAX_STAND_INS = 16


def _torch_load(path: Path):
    """torch.load with weights_only=True; globals outside torch's allow-list (a pickled config class) are
    replaced by an inert stand-in, one at a time, at most 16 of them."""
    stand_ins = []
    for _ in range(_MAX_STAND_INS + 1):
        try:
            with torch.serialization.safe_globals(stand_ins):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError / RuntimeError with the name in the message
            match = _UNSUPPORTED_GLOBAL.search(str(exc))
            if match is None:
                raise NeurolensError(f"cannot read the SAE weights {path} ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:200]})") from None
            stand_in = type(match.group(1).rsplit(".", 1)[-1], (_InertObject,), {})
            stand_ins.append((stand_in, match.group(1)))
    raise NeurolensError(f"cannot read the SAE weights {path}: it pickles more than {_MAX_STAND_INS} foreign "
                         f"classes; save its state dict alone (torch.save(sae.state_dict(), path))")


def parse_config(cfg: dict, tensors: Dict[str, torch.Tensor], source: str, layout: str = "saelens") -> SaeConfig:
    """A SaeConfig from an SAELens (any version) or Prisma config dict; shapes come from the tensors."""
    if "W_enc" not in tensors or tensors["W_enc"].dim() != 2:
        raise NeurolensError(f"the SAE weights next to {source} have no 2-D W_enc tensor")
    d_in, d_sae = (int(n) for n in tensors["W_enc"].shape)
    declared_in = cfg.get("d_in")
    declared_sae = cfg.get("d_sae")
    if declared_sae is None and cfg.get("expansion_factor") and declared_in:
        declared_sae = int(declared_in) * int(cfg["expansion_factor"])
    if (declared_in is not None and int(declared_in) != d_in) or (declared_sae is not None and int(declared_sae) != d_sae):
        raise NeurolensError(f"{source} declares d_in={declared_in}, d_sae={declared_sae} but W_enc is "
                             f"[{d_in}, {d_sae}]; the config and weights do not belong together")
    activation = str(cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu").lower()
    kwargs = cfg.get("activation_fn_kwargs") or {}
    architecture = str(cfg.get("architecture") or "standard").lower()
    k = cfg.get("k")
    if activation == "topk" or architecture == "topk":
        architecture = "topk"
        k = k if k is not None else kwargs.get("k")
        if k is None:
            raise NeurolensError(f"{source} is a TopK SAE without k (expected 'k' or activation_fn_kwargs.k)")
    elif architecture in ("standard", "jumprelu") and activation not in ("relu",):
        raise NeurolensError(f"{source} uses activation {activation!r}; neurolens reads relu, topk and jumprelu SAEs")
    normalization = cfg.get("normalize_activations", "none")
    if isinstance(normalization, bool) or normalization is None:
        normalization = "expected_average_only_in" if normalization else "none"
    if normalization == "expected_average_only_in":
        raise NeurolensError(f"{source} expects activations rescaled by a dataset-wide factor "
                             f"(normalize_activations=expected_average_only_in) that is not stored with it; fold "
                             f"the factor into the weights (SAELens: fold_activation_norm_scaling_factor) first")
    if normalization == "covariance_whitening":
        raise NeurolensError(f"{source} expects activations whitened by statistics that are not stored with it "
                             f"(normalize_activations=covariance_whitening); fold them into the weights (SAELens: "
                             f"fold_activation_whitening, which its training does before the final save) first")
    if cfg.get("finetuning_scaling_factor"):
        raise NeurolensError(f"{source} uses a finetuning scaling factor, which neurolens does not read")
    metadata = dict(cfg.get("metadata") or {})
    for key in ("model_name", "hook_name", "hook_point", "hook_point_layer", "layer_subtype"):
        if key in cfg and key not in metadata:
            metadata[key] = cfg[key]
    metadata["source_layout"] = layout
    dtype = str(cfg.get("dtype", "float32")).replace("torch.", "")
    metadata.setdefault("stored_dtype", dtype if dtype in _DTYPES else "float32")
    return SaeConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=int(k) if k is not None else None,
                     apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                     normalize_activations=str(normalization), metadata=metadata)


def read_config(path: str | os.PathLike) -> dict:
    """The raw cfg.json / config.json of an SAE folder (for listings), without the weights."""
    cfg_path, _, _ = find_files(path)
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return {}
