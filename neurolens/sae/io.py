"""Reading and writing SAEs on disk.

neurolens writes SAELens's layout (v6):
    <folder>/cfg.json                  architecture, d_in, d_sae, k, dtype, apply_b_dec_to_input,
                                       normalize_activations, metadata (model, layer, training, quality)
    <folder>/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]
Both files are written (fsync'ed) into a hidden staging folder beside the target, which then takes the target's
place in one rename (Linux: renameat2 RENAME_EXCHANGE; elsewhere the old folder is renamed aside first, so for
an instant there is no SAE there), so a crash or kill never pairs new weights with an old cfg.json. A full disk
is one line naming the file (neurolens.storage.files).

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
config; anything unreadable is one NeurolensError line. Configs come from strangers too: `check_config` checks
every field neurolens uses (types; d_in, d_sae, k, expansion_factor finite positive integers within sane sizes;
metadata and its quality report objects of numbers) and names the first bad one in that line.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import NeurolensError
from ..records.sae import CFG_NAME, WEIGHTS_NAME, check_config, find_files, read_cfg_file
from ..storage import files
from .model import SaeConfig, SparseAutoencoder

SAELENS_FORMAT_VERSION = "6.0.0"   # the cfg.json layout written (SAELens reads metadata.sae_lens_version)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------ writing

def save_sae(sae: SparseAutoencoder, folder: str | os.PathLike, metadata: Optional[dict] = None) -> Path:
    """Write `sae` to `folder` in SAELens's layout; returns the folder. metadata is merged into cfg.json's."""
    folder = Path(folder)
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
    _write_folder(folder, tensors, cfg)
    sae.config = SaeConfig(**{**_config_fields(sae.config), "metadata": meta})
    return folder


def _write_folder(folder: Path, tensors: Dict[str, torch.Tensor], cfg: dict) -> None:
    """Both files into a staging folder (fsync'ed), which then replaces `folder` (module docstring); other files
    the old folder held (a training checkpoint) are moved into the new one."""
    folder = folder.resolve() if folder.is_symlink() else folder
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.tmp")
    files.ensure_folder(staging, None)
    try:
        with files.atomic_path(staging / WEIGHTS_NAME, None) as tmp:
            save_file(tensors, str(tmp))
        files.write_text(staging / CFG_NAME, json.dumps(cfg, indent=2, default=_jsonable), None)
        if not folder.exists():
            os.rename(staging, folder)
        else:
            if not _exchange(staging, folder):
                aside = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:8]}.old")
                os.rename(folder, aside)
                os.rename(staging, folder)
                os.rename(aside, staging)
            for entry in staging.iterdir():       # the old folder, now at the staging name
                if entry.name not in (CFG_NAME, WEIGHTS_NAME) and not (folder / entry.name).exists():
                    os.rename(entry, folder / entry.name)
        files.fsync_folder(folder.parent)
    except OSError as exc:
        raise files.write_error(folder, exc, None) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    number = ctypes.get_errno()
    if number in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(number, os.strerror(number), str(b))


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


def load_sae(path: str | os.PathLike, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """An SAE from a SAELens or Prisma folder (or the weights file in it), in float32 on `device`."""
    cfg_path, weights_path, layout = find_files(path)
    raw_cfg = read_cfg_file(cfg_path)
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
    cfg = check_config(cfg, source)
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


