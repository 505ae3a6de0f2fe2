"""The sparse autoencoder itself, in SAELens's parameter layout:

    W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]   (+ threshold [d_sae] for JumpReLU)

    pre(x) = (n(x) - b_dec) @ W_enc + b_enc        the pre-activations (b_dec is the pre-encoder bias; SAELens's
                                                   apply_b_dec_to_input=False leaves it out)
    z(x)   = act(pre(x))                           topk: the k largest pre-activations, ReLU'd, all others 0
                                                   (Gao et al. 2024); standard: ReLU; jumprelu: ReLU where
                                                   pre > threshold
    x_hat  = n^-1(z @ W_dec + b_dec)

n is the input normalization SAELens and Prisma may declare: none (identity), constant_norm_rescale (scale each
vector to norm sqrt(d_in)) or layer_norm (subtract the mean mu, divide by std + 1e-5); n^-1 undoes it with the
same vector's statistics exactly as SAELens does (constant_norm_rescale: divide by the same factor; layer_norm:
y * std + mu, without the 1e-5). Every input is a channel vector of one spatial cell (or one patch token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NeurolensError

ARCHITECTURES = ("topk", "standard", "jumprelu")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class SaeConfig:
    """What the weights alone do not say. `metadata` is carried through save/load untouched."""
    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: Optional[int] = None                 # topk only
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    metadata: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise NeurolensError(f"SAE architecture {self.architecture!r} is not supported; neurolens reads "
                                 f"{', '.join(ARCHITECTURES)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise NeurolensError(f"SAE input normalization {self.normalize_activations!r} is not supported; "
                                 f"neurolens reads {', '.join(NORMALIZATIONS)}")
        if self.architecture == "topk" and not (self.k and 0 < int(self.k) <= self.d_sae):
            raise NeurolensError(f"a topk SAE needs 1 <= k <= d_sae ({self.d_sae}), got k={self.k}")


class SparseAutoencoder(nn.Module):
    """An SAE over d_in-channel vectors (the last dimension of every input)."""

    def __init__(self, config: SaeConfig):
        super().__init__()
        self.config = config
        d_in, d_sae = config.d_in, config.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if config.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae))

    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    @property
    def k(self) -> Optional[int]:
        return self.config.k

    def with_config(self, **changes) -> "SparseAutoencoder":
        self.config = replace(self.config, **changes)
        return self

    # ------------------------------------------------------------------------------------- encoding

    def normalize(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[tuple]]:
        """(n(x), what n^-1 needs)."""
        mode = self.config.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * coeff, (coeff,)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            std = centred.std(dim=-1, keepdim=True)
            return centred / (std + LAYER_NORM_EPS), (mu, std)
        return x, None

    def denormalize(self, y: torch.Tensor, state: Optional[tuple]) -> torch.Tensor:
        mode = self.config.normalize_activations
        if mode == "constant_norm_rescale":
            return y / state[0]
        if mode == "layer_norm":
            mu, std = state
            return y * std + mu     # SAELens's inverse: the eps is only in the division, not undone
        return y

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.normalize(x.to(self.W_enc.dtype))
        return x - self.b_dec if self.config.apply_b_dec_to_input else x

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_sae): the encoder's output before the sparsifying activation."""
        return self.encoder_input(x) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) feature activations from pre-activations."""
        arch = self.config.architecture
        if arch == "topk":
            values, indices = pre.topk(int(self.config.k), dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, indices, values.relu())
        if arch == "jumprelu":
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_sae) feature activations of (..., d_in) inputs."""
        return self.activate(self.pre_activations(x))

    def encode_topk(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """TopK SAEs only: (values (..., k) ReLU'd, indices (..., k)) of the active features, without the
        dense (..., d_sae) result (what training and the reconstruction need)."""
        values, indices = self.pre_activations(x).topk(int(self.config.k), dim=-1, sorted=False)
        return values.relu(), indices

    # ------------------------------------------------------------------------------------- decoding

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Dense (..., d_sae) activations -> (..., d_in) in the normalized space (no n^-1)."""
        return z @ self.W_dec + self.b_dec

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor, bias: bool = True,
                      offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_j values[n, j] * W_dec[indices[n, j]] (+ b_dec) for (N, k) values and indices, without forming
        the (N, d_sae) matrix (embedding_bag: one pass over the k decoder rows of each input). With `offsets`,
        values and indices are 1-D and input n's features are those from offsets[n] to offsets[n + 1] (any
        number per input)."""
        out = F.embedding_bag(indices, self.W_dec, offsets, per_sample_weights=values, mode="sum")
        return out + self.b_dec if bias else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of (..., d_in) inputs in their own (raw) space."""
        shape = x.shape
        flat = x.reshape(-1, self.d_in).to(self.W_enc.dtype)
        normalized, state = self.normalize(flat)
        encoder_in = normalized - self.b_dec if self.config.apply_b_dec_to_input else normalized
        pre = encoder_in @ self.W_enc + self.b_enc
        if self.config.architecture == "topk":
            values, indices = pre.topk(int(self.config.k), dim=-1, sorted=False)
            out = self.decode_sparse(values.relu(), indices)
        else:
            out = self.decode(self.activate(pre))
        return self.denormalize(out, state).reshape(shape)

    # ----------------------------------------------------------------------------------- bookkeeping

    def state_tensors(self) -> dict:
        """The tensors of the SAELens layout, by name (contiguous, detached)."""
        names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if self.config.architecture == "jumprelu" else [])
        return {name: getattr(self, name).detach().contiguous() for name in names}

    def load_tensors(self, tensors: dict, source: str = "the SAE") -> None:
        expected = {name: tuple(t.shape) for name, t in self.state_tensors().items()}
        for name, shape in expected.items():
            if name not in tensors:
                raise NeurolensError(f"{source} has no {name} tensor; an SAELens-layout SAE needs "
                                     f"{', '.join(expected)}")
            if tuple(tensors[name].shape) != shape:
                raise NeurolensError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {shape} "
                                     f"for d_in={self.d_in}, d_sae={self.d_sae}")
            with torch.no_grad():
                getattr(self, name).data = tensors[name].detach().clone().contiguous()
