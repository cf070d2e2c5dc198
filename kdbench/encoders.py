"""Shared helpers for text encoders built on Hugging Face ``transformers``: the identity of
a tokenizer (what decides whether teacher and student can share one encoding), and the
table of encoder *families* with their capture points (:class:`EncoderFamily`), which
plugins extend through the ``kdbench_model_families`` hook.

Nothing here imports ``transformers`` at module level: the core stays importable without
it, and a suite of CNNs never pays for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from kdbench.api import KDBenchError

def tokenizer_identity(tokenizer: Any) -> str:
    """A short, content-based name of what ``tokenizer`` does to text: its class and a
    sha256 of its full definition (normaliser, pre-tokeniser, vocabulary and merges,
    post-processor and special tokens for a fast tokenizer; the vocabulary and init
    arguments otherwise). Two checkpoints that ship the same tokenizer files get the same
    identity (so a run encodes once for both); any change to the vocabulary changes it."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        init = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if isinstance(v, (str, int, float, bool, type(None)))}
        digest.update(json.dumps(init, sort_keys=True, default=str).encode())
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return f"{type(tokenizer).__name__.removesuffix('Fast')}#{digest.hexdigest()[:16]}"


def check_vocabulary(tokenizer: Any, vocab_size: int, where: str) -> None:
    """Refuse a tokenizer that can emit ids the model has no embedding row for (a
    tokenizer from another checkpoint): ``len(tokenizer)`` must not exceed the model's
    ``vocab_size``. Fewer tokens than rows is normal (padded embedding matrices)."""
    n = len(tokenizer)
    if n > vocab_size:
        raise KDBenchError(f"{where}: the tokenizer has {n} tokens but the model's embedding has {vocab_size} rows, so the "
                           "tokenizer does not belong to this model (ids past the last row would fail or read other weights); "
                           "use the tokenizer saved with the checkpoint")


@dataclass(frozen=True)
class EncoderFamily:
    """One family of Hugging Face encoders and where kdbench captures its internals.

    ``model_type``: the ``config.model_type`` values it covers (``"roberta"``, ...).
    ``layers``: dotted path from the base model to its list of transformer layers
    (``"encoder.layer"``; DistilBERT ``"transformer.layer"``).
    ``attention``: dotted path from one layer to its self-attention module, the one whose
    output carries the attention probabilities under ``output_attentions`` (None: the
    family exposes no attention probabilities).
    ``query``/``key``/``value``: dotted paths from one layer to the linear projections
    (None where a family fuses them): what a method reading queries, keys or values
    (MiniLM's value relations, MiniLMv2's q/k/v relations) hooks.
    ``num_layers``/``num_heads``/``hidden_size``: the config attribute names.
    ``token_type_ids``: whether the model takes segment ids.
    ``dropout``: config attributes set from the ``dropout`` option.
    ``num_layers_config``: the attribute to lower when layers are dropped.
    """

    name: str
    model_type: tuple[str, ...]
    layers: str
    attention: str | None = None
    query: str | None = None
    key: str | None = None
    value: str | None = None
    num_layers: str = "num_hidden_layers"
    num_heads: str = "num_attention_heads"
    hidden_size: str = "hidden_size"
    token_type_ids: bool = True
    dropout: tuple[str, ...] = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def capture_points(self) -> dict[str, str | None]:
        """The family's capture points by name (what a method may ask to hook)."""
        return {"layers": self.layers, "attention": self.attention, "query": self.query, "key": self.key, "value": self.value}


def resolve_path(root: Any, dotted: str) -> Any:
    """``root.a.b.0.c`` for ``dotted = "a.b.0.c"`` (attributes, or indices into lists)."""
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
