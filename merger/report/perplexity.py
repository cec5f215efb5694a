"""The perplexity of a causal language model folder on a text: how a merged LLM is told from a broken one.

A model folder (config, safetensors weights, tokenizer) is loaded with Hugging Face transformers,
from local files only and without remote code, and scored on the text with the strided sliding
window of transformers' guide "Perplexity of fixed-length models": a text longer than the model's
window is read in windows of `window` tokens that start `stride` tokens apart; each window after
the first predicts only its last `stride` tokens (those the previous window did not reach), given
up to `window - stride` tokens of context before them. The perplexity is exp of the mean negative
log-likelihood over all predicted tokens. The first token of the text is never predicted (nothing
comes before it), nor, where `stride == window`, the first token of each window.

A smaller stride gives each prediction more context (a lower, fairer perplexity) at the cost of
more forward passes; the default, half the window, is the guide's compromise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merger.errors import Location, MergerError

#: the default window is the model's context length, at most this many tokens
MAX_DEFAULT_WINDOW = 1024


@dataclass(frozen=True)
class Perplexity:
    """The perplexity of a model on a text, with what it was computed over."""

    value: float  # exp(mean negative log-likelihood per predicted token)
    tokens: int  # tokens of the text used (after the max_tokens cut)
    predicted: int  # tokens whose likelihood was counted
    window: int  # tokens per forward pass
    stride: int  # tokens between the starts of consecutive windows


def _context_length(config: Any) -> int | None:
    """The model's maximum sequence length, as its config states it (None where it does not)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _load(model_dir: Path, device: str) -> tuple[Any, Any]:
    """The tokenizer and the model of a folder, the model in eval mode on `device`."""
    import torch
    import transformers

    where = Location(model=str(model_dir))
    fix = "give a folder with a causal language model's config.json, weights and tokenizer files"
    dtype: Any = "auto" if device.startswith("cuda") else torch.float32
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False, dtype=dtype
        )
    except (OSError, ValueError) as error:
        raise MergerError(f"cannot load a causal language model: {error}", where=where, fix=fix) from error
    return tokenizer, model.to(device).eval()


def perplexity(
    model_dir: Path,
    text: str,
    *,
    max_tokens: int,
    window: int | None = None,
    stride: int | None = None,
    device: str = "cpu",
) -> Perplexity:
    """The perplexity of the causal LM in `model_dir` on the first `max_tokens` tokens of `text`.

    `window` defaults to the model's context length, at most MAX_DEFAULT_WINDOW; a window is never
    longer than the text. `stride` defaults to half the window; 1 <= stride <= window.
    """
    import torch

    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, not {max_tokens}")
    if window is not None and window < 2:
        raise ValueError(f"window must be at least 2 tokens, not {window}")
    if window is not None and stride is not None and not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and the window ({window}), not {stride}")
    tokenizer, model = _load(model_dir, device)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(device)
    count = int(ids.shape[1])
    if count < 2:
        raise ValueError("the text has fewer than 2 tokens")
    limit = _context_length(model.config)
    if window is not None and limit is not None and window > limit:
        raise ValueError(f"window {window} is longer than the model's context of {limit} tokens")
    requested = window if window is not None else min(limit or MAX_DEFAULT_WINDOW, MAX_DEFAULT_WINDOW)
    if stride is not None and not 1 <= stride <= requested:
        raise ValueError(f"stride must be between 1 and the window ({requested}), not {stride}")
    size = min(requested, count)
    step = max(1, size // 2) if stride is None else min(stride, size)

    total_nll = 0.0
    predicted = 0
    previous_end = 0
    with torch.inference_mode():
        for begin in range(0, count, step):
            end = min(begin + size, count)
            labels = ids[:, begin:end].clone()
            labels[:, : labels.shape[1] - (end - previous_end)] = -100  # context only: predicted before
            valid = int((labels[:, 1:] != -100).sum())  # the model shifts: the window's first is not predicted
            if valid:
                loss = model(ids[:, begin:end], labels=labels).loss
                total_nll += loss.item() * valid
                predicted += valid
            previous_end = end
            if end == count:
                break
    return Perplexity(math.exp(total_nll / predicted), count, predicted, size, step)
