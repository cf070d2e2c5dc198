"""Teacher model plugins that misbehave on purpose while they are fine-tuned: ``bert-faulty``
is the tiny BERT with a ``fault`` option (``nan``: its logits become NaN in train mode, so
the teacher diverges; ``die``: it SIGKILLs its process at the first train-mode forward
unless the ``marker`` file exists). Students use plain ``bert``: the encodings match.
``cnn-faulty`` is the same for the ``cnn`` model (the image smoke suite of
:mod:`support.suites`, whose processes never import transformers)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Literal

import torch

from kdbench.api import ModelOutput
from kdbench.hookspecs import hookimpl
from kdbench_plugins.models.bert import BertClassifier, BertFactory, BertOptions
from kdbench_plugins.models.cnn import CNNFactory, CNNOptions, SmallCNN


class FaultyOptions(BertOptions):
    fault: Literal["none", "nan", "die"] = "none"
    marker: str = ""


class Faulty:
    fault = "none"
    marker = ""

    def forward(self, inputs, need=frozenset()) -> ModelOutput:
        out = super().forward(inputs, need)
        if self.training and self.fault == "nan":
            out.logits = out.logits * torch.tensor(float("nan"))
        if self.training and self.fault == "die" and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return out


class FaultyBert(Faulty, BertClassifier):
    pass


class FaultyCNN(Faulty, SmallCNN):
    pass


def faulty(model, cls: type, options):
    """``model`` turned into ``cls`` (its Faulty twin) with the options' fault and marker."""
    model.__class__ = cls
    model.fault, model.marker = options.fault, options.marker
    return model


class FaultyBertFactory(BertFactory):
    name = "bert-faulty"
    description = "tiny BERT that diverges or kills its process while fine-tuned (tests only)"
    Options = FaultyOptions

    def build(self, options: FaultyOptions, problem):
        return faulty(super().build(options, problem), FaultyBert, options)

    def encoder_id(self, options) -> str:
        return BertFactory.encoder_id(self, options)


class FaultyCNNOptions(CNNOptions):
    fault: Literal["none", "nan", "die"] = "none"
    marker: str = ""


class FaultyCNNFactory(CNNFactory):
    name = "cnn-faulty"
    description = "small CNN that diverges or kills its process while fine-tuned (tests only)"
    Options = FaultyCNNOptions

    def build(self, options: FaultyCNNOptions, problem):
        return faulty(super().build(options, problem), FaultyCNN, options)


@hookimpl
def kdbench_models():
    return [FaultyBertFactory, FaultyCNNFactory]
