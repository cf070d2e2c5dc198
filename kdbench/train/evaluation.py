"""Predicting a whole split, computing a task's metrics, and choosing the reported evaluation."""

from __future__ import annotations

from typing import Any

import torch

from kdbench.api import KDModel, ModelFactory
from kdbench.data import VALIDATION, TaskData


def predict(model: KDModel, factory: ModelFactory, encoded: dict[str, torch.Tensor], batch_size: int, device: torch.device, need: frozenset[str] = frozenset()) -> torch.Tensor:
    """Logits for a whole split, batched, under inference mode, in eval mode. On a GPU
    that runs out of memory the batch is halved and the split predicted again, so the
    largest batch that fits is used (``eval_batch_size`` is the first try)."""
    was_training = model.training
    model.eval()
    n = next(iter(encoded.values())).shape[0]
    try:
        while True:
            try:
                out = []
                with torch.inference_mode():
                    for start in range(0, n, batch_size):
                        index = torch.arange(start, min(start + batch_size, n))
                        inputs = {k: v.to(device, non_blocking=True) for k, v in factory.collate(encoded, index).items()}
                        out.append(model(inputs, need=need).logits.float().cpu())
                return torch.cat(out)
            except torch.OutOfMemoryError:
                if batch_size == 1 or device.type != "cuda":
                    raise
                batch_size //= 2
                torch.cuda.empty_cache()
    finally:
        model.train(was_training)


def evaluate(model: KDModel, factory: ModelFactory, data: TaskData, encoded: dict[str, dict[str, torch.Tensor]], batch_size: int, device: torch.device) -> dict[str, dict[str, float]]:
    """The task's metrics on every evaluation split (validation, test)."""
    results = {}
    for split in data.eval_splits:
        logits = predict(model, factory, encoded[split], batch_size, device)
        preds = logits.squeeze(-1).numpy() if data.task.problem.is_regression else logits.argmax(-1).numpy()
        results[split] = {k: float(v) for k, v in data.task.compute_metrics(preds, data.labels(split)).items()}
    return results


def select_metrics(history: list[dict[str, Any]], selection: str, main_metric: str) -> dict[str, Any]:
    """The reported evaluation: the final one, or the one with the best *validation*
    score (earliest on ties). Never selected on the test split."""
    chosen = history[-1]
    if selection == "validation":
        chosen = max(history, key=lambda h: (h[VALIDATION][main_metric], -h["step"]))
    return {"step": chosen["step"], "selection": selection, "main_metric": main_metric,
            **{split: vals for split, vals in chosen.items() if split != "step"}}
