"""``kdbench inspect MODEL``: what a model plugin builds from a set of options, before a
suite uses it: its family, the outputs it can give (what methods may ask for), the facts
``kdbench validate`` checks methods against (layers, width, heads, tokenizer), and its
capture points (the modules its hidden states, attention or features are read from).

Works for every model plugin: the facts come from the factory's
:meth:`~kdbench.api.ModelFactory.inspect` where it has one (a config read, no weights);
the built model's :meth:`~kdbench.api.KDModel.describe` and
:meth:`~kdbench.api.KDModel.capture_points` from building it once on the CPU, with a
two-output head (a task's objective sizes the head in a run; the head changes nothing
shown here). Bad options are the same named errors as at ``kdbench validate``.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from kdbench.api import KDBenchError, Problem
from kdbench.registry import Registry

#: the head the model is built with for inspection (any width would show the same)
PLACEHOLDER = Problem("classification", 2)


def _options(factory: type, name: str, options: dict[str, Any]) -> Any:
    try:
        return factory.Options.model_validate(options)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(options)'}: {e['msg']}" for e in err.errors())
        raise KDBenchError(f"model '{name}': invalid options: {problems}") from None


def inspect_model(registry: Registry, name: str, options: dict[str, Any], build: bool = True) -> dict[str, Any]:
    """What ``kdbench inspect`` shows of model ``name`` with ``options``, as a dict:
    ``model``, ``family``, ``modality``, ``exposes`` (capabilities), ``facts`` (from the
    factory's inspect; None where it reads nothing before building), ``encoder`` (the
    tokenizer or input encoding's identity) and, when ``build``, ``built`` (describe()),
    ``parameters`` and ``capture_points``. Raises :class:`KDBenchError` (an unknown model,
    bad options, a checkpoint or tokenizer that does not fit)."""
    factory_cls = registry.entries["models"].get(name)
    if factory_cls is None:
        raise KDBenchError(registry.unknown_message("models", name))
    cls = factory_cls.cls
    opts = _options(cls, name, options)
    factory = cls()
    facts = factory.inspect(opts)
    out: dict[str, Any] = {
        "model": facts.name if facts is not None else name, "family": cls.family, "modality": cls.modality,
        "exposes": sorted(facts.capabilities if facts is not None else cls.capabilities),
        "facts": facts.describe() if facts is not None else None,
        "encoder": facts.encoder_id if facts is not None else factory.encoder_id(opts),
    }
    if build:
        import torch

        torch.manual_seed(0)
        model = factory.build(opts, PLACEHOLDER)
        out["exposes"] = sorted(model.capabilities)
        out["built"] = model.describe()
        out["parameters"] = sum(p.numel() for p in model.parameters())
        out["capture_points"] = model.capture_points()
    return out


def format_inspection(info: dict[str, Any]) -> list[str]:
    """``info`` (from :func:`inspect_model`) as the lines ``kdbench inspect`` prints."""
    lines = [f"model:       {info['model']}", f"family:      {info['family']}", f"modality:    {info['modality']}",
             f"encoder:     {info['encoder']}", f"exposes:     {', '.join(info['exposes'])}"]
    if info["facts"] is not None:
        lines.append(f"facts:       {json.dumps(info['facts'], sort_keys=True)}  (what validate checks methods against)")
    if "built" in info:
        lines.append(f"built:       {json.dumps(info['built'], sort_keys=True)}")
        lines.append(f"parameters:  {info['parameters']:,} (with a 2-output head; a task's objective sizes it in a run)")
        points = info["capture_points"]
        lines.append("capture points:" + ("" if points else " none declared"))
        lines += [f"  {k:<14} {v}" for k, v in points.items()]
    return lines
