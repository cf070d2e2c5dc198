"""Decoding for causal language models, and the input layout that generation tasks,
causal-LM model factories and language-model methods share.

**The prompt/response layout.** A causal-LM batch (``Batch.inputs``) holds

* ``prompt_ids`` ``(B, P)``: the prompts, **left**-padded to a common length ``P``;
* ``prompt_mask`` ``(B, P)``: 1 at real prompt tokens;
* ``response_ids`` ``(B, R)``: the responses (a reference, a teacher's output or a
  sample), **right**-padded, each ending with the end-of-sequence token unless cut;
* ``response_mask`` ``(B, R)``: 1 at the response tokens that count.

The model reads ``prompt ++ response`` (:func:`join`) and returns one next-token distribution per
response position (``ModelOutput.logits`` ``(B, R, V)``), the prompt masked out by
construction. Left-padded prompts make batched decoding a plain append.

:func:`decode` runs greedy or sampled decoding over any module with the Hugging Face
causal-LM call (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values`` or ``cache``, ``use_cache`` -> ``.logits`` and the cache), with or
without the key/value cache, drawing samples from a given ``torch.Generator`` (a run's
named stream, ``StepContext.generator``) so reruns give the same samples.
"""

from __future__ import annotations

import hashlib
import inspect
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from kdbench.api import (GENERATION, LOGITS, STUDENT, TOKEN_LOGITS, Batch, IncompatibleModelError, KDBenchError, KDModel, Method,
                         StepContext, Task)

PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK = "prompt_ids", "prompt_mask", "response_ids", "response_mask"


class GenerationError(KDBenchError):
    """Decoding asked for something impossible (no end-of-sequence token, a length cap
    below 1, a prompt longer than the model's context)."""


@dataclass
class Generation:
    """What :func:`decode` produced: ``tokens`` ``(B, N)`` (``N <= max_new_tokens``),
    padded with ``pad_token_id`` after each sequence's first end-of-sequence token;
    ``mask`` ``(B, N)``: 1 at generated tokens up to and including that token;
    ``hit_cap`` ``(B,)``: sequences that never emitted it (the length cap ended them);
    ``seconds``: wall time of the decoding; ``forward_tokens``: positions the model
    processed (the cache's saving shows here)."""

    tokens: Tensor
    mask: Tensor
    hit_cap: Tensor
    seconds: float
    forward_tokens: int


class PromptResponseTask(Task):
    """Base of tasks whose examples are a prompt and a reference response. A subclass sets
    ``objective`` (the registered objective that scores it, as a class attribute) and
    ``main_metric``; its options carry ``max_length`` (prompt plus response tokens) and
    ``max_new_tokens`` (the decoding cap), which this base exposes."""

    @property
    def max_new_tokens(self) -> int:
        return self.options.max_new_tokens  # type: ignore[attr-defined]

    @property
    def max_length(self) -> int:  # type: ignore[override]
        return self.options.max_length  # type: ignore[attr-defined]


def positions(mask: Tensor) -> Tensor:
    """Position ids for a left-padded attention mask: 0 at the first real token (padding
    positions get 0 too; they are masked)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_argument(lm: nn.Module) -> str:
    """The name under which ``lm`` takes and returns its key/value cache: ``cache`` in
    recent transformers, ``past_key_values`` before (still accepted there, deprecated)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def last_logits_argument(lm: nn.Module) -> dict[str, int]:
    """The keyword that asks ``lm`` for the logits of the last position only
    (``logits_to_keep=1``, ``num_logits_to_keep`` in older transformers), or ``{}`` where
    its forward has none: decoding reads no other position, and the output projection
    over a whole sequence (a vocabulary of 50k for a real tokenizer) is much of a
    no-cache step."""
    params = inspect.signature(lm.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def next_token(logits: Tensor, greedy: bool, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One token per row of ``logits`` ``(B, V)``: the argmax (lowest id on ties), or a
    draw from ``softmax(logits / temperature)`` with ``generator``."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode(lm: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int,
           greedy: bool = True, temperature: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
           max_positions: int | None = None) -> Generation:
    """Decode up to ``max_new_tokens`` tokens after left-padded prompts (see the module
    doc), greedily or by sampling at ``temperature`` with ``generator``, with the
    key/value cache (``use_cache``: one new position per step, the model's own cache
    object) or without (the whole sequence again every step: the same tokens,
    quadratically more work). Stops early once every sequence has emitted
    ``eos_token_id``. The module is put in eval mode for the call and restored after.
    ``max_positions``: the model's context; a prompt plus cap beyond it is a
    :class:`GenerationError`.

    The work per step that does not belong to the model is fixed, whatever the length:
    the token, mask and position buffers of the whole ``prompt + max_new_tokens`` are
    allocated once, each step passes views of them (no concatenation that grows with the
    length, no cumulative sum over the mask) and writes one column. After the first step
    only the last position's logits are asked for where the model can say so
    (:func:`last_logits_argument`: a no-cache step then projects one position, as a
    cached step does). The first step still projects every prompt position, as it always
    has: the output projection of one row is not always bit-identical to that row of
    the whole matrix's (BLAS kernels differ with the row count), and the first token
    must stay the one the stored runs drew. The one host sync per step is the early-stop
    test."""
    if eos_token_id is None:
        raise GenerationError("decoding needs an end-of-sequence token; the tokenizer has none (set one in the model's options)")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise GenerationError(f"sampling temperature must be positive, got {temperature}")
    if max_positions is not None and prompt_ids.shape[1] + max_new_tokens > max_positions:
        raise GenerationError(f"prompt length {prompt_ids.shape[1]} plus {max_new_tokens} new tokens exceeds the model's context of {max_positions}")
    was_training = lm.training
    lm.eval()
    device = prompt_ids.device
    _sync(device)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():  # less bookkeeping per operator than no_grad (no version counters or view tracking)
            gen = _decode_steps(lm, prompt_ids, prompt_mask, max_new_tokens, eos_token_id, pad_token_id, greedy, temperature, generator,
                                use_cache)
        _sync(device)
        # inference tensors cannot be saved for backward, and the tokens feed training forwards: copies made outside the mode
        return Generation(gen.tokens.clone(), gen.mask.clone(), gen.hit_cap.clone(), time.perf_counter() - t0, gen.forward_tokens)
    finally:
        lm.train(was_training)


def _decode_steps(lm: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                  greedy: bool, temperature: float, generator: torch.Generator | None, use_cache: bool) -> Generation:
    """:func:`decode`'s loop (the model in eval mode, inside inference mode); ``seconds`` left 0."""
    cache_arg, last_only = cache_argument(lm), last_logits_argument(lm)
    device = prompt_ids.device
    b, p = prompt_ids.shape
    # Every generated position is a real token (rows that ended keep decoding padding,
    # masked in the output), so the whole mask and its positions are known up front.
    mask = torch.cat([prompt_mask.long(), torch.ones(b, max_new_tokens, dtype=torch.long, device=device)], dim=1)
    pos = positions(mask)
    ids = torch.full((b, p + max_new_tokens), pad_token_id, dtype=prompt_ids.dtype, device=device)
    ids[:, :p] = prompt_ids
    out_mask = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    past: Any = None
    processed = 0
    n = 0
    for n in range(max_new_tokens):
        end = p + n  # positions known so far; the next token goes to ids[:, end]
        start = 0 if (n == 0 or not use_cache) else end - 1
        step = {"input_ids": ids[:, start:end], "attention_mask": mask[:, :end], "position_ids": pos[:, start:end]}
        keep = last_only if n else {}  # the first step's logits as they always were: see the doc
        if use_cache:
            out = lm(**step, use_cache=True, **{cache_arg: past}, **keep)
            past = getattr(out, cache_arg)
        else:
            out = lm(**step, use_cache=False, **keep)
        processed += b * (end - start)
        token = next_token(out.logits[:, -1, :], greedy, temperature, generator).masked_fill_(done, pad_token_id)
        ids[:, end] = token
        out_mask[:, n] = ~done
        done |= token == eos_token_id
        if bool(done.all()):
            break
    width = n + 1
    return Generation(ids[:, p:p + width], out_mask[:, :width], ~done, 0.0, processed)


def with_response(inputs: dict[str, Tensor], tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """A copy of a prompt/response batch with its responses replaced by ``tokens`` and
    ``mask`` (a :class:`Generation`'s): the teacher-forced inputs for on-policy losses."""
    return {**inputs, RESPONSE_IDS: tokens, RESPONSE_MASK: mask.to(inputs[RESPONSE_MASK].dtype)}


def join(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, position_ids, response_index)`` of ``prompt ++
    response`` for a teacher-forced forward pass, each row **compacted** (its prompt
    padding moved to the end, so no position is a query with every key masked: some
    attention kernels turn such rows into NaN, which then leaks through ``0 * NaN`` into
    real positions); the same computation as the left-padded row with its position ids.
    ``response_index`` ``(B, R)``: the positions whose logits predict the response tokens
    (:func:`response_logits`)."""
    prompt_mask = inputs[PROMPT_MASK].long()
    ids = torch.cat([inputs[PROMPT_IDS], inputs[RESPONSE_IDS]], dim=1)
    mask = torch.cat([prompt_mask, inputs[RESPONSE_MASK].long()], dim=1)
    length = ids.shape[1]
    shift = prompt_mask.shape[1] - prompt_mask.sum(1)  # left padding of each row
    source = torch.arange(length, device=ids.device)[None, :] + shift[:, None]
    inside = source < length
    source = source.clamp(max=length - 1)
    ids = ids.gather(1, source)  # the moved-out tail repeats the last token, masked
    mask = mask.gather(1, source) * inside.long()
    plen = prompt_mask.sum(1)
    index = plen[:, None] - 1 + torch.arange(inputs[RESPONSE_IDS].shape[1], device=ids.device)[None, :]
    return ids, mask, positions(mask), index


def response_logits(logits: Tensor, index: Tensor) -> Tensor:
    """``logits`` ``(B, L, V)`` of a joined sequence at ``index`` ``(B, R)`` (:func:`join`)."""
    return logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1]))


def response_targets(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(targets, mask)`` of a prompt/response batch: the response tokens ``(B, R)`` the
    logits predict, and the mask of those that count."""
    return inputs[RESPONSE_IDS], inputs[RESPONSE_MASK].bool()


def check_same_vocabulary(method: str, student: KDModel | None, teacher: KDModel | None) -> None:
    """Refuse a teacher and student whose output vocabularies differ in size (read from
    ``describe()["vocab_size"]``): no token-level divergence compares them. Tokenizers of
    equal size but different tokens are refused earlier, by the method's
    ``aligned_positions`` (their encodings differ)."""
    if student is None or teacher is None:
        return
    vs, vt = student.describe().get("vocab_size"), teacher.describe().get("vocab_size")
    if vs is not None and vt is not None and vs != vt:
        raise IncompatibleModelError(f"method '{method}' compares per-token distributions, but the student's vocabulary has {vs} "
                                     f"tokens and the teacher's {vt}; use a teacher and student with one tokenizer")


def sample_batch(ctx: StepContext, model: KDModel, batch: Batch, max_new_tokens: int, temperature: float, stream: str,
                 greedy: bool = False) -> tuple[Batch, Generation]:
    """``batch`` with its responses replaced by ``model``'s own (sampled at ``temperature``
    from the run's random stream ``stream`` on the training device, or greedy), with
    the KV cache; the decoding time goes to ``ctx.timings["generation"]``, its steps to the
    run's decode passes (``ctx.passes``). Teacher and
    student read the same new responses (methods that call this declare aligned
    positions, so the two share one encoding)."""
    with ctx.timed("generation"):
        gen = model.generate(batch.inputs_for(STUDENT), max_new_tokens, greedy=greedy, temperature=temperature,  # type: ignore[operator]
                             generator=None if greedy else ctx.generator(stream, ctx.device), use_cache=True)
    if ctx.passes is not None:  # one decode step per generated position (kdbench.compute; no FLOPs counted for them)
        ctx.passes.add("student" if model is ctx.student else "teacher", "decode", int(gen.tokens.shape[1]))
    inputs = with_response(batch.inputs_for(STUDENT), gen.tokens, gen.mask)
    return Batch(inputs, batch.labels, batch.index), gen


class TokenMethod(Method):
    """Base of methods that compare teacher and student next-token distributions position
    by position over the prompt/response layout: both must expose per-token logits
    (``token_logits``), share one tokenizer (``aligned_positions``: a pair with two
    encodings is refused at ``kdbench validate``) and one vocabulary size
    (:func:`check_same_vocabulary`). Set ``on_policy = True`` for methods that sample
    from the student (the student must then also decode: ``generation``)."""

    aligned_positions = "per-token distributions at the same response positions over one vocabulary"
    on_policy: bool = False
    student_needs = frozenset({LOGITS, TOKEN_LOGITS})
    teacher_needs = frozenset({LOGITS, TOKEN_LOGITS})

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.on_policy:
            cls.student_needs = frozenset(cls.student_needs | {GENERATION})

    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        super().check_models(student, teacher)
        if self.uses_teacher:
            check_same_vocabulary(self.name, student, teacher)


def split_digest(batches: Iterator[Batch]) -> str:
    """A short sha256 of the inputs of a pass over a split (both roles): part of a teacher
    cache's name, so a cache built from another encoding or carve-out is never read."""
    digest = hashlib.sha256()
    for batch in batches:
        for inputs in (batch.inputs, batch.teacher_inputs):
            for key in sorted(inputs):
                digest.update(key.encode())
                digest.update(inputs[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def use_topk_teacher(ctx: StepContext, k: int, batch_size: int = 64) -> dict[str, Tensor]:
    """Make ``ctx.teacher_forward`` answer from the fixed teacher's top-``k`` next-token
    log-probabilities over the training split's reference responses, computed once
    (``ctx.teacher_cache``: kept with a checksum beside the teacher and shared by every
    method and seed) instead of a teacher forward pass per step. The logits it returns
    are :func:`kdbench.token_losses.dense_topk_logits`: the teacher's distribution
    **renormalised over its k most likely tokens** (0 elsewhere); a loss's temperature
    ``T`` then gives the tempered teacher renormalised over the same k tokens exactly
    (``softmax(log p / T)`` is proportional to ``p^(1/T)``). Only for off-policy losses
    on the fixed responses (``batch.index`` rows of the training split), and only for
    divergences that stay finite under truncation (forward KL, skew KL/RKL, TAID).
    Returns the cache (``log_probs`` ``(N, R, k)``, ``indices`` ``(N, R, k)`` int32)."""
    from kdbench.api import ModelOutput
    from kdbench.token_losses import dense_topk_logits, topk_log_probs

    if ctx.train_batches is None or ctx.teacher is None:
        raise KDBenchError("a top-k teacher cache needs the training split and a teacher (StepContext.train_batches, .teacher)")
    teacher, vocab = ctx.teacher, None

    def compute() -> dict[str, Tensor]:
        values, indices = [], []
        was = teacher.training
        teacher.eval()
        with torch.no_grad():
            for batch in ctx.train_batches(batch_size):  # type: ignore[misc]
                v, i = topk_log_probs(teacher(batch.teacher_inputs, need=frozenset({LOGITS, TOKEN_LOGITS})).logits, k)
                values.append(v.float().cpu())
                indices.append(i.int().cpu())
        teacher.train(was)
        width = max(v.shape[1] for v in values)
        pad = lambda t, fill: torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1]), value=fill)  # noqa: E731
        return {"log_probs": torch.cat([pad(v, 0.0) for v in values]), "indices": torch.cat([pad(i, 0) for i in indices])}

    name = f"topk-k{k}-{split_digest(ctx.train_batches(batch_size))}"
    cache = {key: t.to(ctx.device) for key, t in ctx.teacher_cache(name, compute).items()}
    vocab = int(teacher.describe().get("vocab_size") or 0)

    def teacher_forward(batch: Batch, need: frozenset[str]) -> ModelOutput:
        width = batch.teacher_inputs[RESPONSE_IDS].shape[1]
        rows = batch.index.to(ctx.device)
        logits = dense_topk_logits(cache["log_probs"][rows, :width], cache["indices"][rows, :width], vocab)
        return ModelOutput(logits=logits, attention_mask=batch.teacher_inputs[RESPONSE_MASK], mask=batch.teacher_inputs[RESPONSE_MASK].bool())

    ctx.teacher_forward = teacher_forward
    return cache
