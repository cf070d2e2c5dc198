"""A model spec's factory and the encoded splits it trains and evaluates on (public: the
step-cost benchmark and the teacher phase build their inputs the same way as a run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kdbench.api import ModelFactory
from kdbench.data import TaskData, encode_split
from kdbench.registry import Registry
from kdbench.spec import ModelSpec, RunSpec


def model_factory(registry: Registry, spec: ModelSpec) -> tuple[ModelFactory, Any]:
    """The factory of ``spec.model`` and its validated options."""
    cls = registry.model(spec.model)
    return cls(), cls.Options(**spec.options)


@dataclass
class ResolvedModel:
    """A model spec's factory and validated options, resolved once per run and handed to
    everything that builds or encodes for it; ``encoder_id`` is asked of the factory once
    (for a pretrained tokenizer it reads and hashes the tokenizer's files)."""

    factory: ModelFactory
    options: Any
    _encoder_id: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, registry: Registry, spec: ModelSpec) -> "ResolvedModel":
        return cls(*model_factory(registry, spec))

    @property
    def encoder_id(self) -> str:
        """The identity of the encoding: two models with the same one read the same tensors,
        so a run encodes each split once for both."""
        if self._encoder_id is None:
            self._encoder_id = self.factory.encoder_id(self.options)
        return self._encoder_id


def encoding_id(registry: Registry, spec: ModelSpec) -> str:
    """The identity of ``spec``'s encoding (its factory's ``encoder_id``)."""
    return ResolvedModel.of(registry, spec).encoder_id


def encoded_splits(registry: Registry, run: RunSpec, data: TaskData, model_spec: ModelSpec,
                   splits: list[str], resolved: ResolvedModel | None = None) -> tuple[ModelFactory, dict[str, dict[str, torch.Tensor]]]:
    """The splits of ``data`` (those that exist) encoded for ``model_spec`` (``resolved``:
    its factory and options already resolved for the run), cached per task, task version,
    quiz carve-out and data seed."""
    factory, options = (resolved.factory, resolved.options) if resolved is not None else model_factory(registry, model_spec)
    key = {"task": run.task.model_dump(mode="json"), "version": run.task_version, "quiz": run.quiz_fraction, "data_seed": run.data_seed}
    return factory, {s: encode_split(factory, options, data, s, key) for s in splits if s in data.splits}
