"""Decoding for causal language models, and the input layout that generation tasks,
causal-LM model factories and language-model methods share.

**The prompt/response layout.** A causal-LM batch (``Batch.inputs``) holds

* ``prompt_ids`` ``(B, P)``: the prompts, **left**-padded to a common length ``P``;
* ``prompt_mask`` ``(B, P)``: 1 at real prompt tokens;
* ``response_ids`` ``(B, R)``: the responses (a reference, a teacher's output or a
  sample), **right**-padded, each ending with the end-of-sequence token unless cut;
* ``response_mask`` ``(B, R)``: 1 at the response tokens that count.

The model reads ``prompt ++ response`` and returns one next-token distribution per
response position (``ModelOutput.logits`` ``(B, R, V)``), the prompt masked out by
construction. Left-padded prompts make batched decoding a plain append.

:func:`decode` runs greedy or sampled decoding over any module with the Hugging Face
causal-LM call (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values`` or ``cache``, ``use_cache`` -> ``.logits`` and the cache), with or
without the key/value cache, drawing samples from a given ``torch.Generator`` (a run's
named stream, ``StepContext.generator``) so reruns give the same samples.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdbench.api import KDBenchError

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


def next_token(logits: Tensor, greedy: bool, temperature: float, generator: torch.Generator | None) -> Tensor:
    """One token per row of ``logits`` ``(B, V)``: the argmax (lowest id on ties), or a
    draw from ``softmax(logits / temperature)`` with ``generator``."""
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def decode(lm: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int, eos_token_id: int | None, pad_token_id: int,
           greedy: bool = True, temperature: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
           max_positions: int | None = None) -> Generation:
    """Decode up to ``max_new_tokens`` tokens after left-padded prompts (see the module
    doc), greedily or by sampling at ``temperature`` with ``generator``, with the
    key/value cache (``use_cache``: one new position per step) or without (the whole
    sequence again every step: the same tokens, quadratically more work). Stops early
    once every sequence has emitted ``eos_token_id``. The module is put in eval mode
    for the call and restored after. ``max_positions``: the model's context; a prompt
    plus cap beyond it is a :class:`GenerationError`."""
    if eos_token_id is None:
        raise GenerationError("decoding needs an end-of-sequence token; the tokenizer has none (set one in the model's options)")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise GenerationError(f"sampling temperature must be positive, got {temperature}")
    if max_positions is not None and prompt_ids.shape[1] + max_new_tokens > max_positions:
        raise GenerationError(f"prompt length {prompt_ids.shape[1]} plus {max_new_tokens} new tokens exceeds the model's context of {max_positions}")
    cache_arg = cache_argument(lm)
    was_training = lm.training
    lm.eval()
    device = prompt_ids.device
    b = prompt_ids.shape[0]
    _sync(device)
    t0 = time.perf_counter()
    try:
        ids, mask = prompt_ids, prompt_mask.long()
        out_tokens = torch.full((b, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        out_mask = torch.zeros(b, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        past: Any = None
        processed = 0
        step_ids, step_pos = ids, positions(mask)
        n = 0
        for n in range(max_new_tokens):
            if use_cache:
                out = lm(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **{cache_arg: past})
                past = getattr(out, cache_arg)
                processed += step_ids.numel()
            else:
                out = lm(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False)
                processed += ids.numel()
            token = next_token(out.logits[:, -1, :], greedy, temperature, generator)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            out_tokens[:, n] = token
            out_mask[:, n] = (~done).long()
            done = done | (token == eos_token_id)
            ids = torch.cat([ids, token[:, None]], dim=1)
            new_pos = positions(mask)[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=device)], dim=1)
            step_ids, step_pos = token[:, None], new_pos
            if bool(done.all()):
                break
        width = n + 1
        _sync(device)
        return Generation(out_tokens[:, :width], out_mask[:, :width], ~done, time.perf_counter() - t0, processed)
    finally:
        lm.train(was_training)


def with_response(inputs: dict[str, Tensor], tokens: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """A copy of a prompt/response batch with its responses replaced by ``tokens`` and
    ``mask`` (a :class:`Generation`'s): the teacher-forced inputs for on-policy losses."""
    return {**inputs, RESPONSE_IDS: tokens, RESPONSE_MASK: mask.to(inputs[RESPONSE_MASK].dtype)}


def join(inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of ``prompt ++ response`` for a
    teacher-forced forward pass; the logits at positions ``P - 1 .. P + R - 2`` predict
    the response tokens (:func:`response_slice`)."""
    ids = torch.cat([inputs[PROMPT_IDS], inputs[RESPONSE_IDS]], dim=1)
    mask = torch.cat([inputs[PROMPT_MASK].long(), inputs[RESPONSE_MASK].long()], dim=1)
    return ids, mask, positions(mask)


def response_slice(inputs: dict[str, Tensor]) -> slice:
    """The positions of a joined sequence whose logits predict the response tokens."""
    p, r = inputs[PROMPT_IDS].shape[1], inputs[RESPONSE_IDS].shape[1]
    return slice(p - 1, p + r - 1)
