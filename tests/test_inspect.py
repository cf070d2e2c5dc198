"""``kdbench inspect MODEL --options ...`` for every model plugin: what the model exposes,
its facts, its built shape and its capture points, each resolving to a real module of the
built model; bad input is a named error (exit 2)."""

from __future__ import annotations

import pytest
import torch

from kdbench.api import Problem
from kdbench.cli import main
from kdbench.encoders import resolve_path
from kdbench.model_inspect import inspect_model
from kdbench.registry import get_registry

TINY = "{layers: 2, hidden: 32, heads: 2, intermediate: 64}"
#: per built-in model plugin: options, and lines ``kdbench inspect`` must print
CASES = {
    "cnn": ("{channels: [8, 16]}", ['built:       {"embedding_dim": 16, "feature_channels": [8, 16]}',
                                    "  features[0]    blocks.0", "  features[1]    blocks.1"]),
    "cifar": ("{arch: resnet8}", ['"arch": "resnet8"', '"feature_channels": [16, 16, 32, 64]', "capture points: none declared"]),
    "hf": (f"{{family: roberta, tiny: {TINY}}}", ['"family": "roberta"', '"num_layers": 2', "  layers         encoder.encoder.layer",
                                                 "  attention      encoder.encoder.layer.<i>.attention.self"]),
    "bert": (f"{{tiny: {TINY}, num_layers: 1}}", ['facts:       {"hidden_size": 32, "num_heads": 2, "num_layers": 1}',
                                                 "  query          encoder.encoder.layer.<i>.attention.self.query"]),
    "causal-lm": ("{tiny: {family: gpt2, layers: 3, hidden: 32, heads: 2}, num_layers: 2}",
                  ['"num_layers": 2', "  blocks         lm.transformer.h", "exposes:     generation, logits, token_logits"]),
}


def test_every_model_plugin_has_a_case() -> None:
    assert set(CASES) == set(get_registry().names("models"))


@pytest.mark.parametrize("model", sorted(CASES))
def test_inspect_prints_what_the_model_exposes_and_where(model: str, capsys) -> None:
    options, expected = CASES[model]
    assert main(["inspect", model, "--options", options]) == 0
    out = capsys.readouterr().out
    for line in expected:
        assert line in out, (line, out)
    assert f"family:      {get_registry().model(model).family}" in out


@pytest.mark.parametrize("model", sorted(CASES))
def test_every_capture_point_resolves_to_a_module_of_the_built_model(model: str) -> None:
    import yaml

    options = yaml.safe_load(CASES[model][0])
    info = inspect_model(get_registry(), model, options)
    factory = get_registry().model(model)
    torch.manual_seed(0)
    built = factory().build(factory.Options.model_validate(options), Problem("classification", 2))
    assert info["parameters"] == sum(p.numel() for p in built.parameters())
    for name, path in info["capture_points"].items():
        if "<" in path or " " in path:  # a per-layer path or a described place: resolve the first layer's
            path = path.replace("<i>", "0").split(" ")[0].split(".<")[0]
        assert isinstance(resolve_path(built, path), torch.nn.Module), (name, path)


def test_facts_agree_with_the_built_model() -> None:
    info = inspect_model(get_registry(), "hf", {"family": "distilbert", "tiny": {"layers": 3, "hidden": 32, "heads": 4,
                                                                                 "intermediate": 64}, "num_layers": 2})
    assert {k: info["facts"][k] for k in ("num_layers", "hidden_size", "num_heads")} == \
        {k: info["built"][k] for k in ("num_layers", "hidden_size", "num_heads")} == {"num_layers": 2, "hidden_size": 32, "num_heads": 4}
    assert info["capture_points"]["layers"] == "encoder.transformer.layer"


@pytest.mark.parametrize("args,message", [
    (["nosuch"], "unknown model 'nosuch'"),
    (["cnn", "--options", "{chanels: [8]}"], "model 'cnn': invalid options: chanels: Extra inputs are not permitted"),
    (["cnn", "--options", "[1, 2]"], "--options: expected a mapping"),
    (["hf", "--options", f"{{family: robrta, tiny: {TINY}}}"], "unknown family 'robrta'. Did you mean 'roberta'"),
    (["bert", "--options", f"{{tiny: {TINY}, num_layers: 5}}"], "num_layers: 5 but the model has only 2 layers"),
])
def test_bad_input_is_a_named_error(args: list[str], message: str, capsys) -> None:
    assert main(["inspect", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
