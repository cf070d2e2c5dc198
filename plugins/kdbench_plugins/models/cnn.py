"""``cnn``: a small convolutional network for image tasks on CPU budgets.

``stages`` conv blocks (conv3x3 -> BatchNorm -> ReLU, then 2x2 max-pool), channel widths
from ``channels``, global average pooling, a linear head. Inputs are uint8 images scaled
to [0, 1] and normalised with ``mean``/``std`` inside the model (so batches travel as
uint8 and normalisation runs batched on the device). Exposes logits, the feature map after
each stage (and before its last ReLU) and the pooled embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from kdbench.api import EMBEDDING, FEATURES, LOGITS, PREACT_FEATURES, Encoded, Examples, KDModel, ModelFactory, ModelFacts, ModelOutput, Objective, Options, Problem
from kdbench.hookspecs import hookimpl


class CNNOptions(Options):
    channels: tuple[int, ...] = Field((16, 32), min_length=1)
    in_channels: int = Field(1, gt=0)
    batchnorm: bool = True
    mean: float = 0.1307  # MNIST
    std: float = 0.3081


class SmallCNN(KDModel):
    capabilities = frozenset({LOGITS, FEATURES, PREACT_FEATURES, EMBEDDING})
    family = "cnn"

    def __init__(self, options: CNNOptions, num_outputs: int):
        super().__init__()
        self.register_buffer("mean", torch.tensor(options.mean), persistent=False)
        self.register_buffer("std", torch.tensor(options.std), persistent=False)
        blocks, c_in = [], options.in_channels
        for c in options.channels:
            blocks.append(nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1, bias=not options.batchnorm),
                                        nn.BatchNorm2d(c) if options.batchnorm else nn.Identity()))
            c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(c_in, num_outputs)
        self.channels = list(options.channels)

    def describe(self) -> dict[str, Any]:
        return {"feature_channels": self.channels, "embedding_dim": self.channels[-1]}

    def capture_points(self) -> dict[str, str]:
        """Each stage's conv+norm (its output: a preact feature; after ReLU: a feature)."""
        return {f"features[{i}]": f"blocks.{i}" for i in range(len(self.blocks))} | {"embedding": "head (its input)"}

    def forward(self, inputs: dict[str, Tensor], need: frozenset[str] = frozenset()) -> ModelOutput:
        x = inputs["pixel_values"]
        x = (x.float() / 255.0 - self.mean) / self.std if x.dtype == torch.uint8 else x
        feats, preacts = [], []
        for block in self.blocks:
            pre = block(x)
            x = torch.relu(pre)
            feats.append(x)
            preacts.append(pre)
            x = self.pool(x)
        emb = feats[-1].mean(dim=(2, 3))
        return ModelOutput(
            logits=self.head(emb),
            features=tuple(feats) if FEATURES in need else None,
            preact_features=tuple(preacts) if PREACT_FEATURES in need else None,
            embedding=emb if EMBEDDING in need else None,
        )


class CNNFactory(ModelFactory):
    name = "cnn"
    description = "Small conv net (conv-BN-ReLU-pool stages, global average pool) for image tasks on CPU."
    modality = "image"
    Options = CNNOptions
    capabilities = SmallCNN.capabilities
    family = SmallCNN.family

    def build(self, options: CNNOptions, objective: Objective | Problem) -> SmallCNN:
        return SmallCNN(options, objective.num_outputs())

    def encode(self, options: CNNOptions, examples: Examples, max_length: int | None) -> Encoded:
        return {"pixel_values": torch.as_tensor(examples["image"], dtype=torch.uint8)}

    def encoder_id(self, options: CNNOptions) -> str:
        return "image-uint8"

    def inspect(self, options: CNNOptions) -> ModelFacts:
        """Its feature maps from the options, so ``kdbench validate`` refuses a feature index beyond them."""
        facts = {"feature_channels": list(options.channels), "embedding_dim": options.channels[-1]}
        return ModelFacts(f"cnn {list(options.channels)}", self.family, self.capabilities, self.encoder_id(options), facts)


@hookimpl
def kdbench_models() -> list[type[ModelFactory]]:
    return [CNNFactory]
