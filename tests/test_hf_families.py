"""The ``hf`` factory over tiny random encoders of nine families built in code (no
downloads): every output's shape, the scores against the model's own attention
probabilities, layer selection from a saved checkpoint, and MetaDistil's exact
meta-gradient against finite differences through each family."""

from __future__ import annotations

import pytest
import torch

from kdbench.api import (ATTENTION_PROBS, ATTENTION_SCORES, EMBEDDING, HIDDEN_STATES, KEYS, LOGITS, QUERIES, VALUES, Batch, Problem)
from kdbench.encoders import resolve_path
from kdbench_plugins.methods.metadistil import MetaDistil, MetaDistilParams
from kdbench_plugins.models.hf import HFFactory, HFOptions
from support.helpers_models import make_ctx
from support.tokenizers import write_tokenizer
from test_metadistil import finite_difference, flat, ref_meta_gradient

PROBLEM = Problem("classification", 3)
FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "deberta-v2", "deberta", "modernbert"]
QK_FAMILIES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert"}  # scores are q k^T / sqrt(d)
QKV_FAMILIES = QK_FAMILIES | {"deberta-v2"}
B, L, HEADS, HIDDEN, VOCAB = 3, 7, 2, 16, 60


def tiny(family: str, layers: int = 3, seed: int = 0, **options) -> torch.nn.Module:
    torch.manual_seed(seed)
    opts = HFOptions(family=family, tiny={"layers": layers, "hidden": HIDDEN, "heads": HEADS, "intermediate": 32, "vocab_size": VOCAB},
                     dropout=0.0, **options)
    return HFFactory().build(opts, PROBLEM)


def batch(seed: int = 0, n: int = B) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (n, L), generator=g)
    ids[:, 0] = 2  # a classification token first, as tokenizers put it
    mask = torch.ones(n, L, dtype=torch.long)
    mask[0, -3:] = 0
    return Batch({"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)},
                 torch.randint(0, 3, (n,), generator=g), torch.arange(n))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_output_has_its_shape_and_attention_is_the_models_own(family):
    model = tiny(family, layers=3, num_layers=2).eval()
    caps = model.capabilities
    assert {LOGITS, HIDDEN_STATES, ATTENTION_PROBS, EMBEDDING} <= caps
    assert (ATTENTION_SCORES in caps) == (family in QK_FAMILIES) and (VALUES in caps) == (family in QKV_FAMILIES)
    b = batch()
    out = model(b.inputs, need=caps)
    assert out.logits.shape == (B, 3) and out.embedding.shape == (B, HIDDEN)
    assert len(out.hidden_states) == 3 and all(h.shape == (B, L, HIDDEN) for h in out.hidden_states)  # embeddings + 2 kept layers
    assert len(out.attention_probs) == 2
    for p in out.attention_probs:
        assert p.shape == (B, HEADS, L, L)
        torch.testing.assert_close(p.sum(-1), torch.ones(B, HEADS, L))
        assert p[0, :, :-3, -3:].abs().max() < 1e-6  # real tokens give padded keys no attention
    if family in QKV_FAMILIES:
        for name in ("queries", "keys", "values"):
            t = getattr(out, name)
            assert len(t) == 2 and all(x.shape == (B, HEADS, L, HIDDEN // HEADS) for x in t)
    if family in QK_FAMILIES:  # our scores, softmaxed over real keys, are the model's own probabilities
        bias = (1 - b.inputs["attention_mask"][:, None, None, :].float()) * -1e9
        for s, p in zip(out.attention_scores, out.attention_probs):
            assert s[0, :, :, -3:].abs().max() == 0  # masked keys -> 0, TinyBERT's convention
            torch.testing.assert_close(torch.softmax(s + bias, -1), p, atol=1e-6, rtol=1e-5)
    plain = model(b.inputs)  # nothing asked: nothing computed
    assert plain.hidden_states is plain.attention_probs is plain.values is plain.attention_scores is None
    torch.testing.assert_close(plain.logits, out.logits)
    assert model.describe() == {"num_layers": 2, "hidden_size": HIDDEN, "num_heads": HEADS, "family": family}


def test_segment_ids_reach_only_families_that_take_them():
    b = batch()
    other = Batch({**b.inputs, "token_type_ids": torch.ones_like(b.inputs["input_ids"])}, b.labels, b.index)
    for family, takes in (("bert", True), ("distilbert", False), ("modernbert", False)):
        model = tiny(family).eval()
        changed = not torch.allclose(model(b.inputs).logits, model(other.inputs).logits)
        assert changed == takes, family


@pytest.mark.parametrize("family,keep", [("roberta", [2, 0]), ("distilbert", [1]), ("deberta-v2", [0, 2]),
                                         ("modernbert", [0, 1]), ("albert", [0, 1])])
def test_layers_kept_from_a_saved_checkpoint_are_its_layers(tmp_path, family, keep):
    from transformers import AutoModel

    source = tiny(family, layers=3)
    folder = tmp_path / "ckpt"
    source.encoder.save_pretrained(str(folder))
    write_tokenizer(folder, "roberta" if family in ("roberta", "modernbert") else "bert")
    with torch.no_grad():  # the checkpoint's vocabulary must cover the tokenizer's
        assert AutoModel.from_pretrained(str(folder)).config.vocab_size == VOCAB
    cut = HFFactory().build(HFOptions(pretrained=str(folder), layers=tuple(keep), dropout=0.0), PROBLEM)
    assert cut.describe()["num_layers"] == len(keep) and cut.describe()["family"] == family
    if family == "albert":  # one shared layer: keeping [0, 1] is applying it twice
        assert cut.encoder.config.num_hidden_layers == 2
        return
    full_layers, cut_layers = source.layer_list(), cut.layer_list()
    assert len(cut_layers) == len(keep)
    for mine, i in zip(cut_layers, keep):
        for (name, a), (_, b) in zip(mine.state_dict().items(), full_layers[i].state_dict().items()):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "electra", "albert", "deberta-v2", "modernbert"])
def test_metadistil_meta_gradient_matches_finite_differences(family):
    torch.manual_seed(0)
    student, teacher = tiny(family, layers=1, seed=1).double(), tiny(family, layers=2, seed=2).double()
    teacher.eval().requires_grad_(True)
    b, quiz = batch(seed=3), batch(seed=4)
    params = {"inner": "kd", "virtual_lr": 0.5, "teacher_lr": 0.1, "teacher_optimizer": "sgd", "teacher_momentum": 0.0,
              "teacher_grad_clip": None, "alpha": 0.5, "temperature": 2.0}
    method = MetaDistil(MetaDistilParams(**params), PROBLEM)
    ctx = make_ctx(student, teacher, torch.optim.AdamW(student.parameters(), lr=1e-2), quiz=quiz, problem=PROBLEM)
    method.setup(ctx)
    ref = ref_meta_gradient(student, teacher, b, quiz, eta=0.5)
    direction = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(10), dtype=p.dtype) for n, p in teacher.named_parameters()}
    fd = finite_difference(student, teacher, b, quiz, 0.5, direction)
    grads, _, _ = method.meta_gradient(ctx, b)
    g, r = flat(grads), flat([x if x is not None else torch.zeros_like(p) for x, p in zip(ref, teacher.parameters())])
    assert g.abs().max() > 1e-6
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * r.abs().max().item())
    analytic = float(g @ flat([direction[n] for n, _ in teacher.named_parameters()]))
    assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_capture_points_are_declared_in_the_family_table():
    from kdbench.registry import get_registry

    reg = get_registry()
    assert set(FAMILIES) <= set(reg.names("families"))
    model = tiny("distilbert")
    points = reg.family("distilbert").capture_points()
    assert points["layers"] == "transformer.layer" and points["value"] == "attention.v_lin"
    assert resolve_path(model.encoder, points["layers"]) is model.encoder.transformer.layer
    assert reg.family("modernbert").capture_points()["query"] is None  # fused Wqkv, rotary: not claimed


@pytest.mark.parametrize("extra", [{"pooling": "mean"}, {"pooling": "pooler", "layers": (1, 0)}, {"pooling": "cls", "freeze_word_embeddings": True}])
def test_the_bert_factory_is_the_bert_row_of_the_family_table(extra):
    """``bert`` (kept for its stored runs' hashes) and ``hf`` with ``family: bert`` build the
    same model: the same weights for the same seed, the same outputs, dropout included."""
    from kdbench_plugins.models.bert import BertFactory, BertOptions

    size = {"layers": 2, "hidden": HIDDEN, "heads": HEADS, "intermediate": 32, "vocab_size": VOCAB}
    torch.manual_seed(0)
    old = BertFactory().build(BertOptions(tiny=size, dropout=0.1, **extra), PROBLEM)
    torch.manual_seed(0)
    new = HFFactory().build(HFOptions(family="bert", tiny=size, dropout=0.1, **extra), PROBLEM)
    a, b = old.state_dict(), new.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a) and old.frozen == new.frozen
    need = frozenset({LOGITS, HIDDEN_STATES, ATTENTION_SCORES, ATTENTION_PROBS, VALUES})
    torch.manual_seed(1)
    oa = old.train()(batch().inputs, need)
    torch.manual_seed(1)
    ob = new.train()(batch().inputs, need)
    assert torch.equal(oa.logits, ob.logits)
    for x, y in zip(oa.attention_scores + oa.values + oa.hidden_states, ob.attention_scores + ob.values + ob.hidden_states):
        assert torch.equal(x, y)


@pytest.mark.parametrize("family", ["bert", "albert"])
def test_a_deep_copy_captures_its_own_queries_keys_and_values(family):
    """case: copy.deepcopy of a model (was: the copy's q/k/v hooks still wrote into the
    original's capture, so the copy returned none and the original's were never filled)."""
    import copy
    import pickle

    model = tiny(family, layers=2).eval()
    clone = copy.deepcopy(model)
    b = batch()
    need = frozenset({QUERIES, KEYS, VALUES, ATTENTION_SCORES})
    mine, theirs = model(b.inputs, need=need), clone(b.inputs, need=need)
    assert len(theirs.queries) == len(mine.queries) == 2
    for name in ("queries", "keys", "values", "attention_scores"):
        for a, c in zip(getattr(mine, name), getattr(theirs, name)):
            torch.testing.assert_close(c, a)  # same weights: same captures
    with torch.no_grad():  # the copy's own weights, not the original's, make its captures
        q_proj = resolve_path(clone.layer_list()[0] if clone.layer_list() else resolve_path(clone.encoder, clone.encoder_family.shared_layer),
                              clone.encoder_family.query)
        q_proj.weight.mul_(2.0)
        q_proj.bias.mul_(2.0)
    changed, again = clone(b.inputs, need=need), model(b.inputs, need=need)
    torch.testing.assert_close(changed.queries[0], 2.0 * mine.queries[0])
    torch.testing.assert_close(again.queries[0], mine.queries[0])
    assert model._captured is None and clone._captured is None
    restored = pickle.loads(pickle.dumps(clone))  # the hooks are objects, so a model pickles too
    torch.testing.assert_close(restored(b.inputs, need=need).queries[0], changed.queries[0])
