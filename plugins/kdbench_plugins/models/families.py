"""The built-in Hugging Face encoder families: one table of where each family keeps its
layers and attention, read by the ``hf`` model factory through the registry.

Capture points (dotted paths, see :class:`kdbench.encoders.EncoderFamily`): ``layers``
from the base model to the layer list; ``attention``, ``query``, ``key``, ``value`` from
one layer. Attention probabilities always come from the model itself
(``output_attentions``); pre-softmax ``attention_scores`` only where a family's scores are
exactly ``q k^T / sqrt(d)`` of its projections (``scores_from_qk``), which the tests check
against the model's own probabilities. DeBERTa adds disentangled position terms to
``q k^T`` and ModernBERT rotates q and k after projecting, so neither claims scores (nor,
for ModernBERT, whose projection is one fused ``Wqkv``, q/k/v vectors).
"""

from __future__ import annotations

from typing import Any

from kdbench.encoders import EncoderFamily
from kdbench.hookspecs import hookimpl


class Bert(EncoderFamily):
    name = "bert"
    description = "BERT (and MiniLM, TinyBERT checkpoints): post-LN, learned positions, segment ids, pooler."
    model_types = ("bert",)
    query, key, value = "attention.self.query", "attention.self.key", "attention.self.value"
    scores_from_qk = True
    pooler = True


class Roberta(Bert):
    name = "roberta"
    description = "RoBERTa: BERT's layers, BPE tokenizer with <s>...</s>, no segment ids in its tokenizer."
    model_types = ("roberta", "camembert")

    @classmethod
    def tiny_config(cls, *args: Any) -> dict[str, Any]:
        return super().tiny_config(*args) | {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "type_vocab_size": 1}


class XLMRoberta(Roberta):
    name = "xlm-roberta"
    description = "XLM-R: RoBERTa's architecture with a multilingual SentencePiece vocabulary."
    model_types = ("xlm-roberta",)


class Electra(Bert):
    name = "electra"
    description = "ELECTRA discriminator: BERT's layers, a separate embedding width, no pooler."
    model_types = ("electra",)
    pooler = False

    @classmethod
    def tiny_config(cls, layers: int, hidden: int, *rest: Any) -> dict[str, Any]:
        return super().tiny_config(layers, hidden, *rest) | {"embedding_size": hidden}


class DistilBert(EncoderFamily):
    name = "distilbert"
    description = "DistilBERT: 6-layer BERT without segment ids or pooler; its own module and config names."
    model_types = ("distilbert",)
    layers, attention = "transformer.layer", "attention"
    query, key, value = "attention.q_lin", "attention.k_lin", "attention.v_lin"
    scores_from_qk = True
    token_type_ids = False
    dropout = ("dropout", "attention_dropout")
    num_layers_attr, num_heads_attr, hidden_size_attr = "n_layers", "n_heads", "dim"

    @classmethod
    def tiny_config(cls, layers: int, hidden: int, heads: int, intermediate: int, vocab_size: int, dropout: float) -> dict[str, Any]:
        return {"vocab_size": vocab_size, "dim": hidden, "n_layers": layers, "n_heads": heads, "hidden_dim": intermediate,
                "max_position_embeddings": 512, "dropout": dropout, "attention_dropout": dropout}


class Albert(Bert):
    name = "albert"
    description = "ALBERT: one layer's weights applied num_hidden_layers times (keeping layers keeps the first k applications)."
    model_types = ("albert",)
    layers = None
    shared_layer = "encoder.albert_layer_groups.0.albert_layers.0"  # its hooks fire once per application
    attention = "attention"
    query, key, value = "attention.query", "attention.key", "attention.value"

    @classmethod
    def tiny_config(cls, layers: int, hidden: int, *rest: Any) -> dict[str, Any]:
        return super().tiny_config(layers, hidden, *rest) | {"embedding_size": hidden}


class DebertaV2(Bert):
    name = "deberta-v2"
    description = "DeBERTa-v2/v3: disentangled attention (content and relative-position terms), no pooler."
    model_types = ("deberta-v2",)
    query, key, value = "attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"
    scores_from_qk = False  # scores add c2p/p2c position terms to q k^T
    pooler = False


class Deberta(DebertaV2):
    name = "deberta"
    description = "DeBERTa (v1): disentangled attention with a fused in_proj; probabilities only."
    model_types = ("deberta",)
    query = key = value = None


class ModernBert(EncoderFamily):
    name = "modernbert"
    description = "ModernBERT: pre-LN, rotary positions, alternating local/global attention, fused Wqkv, no segment ids."
    model_types = ("modernbert",)
    layers, attention = "layers", "attn"
    token_type_ids = False
    dropout = ("embedding_dropout", "attention_dropout", "mlp_dropout")

    @classmethod
    def tiny_config(cls, *args: Any) -> dict[str, Any]:
        return super().tiny_config(*args) | {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1,
                                             "sep_token_id": 2, "global_attn_every_n_layers": 1}


@hookimpl
def kdbench_families() -> list[type[EncoderFamily]]:
    return [Bert, Roberta, XLMRoberta, Electra, DistilBert, Albert, DebertaV2, Deberta, ModernBert]
