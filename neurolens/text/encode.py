"""The one text encoder of neurolens: texts -> (N, D) float32 L2-normalized CLIP text embeddings.

encode_texts tokenizes with the model's own tokenizer and runs the text transformer only up to each batch's
longest end-of-text token (exact under the causal mask: the pooled position cannot see later tokens), so the
result equals open_clip's encode_text (to float rounding) at a fraction of the cost for short texts. Towers
where truncation is not exact (HF text models, 'last' pooling, no causal mask) run encode_text in full.
Every job that embeds texts (text rankings, the zero-shot NSFW prompts and text scores, the similarity probe,
the toy's zero-shot check) calls encode_texts.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NeurolensError

Progress = Optional[Callable[[int, int], None]]
_TRUNCATABLE_POOLS = ("argmax", "eos", "first")


def tokenize(clip, texts: Sequence[str]) -> torch.Tensor:
    """(N, context) token ids with the model's own tokenizer (CPU, int64)."""
    return clip.tokenizer(list(texts)).to(torch.long)


def pool_positions(model: torch.nn.Module, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """The token position each text's embedding is read from, as open_clip's text_global_pool picks it;
    None when the pooled position is not determined by the tokens (then truncation is not exact)."""
    pool = getattr(model, "text_pool_type", None)
    if pool == "argmax":   # CLIP: the end-of-text token has the highest id
        return tokens.argmax(dim=-1)
    if pool == "eos":
        eos = getattr(model, "text_eos_id", None)
        return None if eos is None else (tokens == eos).int().argmax(dim=-1)
    if pool == "first":
        return torch.zeros(tokens.shape[0], dtype=torch.long)
    return None


def can_truncate(model: torch.nn.Module) -> bool:
    """True for open_clip's built-in text tower with a causal mask and a token-determined pool position
    (every CLIP model); other towers (HF text models, 'last' pooling, no causal mask) run in full."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    return (all(getattr(model, name, None) is not None for name in needed)
            and getattr(model, "text_pool_type", None) in _TRUNCATABLE_POOLS)


def encode_tokens_truncated(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text (unnormalized) run over only the first max(positions)+1 tokens.

    Exact: under the causal mask position p attends only to positions <= p, so the tokens after the
    pooled position cannot change its output; the positional embedding and mask are sliced to match."""
    length = int(positions.max().item()) + 1
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    mask = model.attn_mask[:length, :length]
    if hasattr(model.transformer, "batch_first"):
        x = model.transformer(x, attn_mask=mask)  # batch-first interface, whatever its inner layout
    else:  # open_clip < 2.26: the text transformer takes and returns (L, N, D)
        x = model.transformer(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), positions]
    projection = model.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return x


def encode_texts(clip, texts: Sequence[str], batch_size: int = 256, progress: Progress = None,
                 truncate: bool = True) -> np.ndarray:
    """(N, D) float32 L2-normalized text embeddings, in the order of `texts`.

    Texts are sorted by token length into batches (about batch_size * 8 token positions each) and each
    batch runs the text transformer only up to its longest text's end-of-text token (instead of all 77
    positions); the result equals encode_text."""
    texts = list(texts)
    if not texts:
        raise NeurolensError("no texts to encode; give a vocabulary with at least one entry")
    return encode_tokens(clip, tokenize(clip, texts), batch_size=batch_size, progress=progress, truncate=truncate)


TOKENS_PER_TEXT_BUDGET = 8


def _batches(positions: Optional[torch.Tensor], count: int, batch_size: int) -> List[torch.Tensor]:
    """Index batches. Untruncated: `batch_size` texts in order. Truncated: texts sorted by length, each batch
    as many as fit in batch_size * 8 token positions at its longest text's length (so a batch of one-word
    texts holds ~700 of them and little is padding), never fewer than one."""
    if positions is None:
        return [torch.arange(start, min(count, start + batch_size)) for start in range(0, count, batch_size)]
    order = torch.argsort(positions, stable=True)
    lengths = (positions[order] + 1).tolist()
    budget = batch_size * TOKENS_PER_TEXT_BUDGET
    batches, start = [], 0
    while start < count:
        stop = start + 1
        # sorted ascending, so the last text of a batch is its longest
        while stop < count and (stop + 1 - start) * lengths[stop] <= budget:
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


def encode_tokens(clip, tokens: torch.Tensor, batch_size: int = 256, progress: Progress = None,
                  truncate: bool = True) -> np.ndarray:
    """encode_texts for already tokenized texts (N, context); the order of the rows is kept."""
    model = clip.model
    count = tokens.shape[0]
    positions = pool_positions(model, tokens) if truncate and can_truncate(model) else None
    batch_size = max(1, int(batch_size))
    out: Optional[torch.Tensor] = None
    done = 0
    with torch.inference_mode():
        for index in _batches(positions, count, batch_size):
            batch = tokens[index].to(clip.device)
            if positions is not None:
                emb = encode_tokens_truncated(model, batch, positions[index].to(clip.device))
            else:
                emb = model.encode_text(batch)
            if out is None:
                out = torch.empty(count, emb.shape[-1], dtype=torch.float32)
            out[index] = F.normalize(emb.float(), dim=-1).cpu()
            done += len(index)
            if progress is not None:
                progress(done, count)
    return out.numpy()
