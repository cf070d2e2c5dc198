"""``hf``: sequence classifiers over any Hugging Face encoder family.

One factory over ``AutoConfig``/``AutoModel``/``AutoTokenizer``; what differs between
families (where the layers and the attention live, whether the model takes segment ids,
has a pooler, or computes plain scaled dot-product scores) is declared once per family in
the registry's family table (``kdbench list families``; built-ins in
:mod:`kdbench_plugins.models.families`; docs/model-families.md adds one).

Options:

* ``pretrained``: a local folder or a hub name (its family found from ``config.model_type``;
  ``family`` may be given and must then agree), or ``minilm`` (offline MiniLM-L6).
* ``tiny``: a randomly initialised model of ``family`` and the given size; its tokenizer is
  ``tokenizer`` (a local folder or hub name) or, without one, kdbench's hashing tokenizer.
* ``layers`` / ``num_layers``: keep these encoder layers (a student cut from a teacher).
* ``pooling``: ``mean`` over real tokens, ``cls`` (position 0), or the family's ``pooler``.
* ``dropout``: the head's dropout (and a tiny config's own dropouts).
* ``freeze_word_embeddings``: keep the word-embedding matrix fixed in every role.

Outputs: logits; hidden states (embedding output, then every kept layer); the model's own
attention probabilities (``output_attentions``); pre-softmax attention scores where the
family's are ``q k^T / sqrt(d)`` (masked keys set to 0, TinyBERT's convention); q/k/v
split into heads where the family declares its projections; the pooled embedding.
Attention is the eager implementation (PyTorch's CPU ``sdpa`` has no double backward, and
MetaDistil differentiates through the student's update).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from torch import Tensor

from kdbench.api import Encoded, Examples, KDBenchError, ModelFactory, ModelFacts, Objective, Options, Problem
from kdbench.encoders import (TinyEncoderOptions, ALL_CAPABILITIES, EncoderClassifier, EncoderFamily, HashingTokenizer, build_classifier, check_vocabulary,
                              TokenizerCache, family_capabilities, resolve_pretrained, tokenizer_files_sha256, tokenizer_identity)
from kdbench.hookspecs import hookimpl
from kdbench.registry import get_registry

class HFOptions(Options):
    pretrained: str | None = Field(None, description="local folder, hub name, or 'minilm'")
    family: str | None = Field(None, description="encoder family (kdbench list families); required with tiny")
    tiny: TinyEncoderOptions | None = None
    tokenizer: str | None = Field(None, description="tokenizer folder or hub name for a tiny model (default: hashing tokenizer)")
    layers: tuple[int, ...] | None = Field(None, description="encoder layers to keep, in order")
    num_layers: int | None = Field(None, gt=0, description="keep the first k encoder layers")
    pooling: Literal["mean", "cls", "pooler"] = "mean"
    dropout: float = Field(0.1, ge=0, lt=1)
    freeze_word_embeddings: bool = Field(False, description="keep the word-embedding matrix fixed whoever trains the model")

    @model_validator(mode="after")
    def _source(self) -> "HFOptions":
        if (self.pretrained is None) == (self.tiny is None):
            raise ValueError("give exactly one of 'pretrained' or 'tiny'")
        if self.tiny is not None and self.family is None:
            raise ValueError("a tiny model needs 'family' (kdbench list families)")
        if self.pretrained is not None and self.tokenizer is not None:
            raise ValueError("'tokenizer' is for tiny models; a pretrained model uses its own")
        if self.layers is not None and self.num_layers is not None:
            raise ValueError("give at most one of 'layers' or 'num_layers'")
        return self

    def kept_layers(self, available: int, where: str) -> list[int]:
        """The layer indices to keep; KDBenchError naming ``where`` for layers it lacks."""
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < available]
            if bad:
                raise KDBenchError(f"{where}: layers {bad} out of range, the model has layers 0..{available - 1}")
            return list(self.layers)
        k = self.num_layers or available
        if k > available:
            raise KDBenchError(f"{where}: num_layers {k} but the model has only {available} layers")
        return list(range(k))


def _family(options: HFOptions, model_type: str | None) -> type[EncoderFamily]:
    registry = get_registry()
    if options.family is not None:
        family = registry.family(options.family)  # UnknownNameError (a KDBenchError) lists the known ones
        if model_type is not None and model_type not in family.model_types:
            raise KDBenchError(f"family '{family.name}' covers model types {list(family.model_types)}, but '{options.pretrained}' "
                               f"is a '{model_type}' model")
        return family
    for entry in registry.listing("families"):
        if model_type in entry.cls.model_types:
            return entry.cls
    raise KDBenchError(f"no registered model family covers '{options.pretrained}' (model type '{model_type}'); known families: "
                       f"{', '.join(registry.names('families'))}. docs/model-families.md shows how to add one")


def _config(options: HFOptions) -> tuple[Any, type[EncoderFamily], str | None]:
    """(config, family, resolved checkpoint path or None for a tiny model)."""
    from transformers import AutoConfig

    if options.tiny is not None:
        family = _family(options, None)
        t = options.tiny
        kw = family.tiny_config(t.layers, t.hidden, t.heads, t.intermediate, t.vocab_size, options.dropout)
        return AutoConfig.for_model(family.model_types[0], **kw), family, None
    path = resolve_pretrained(options.pretrained)  # type: ignore[arg-type]
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise KDBenchError(f"cannot read the configuration of pretrained model '{options.pretrained}': {exc}") from None
    return config, _family(options, config.model_type), path


_TOKENIZERS = TokenizerCache()


def _tokenizer(options: HFOptions) -> Any:
    """The model's tokenizer (loaded once per process): its checkpoint's, the ``tokenizer``
    folder's, or the hashing tokenizer of a tiny model without one."""
    source = options.tokenizer if options.tiny is not None else options.pretrained
    if source is None:
        return HashingTokenizer(options.tiny.vocab_size)  # type: ignore[union-attr]
    path = resolve_pretrained(source, "pretrained model" if options.tiny is None else "tokenizer")

    def load() -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise KDBenchError(f"cannot load the tokenizer '{source}': {exc}") from None

    return _TOKENIZERS.get(path, load)


def _tokenizer_files(options: HFOptions) -> str:
    source = options.tokenizer if options.tiny is not None else options.pretrained
    if source is None:
        return ""
    return tokenizer_files_sha256(resolve_pretrained(source, "pretrained model" if options.tiny is None else "tokenizer"))


class HFFactory(ModelFactory):
    name = "hf"
    description = ("Any Hugging Face encoder family (bert, roberta, distilbert, deberta-v2, electra, albert, xlm-roberta, modernbert, "
                   "and plugins'): pretrained folder/hub name or tiny random config, a subset of layers, pooling.")
    modality = "text"
    Options = HFOptions
    capabilities = ALL_CAPABILITIES  # the union; each family's own set is checked at validation (inspect)
    family = "transformer"

    def build(self, options: HFOptions, objective: Objective | Problem) -> EncoderClassifier:
        config, family, path = _config(options)
        kept = options.kept_layers(getattr(config, family.num_layers_attr), f"model {self._label(options)}")
        return build_classifier(family, config, path, kept, objective.num_outputs(), options.pooling,
                                options.dropout, options.freeze_word_embeddings)

    @staticmethod
    def _label(options: HFOptions) -> str:
        return f"hf {options.pretrained}" if options.pretrained else f"hf tiny {options.family}"

    def encoder_id(self, options: HFOptions) -> str:
        """The tokenizer's content identity: equal for checkpoints that ship one tokenizer."""
        tok = _tokenizer(options)
        if isinstance(tok, HashingTokenizer):
            return f"hashing{tok.vocab_size}"
        return tokenizer_identity(tok)

    def encoder_fingerprint(self, options: HFOptions) -> str:
        """The tokenizer files' content hash; '' for the file-less hashing tokenizer."""
        return _tokenizer_files(options)

    def inspect(self, options: HFOptions) -> ModelFacts:
        """The family, kept layers, width, heads, capabilities and tokenizer, from the
        config and tokenizer files alone; refuses an unknown family or checkpoint, layers
        the model lacks, a pooler it has not and a tokenizer larger than its embedding."""
        config, family, _ = _config(options)
        label = self._label(options)
        kept = options.kept_layers(getattr(config, family.num_layers_attr), f"model {label}")
        if options.pooling == "pooler" and not family.pooler:
            raise KDBenchError(f"model {label}: family '{family.name}' has no pooler; use pooling: mean or cls")
        tok = _tokenizer(options)
        check_vocabulary(tok, config.vocab_size, f"model {label}")
        first = _first_token_is_special(tok)
        facts = {"num_layers": len(kept), "hidden_size": getattr(config, family.hidden_size_attr),
                 "num_heads": getattr(config, family.num_heads_attr), "family": family.name, "first_token_special": first}
        return ModelFacts(f"{label} ({family.name})", self.family, family_capabilities(family), self.encoder_id(options), facts)

    def encode(self, options: HFOptions, examples: Examples, max_length: int | None) -> Encoded:
        max_length = max_length or 128
        texts, pairs = list(examples["text"]), examples.get("text_pair")
        tok = _tokenizer(options)
        family = _config(options)[1]
        if isinstance(tok, HashingTokenizer):
            enc = tok(texts, list(pairs) if pairs is not None else None, max_length)
        else:
            enc = tok(texts, list(pairs) if pairs is not None else None, truncation=True, max_length=max_length,
                      padding="max_length", return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if family.token_type_ids and "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out

    def collate(self, encoded: Encoded, index: Tensor) -> dict[str, Tensor]:
        """Dynamic padding: cut the batch to its longest sequence (right padding)."""
        batch = {k: v[index] for k, v in encoded.items()}
        length = max(int(batch["attention_mask"].sum(1).max()), 1)
        return {k: v[:, :length] for k, v in batch.items()}


def _first_token_is_special(tok: Any) -> bool:
    """Whether the tokenizer puts a special (classification) token at position 0."""
    if isinstance(tok, HashingTokenizer):
        return True
    ids = tok("a b")["input_ids"]
    return bool(ids) and ids[0] in set(tok.all_special_ids)


@hookimpl
def kdbench_models() -> list[type[ModelFactory]]:
    return [HFFactory]
