"""Token embeddings and LM heads of Hugging Face language models, from key names and shapes alone.

- Which keys hold one row per token of the vocabulary ("embedding-like"): input embeddings
  (`model.embed_tokens.weight`, `transformer.wte.weight`, `gpt_neox.embed_in.weight`,
  `tok_embeddings.weight`, keys ending in `embed_tokens.weight` / `word_embeddings.weight`, ...)
  and LM heads (`lm_head.weight`, `embed_out.weight`, `output.weight`).
- Where models' vocabularies differ (tokens added to a fine-tune, 32000 vs 32002): an
  embedding-like key that every input has as a 2-D tensor of one width (dim 1) and different
  row counts (dim 0).
- Whether a model ties its LM head to its input embedding (`tie_word_embeddings`): such a model is
  saved without `lm_head.weight`. Its `config.json` says so when there is one; otherwise a model
  with an input embedding and no LM head is taken as tied.

May import: merger.core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from merger.core.specs import TensorSpec

#: input embeddings: whole names, and name endings (after a dot, or the whole name)
INPUT_EMBEDDING_NAMES = frozenset({"model.embed_in.weight", "shared.weight"})
INPUT_EMBEDDING_ENDINGS = (
    "embed_tokens.weight",  # Llama, Mistral, Qwen, Gemma, OPT, BART, T5's encoder/decoder
    "word_embeddings.weight",  # BLOOM, Falcon, BERT
    "wte.weight",  # GPT-2, GPT-J, CodeGen
    "embed_in.weight",  # GPT-NeoX, Pythia
    "tok_embeddings.weight",  # Meta's original Llama checkpoints, InternLM2
)
#: LM heads: whole names, and name endings (after a dot)
LM_HEAD_NAMES = frozenset({"lm_head.weight", "embed_out.weight", "output.weight"})
LM_HEAD_ENDINGS = ("lm_head.weight",)  # e.g. language_model.lm_head.weight

TIE_FIELD = "tie_word_embeddings"


#: each kind's whole names (its endings among them), and its endings after a dot: one set lookup and one
#: `str.endswith` a key (the planner asks for every key of every input)
_INPUT_WHOLE = INPUT_EMBEDDING_NAMES | frozenset(INPUT_EMBEDDING_ENDINGS)
_INPUT_DOTTED = tuple("." + e for e in INPUT_EMBEDDING_ENDINGS)
_HEAD_WHOLE = LM_HEAD_NAMES | frozenset(LM_HEAD_ENDINGS)
_HEAD_DOTTED = tuple("." + e for e in LM_HEAD_ENDINGS)


def is_input_embedding(key: str) -> bool:
    """A whole name, or a name ending (the whole key, or after a dot) of INPUT_EMBEDDING_ENDINGS."""
    return key in _INPUT_WHOLE or key.endswith(_INPUT_DOTTED)


def is_lm_head(key: str) -> bool:
    return key in _HEAD_WHOLE or key.endswith(_HEAD_DOTTED)


def _matching(keys: Iterable[str], whole: frozenset[str], dotted: tuple[str, ...]) -> list[str]:
    """The keys (in order) that are one of `whole` or end in one of `dotted` after a dot. A model
    of 200,000 keys usually has none or a few: a set intersection and substring searches over the
    joined keys (C speed) say when none can match, before any key is tested on its own."""
    names = list(keys)
    if whole.isdisjoint(names):
        text = "\n".join(names) + "\n"
        if not any(ending + "\n" in text for ending in dotted):
            return []
    return [k for k in names if k in whole or k.endswith(dotted)]


def lm_heads(keys: Iterable[str]) -> list[str]:
    """The keys that are LM heads, in order."""
    return _matching(keys, _HEAD_WHOLE, _HEAD_DOTTED)


def input_embeddings(keys: Iterable[str]) -> list[str]:
    """The keys that are input embeddings, in order."""
    return _matching(keys, _INPUT_WHOLE, _INPUT_DOTTED)


def is_embedding_like(key: str) -> bool:
    """Whether the key holds one row per token: an input embedding or an LM head."""
    return is_input_embedding(key) or is_lm_head(key)


@dataclass(frozen=True)
class VocabMismatch:
    """An embedding-like key whose row count differs between the inputs."""

    key: str
    rows: tuple[int, ...]  # each input's dim 0, in input order
    width: int  # dim 1, the same in every input

    @property
    def shared(self) -> int:
        """The rows every input has (0..shared-1)."""
        return min(self.rows)


def vocab_mismatches(specs: Sequence[Mapping[str, TensorSpec]]) -> list[VocabMismatch]:
    """The embedding-like keys (in the first input's order) that every input has as 2-D tensors of
    one width but not one row count. Other differences are not vocabulary differences."""
    found: list[VocabMismatch] = []
    if len(specs) < 2:
        return found
    first_spec = specs[0]
    for key in _matching(first_spec, _INPUT_WHOLE | _HEAD_WHOLE, _INPUT_DOTTED + _HEAD_DOTTED):
        first = first_spec[key]
        if len(first.shape) != 2:
            continue
        others = [spec.get(key) for spec in specs[1:]]
        if any(o is None or len(o.shape) != 2 or o.shape[1] != first.shape[1] for o in others):
            continue
        rows = (first.shape[0], *(o.shape[0] for o in others if o is not None))
        if len(set(rows)) > 1:
            found.append(VocabMismatch(key, rows, first.shape[1]))
    return found


def config_ties(config: Mapping[str, Any] | None) -> bool | None:
    """`tie_word_embeddings` of a `config.json` (at its top level, else in its `text_config`, as
    multimodal models keep it); None when there is no config or it does not say."""
    if config is None:
        return None
    for place in (config, config.get("text_config")):
        if isinstance(place, Mapping) and isinstance(place.get(TIE_FIELD), bool):
            tied: bool = place[TIE_FIELD]
            return tied
    return None


@dataclass(frozen=True)
class Tying:
    """How one model's LM head relates to its input embedding."""

    heads: tuple[str, ...]  # its LM head keys
    embeddings: tuple[str, ...]  # its input embedding keys
    config: bool | None  # tie_word_embeddings in its config.json; None: no config, or it does not say
    has_config: bool = False

    @property
    def ties(self) -> bool:
        """A model with an input embedding and no LM head of its own, that does not say it is untied."""
        return not self.heads and bool(self.embeddings) and self.config is not False

    def why_tied(self, missing: str) -> str:
        if self.config:
            return f"{TIE_FIELD}: true in its config.json, and no '{missing}' in its files"
        if self.has_config:  # transformers' default is to tie
            return f"its config.json does not set {TIE_FIELD} (transformers then ties), and no '{missing}' in its files"
        return f"it has no config.json, and '{self.embeddings[0]}' but no '{missing}' in its files"


def tying(spec: Mapping[str, TensorSpec], config: Mapping[str, Any] | None) -> Tying:
    return Tying(
        tuple(lm_heads(spec)),
        tuple(input_embeddings(spec)),
        config_ties(config),
        config is not None,
    )


@dataclass(frozen=True)
class TieConflict:
    """Input `untied` has its own LM head `head`; input `tied` has none and ties it to its embedding."""

    untied: int
    tied: int
    head: str
    tied_why: str


def tie_conflict(
    specs: Sequence[Mapping[str, TensorSpec]], config: Callable[[int], Mapping[str, Any] | None]
) -> TieConflict | None:
    """The first tied / untied pair among the inputs, or None. `config(i)` gives input i's
    `config.json` (None when it has none); it is only asked for inputs that may tie."""
    heads = [next(iter(lm_heads(spec)), None) for spec in specs]  # each input's first LM head
    untied = next((i for i, head in enumerate(heads) if head is not None), None)
    if untied is None:
        return None
    head = heads[untied]
    assert head is not None
    for i, spec in enumerate(specs):
        if heads[i] is not None or not input_embeddings(spec):
            continue
        found = tying(spec, config(i))
        if found.ties:
            return TieConflict(untied, i, head, found.why_tied(head))
    return None
