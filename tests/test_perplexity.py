"""merger.report.perplexity on a tiny random Llama built offline, against independent computations
with transformers: the model's own loss over the whole text, and per-token log-probabilities."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from merger.errors import MergerError
from merger.report.perplexity import Perplexity, perplexity

WORDS = 50
CONTEXT = 64  # the model's max_position_embeddings


def tokenizer() -> Any:
    """A whitespace word-level tokenizer of w0..w49 and <unk>; no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(WORDS)} | {"<unk>": WORDS}
    model = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder: config, safetensors weights, tokenizer."""
    folder = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=WORDS + 1,
        max_position_embeddings=CONTEXT,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(llama: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()


def text(count: int, seed: int = 0) -> str:
    return " ".join(f"w{i}" for i in np.random.default_rng(seed).integers(0, WORDS, count))


def ids_of(words: str) -> torch.Tensor:
    return torch.tensor([[int(word[1:]) for word in words.split()]])


def per_token(model: Any, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int]:
    """exp of the mean NLL, and the count, with each token t >= 1 scored by the first window that
    reaches it, unless t is that window's first token (its log-probability read off log_softmax)."""
    count = ids.shape[1]
    windows: list[tuple[int, int]] = []
    for start in range(0, count, stride):
        windows.append((start, min(start + window, count)))
        if windows[-1][1] == count:
            break
    log_probs = {}
    nll: list[float] = []
    for t in range(1, count):
        k = next(k for k, (_, end) in enumerate(windows) if end > t)
        start, end = windows[k]
        if t == start:
            continue  # nothing before it in the window
        if k not in log_probs:
            with torch.no_grad():
                log_probs[k] = torch.log_softmax(model(ids[:, start:end]).logits[0].double(), dim=-1)
        nll.append(-log_probs[k][t - start - 1, ids[0, t]].item())
    return math.exp(sum(nll) / len(nll)), len(nll)


def test_one_window_equals_the_models_loss(llama: Path, model: Any) -> None:
    words = text(40)
    ids = ids_of(words)
    with torch.no_grad():
        expected = math.exp(model(ids, labels=ids).loss.item())
    result = perplexity(llama, words, max_tokens=1000)
    assert result == Perplexity(pytest.approx(expected, rel=1e-5), 40, 39, 40, 20)  # type: ignore[arg-type]
    covering = perplexity(llama, words, max_tokens=1000, window=40, stride=40)
    assert covering.value == pytest.approx(expected, rel=1e-5)
    assert (covering.predicted, covering.window, covering.stride) == (39, 40, 40)


@pytest.mark.parametrize(("window", "stride"), [(16, 5), (16, 16), (7, 3), (CONTEXT, 2)])
def test_strided_windows_equal_per_token_log_probabilities(llama: Path, model: Any, window: int, stride: int) -> None:
    words = text(90, seed=1)
    expected, predicted = per_token(model, ids_of(words), window, stride)
    result = perplexity(llama, words, max_tokens=1000, window=window, stride=stride)
    assert result.value == pytest.approx(expected, rel=1e-5)
    assert (result.tokens, result.predicted, result.window, result.stride) == (90, predicted, window, stride)
    if stride < window:
        assert predicted == 89  # every token but the first
    else:
        assert predicted == 90 - math.ceil(90 / window)  # not the first of each window


def test_default_window_is_the_models_context(llama: Path, model: Any) -> None:
    words = text(100, seed=2)
    result = perplexity(llama, words, max_tokens=1000)
    assert (result.window, result.stride) == (CONTEXT, CONTEXT // 2)
    expected, predicted = per_token(model, ids_of(words), CONTEXT, CONTEXT // 2)
    assert result.value == pytest.approx(expected, rel=1e-5)
    assert result.predicted == predicted == 99


def test_max_tokens_cuts_the_text(llama: Path) -> None:
    words = text(60, seed=3)
    result = perplexity(llama, words, max_tokens=25, window=10, stride=4)
    assert result.tokens == 25
    cut = perplexity(llama, " ".join(words.split()[:25]), max_tokens=1000, window=10, stride=4)
    assert result == cut


def test_bad_arguments_raise(llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="the text has fewer than 2 tokens"):
        perplexity(llama, "w1", max_tokens=10)
    with pytest.raises(ValueError, match="the text has fewer than 2 tokens"):
        perplexity(llama, "", max_tokens=10)
    with pytest.raises(ValueError, match="stride must be between 1 and the window"):
        perplexity(llama, text(20), max_tokens=10, window=8, stride=9)
    with pytest.raises(ValueError, match="stride must be between 1 and the window"):
        perplexity(llama, text(20), max_tokens=10, window=8, stride=0)
    with pytest.raises(ValueError, match="longer than the model's context"):
        perplexity(llama, text(20), max_tokens=10, window=CONTEXT + 1)
    with pytest.raises(ValueError, match="max_tokens"):
        perplexity(llama, text(20), max_tokens=1)
    with pytest.raises(MergerError, match="cannot load a causal language model"):
        perplexity(tmp_path / "missing", text(20), max_tokens=10)
