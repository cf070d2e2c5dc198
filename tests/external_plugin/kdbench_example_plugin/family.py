"""``mpnet``: a Hugging Face encoder family added from outside kdbench.

MPNet's layers are BERT-like, but its attention lives one module deeper
(``attention.attn``), its projections are called ``q``/``k``/``v``, it adds a relative
position bias to ``q k^T`` (so its pre-softmax scores are not plain scaled dot-products)
and it takes no segment ids.
"""

from __future__ import annotations

from kdbench.encoders import EncoderFamily
from kdbench.hookspecs import hookimpl


class MPNet(EncoderFamily):
    name = "mpnet"
    description = "MPNet (example third-party family): BERT-like layers, relative position bias, no segment ids."
    model_types = ("mpnet",)
    layers = "encoder.layer"  # from the base model (MPNetModel) to its layer list
    attention = "attention.attn"  # from one layer to its self-attention module
    query, key, value = "attention.attn.q", "attention.attn.k", "attention.attn.v"
    scores_from_qk = False  # scores add a relative-position bias to q k^T / sqrt(d)
    token_type_ids = False
    pooler = True


@hookimpl
def kdbench_families() -> list[type[EncoderFamily]]:
    return [MPNet]
