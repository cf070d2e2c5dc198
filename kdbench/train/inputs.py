"""A model spec's factory and the encoded splits it trains and evaluates on (public: the
step-cost benchmark and the teacher phase build their inputs the same way as a run)."""

from __future__ import annotations

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


def encoding_id(registry: Registry, spec: ModelSpec) -> str:
    """The identity of ``spec``'s encoding (its factory's ``encoder_id``): two models with
    the same one read the same tensors, so a run encodes the split once for both."""
    factory, options = model_factory(registry, spec)
    return factory.encoder_id(options)


def encoded_splits(registry: Registry, run: RunSpec, data: TaskData, model_spec: ModelSpec,
                   splits: list[str]) -> tuple[ModelFactory, dict[str, dict[str, torch.Tensor]]]:
    """The splits of ``data`` (those that exist) encoded for ``model_spec``, cached per
    task, task version, quiz carve-out and data seed."""
    factory, options = model_factory(registry, model_spec)
    key = {"task": run.task.model_dump(mode="json"), "version": run.task_version, "quiz": run.quiz_fraction, "data_seed": run.data_seed}
    return factory, {s: encode_split(factory, options, data, s, key) for s in splits if s in data.splits}
