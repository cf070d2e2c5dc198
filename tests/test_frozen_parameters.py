"""Frozen parameters (bert ``freeze_word_embeddings``): a model's fixed parameters stay fixed
in every role, including a teacher that MetaDistil or ProKT updates, while the rest trains."""

from __future__ import annotations

import importlib

import pytest
import torch

from kdbench.api import KDBenchError, set_trainable
from kdbench.registry import get_registry, make_plugin_manager, set_registry
from kdbench_plugins.models.bert import BertFactory, BertOptions
from support.helpers_models import CLASSIFICATION, make_ctx, text_batch

WORD = "encoder.embeddings.word_embeddings.weight"
PLUGINS = ["kdbench_plugins.methods.kd", "kdbench_plugins.methods.none", "kdbench_plugins.methods.prokt",
           "kdbench_plugins.methods.metadistil"]


@pytest.fixture(autouse=True, scope="module")
def registry():
    previous = get_registry()
    pm, _ = make_plugin_manager()
    for name in PLUGINS:
        module = importlib.import_module(name)
        if not pm.is_registered(module):
            pm.register(module)
    from kdbench.registry import Registry

    set_registry(Registry(pm))
    yield
    set_registry(previous)


def bert(freeze: bool, layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    opts = BertOptions(tiny={"layers": layers, "hidden": 8, "heads": 2, "intermediate": 16, "vocab_size": 20},
                       dropout=0.0, pooling="mean", freeze_word_embeddings=freeze)
    return BertFactory().build(opts, CLASSIFICATION).double()


def test_option_freezes_only_the_word_embeddings_and_set_trainable_keeps_them_frozen():
    model = bert(True)
    assert model.frozen == frozenset({WORD})
    assert [n for n, q in model.named_parameters() if not q.requires_grad] == [WORD]
    set_trainable(model, False)
    assert not any(q.requires_grad for q in model.parameters())
    set_trainable(model, True)
    assert [n for n, q in model.named_parameters() if not q.requires_grad] == [WORD]
    assert all(q.requires_grad for q in bert(False).parameters())
    assert BertOptions(pretrained="minilm").model_dump().get("freeze_word_embeddings") is None  # old hashes kept


def test_freezing_an_unknown_parameter_is_a_named_error():
    with pytest.raises(KDBenchError, match="nope"):
        bert(False).freeze(["nope"])


@pytest.mark.parametrize("method_name", ["metadistil", "prokt"])
def test_teacher_updating_methods_leave_frozen_parameters_and_train_the_rest(method_name: str) -> None:
    registry = get_registry()
    cls = registry.method(method_name)
    params = {"teacher_optimizer": "sgd", "teacher_lr": 0.5}
    if method_name == "metadistil":
        params |= {"virtual_lr": 0.5, "teacher_grad_clip": None}
    else:
        params |= {"teacher_init": "finetuned"}
    method = cls(cls.Params(**params), CLASSIFICATION)
    student, teacher = bert(True, 1, seed=1), bert(True, 2, seed=2)
    set_trainable(teacher, True)  # as the runner does for updates_teacher methods
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.1)
    ctx = make_ctx(student, teacher, optimizer, quiz=text_batch(seed=4))
    method.check_models(student, teacher)
    method.setup(ctx)
    before_s = {n: q.detach().clone() for n, q in student.named_parameters()}
    before_t = {n: q.detach().clone() for n, q in teacher.named_parameters()}
    for step in range(1, 3):
        ctx.step = step
        method.train_step(ctx, text_batch(seed=3 + step))
    for model, before in ((student, before_s), (teacher, before_t)):
        moved = {n for n, q in model.named_parameters() if not torch.equal(q.detach(), before[n])}
        assert WORD not in moved
        assert moved, "nothing trained"
        assert {n for n in before if n.startswith("encoder.encoder.layer.0.")} & moved


def test_the_runner_keeps_a_frozen_teacher_parameter_out_of_the_teachers_optimizer(tmp_path, monkeypatch) -> None:
    """Through the runner (which switches the teacher to trainable for MetaDistil): the
    teacher optimizer MetaDistil builds gets every teacher parameter but the frozen one."""
    import kdbench_plugins.methods.metadistil as md
    from kdbench.executors.local import run_local
    from kdbench.spec import build_suite
    from support.suites import smoke_data

    seen = []
    original = md.build_teacher_optimizer

    def spy(teacher, *args, **kwargs):
        seen.append({n for n, q in teacher.named_parameters() if q.requires_grad})
        return original(teacher, *args, **kwargs)

    monkeypatch.setattr(md, "build_teacher_optimizer", spy)
    data = smoke_data(methods=[{"name": "metadistil"}], seeds=[0], budget={"steps": 2, "batch_size": 8, "eval_every": 2, "log_every": 1})
    data["teacher"]["options"]["freeze_word_embeddings"] = True
    data["students"][0]["options"]["freeze_word_embeddings"] = True
    suite = build_suite(data)
    run_local(suite, tmp_path, progress=False)
    (trainable,) = seen
    assert WORD not in trainable and "encoder.encoder.layer.0.attention.self.query.weight" in trainable
