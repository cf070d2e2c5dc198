"""Suite dictionaries the runner, executor and fault tests start from."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "benchmarks" / "smoke.yaml"


def smoke_data(**changes) -> dict:
    """benchmarks/smoke.yaml (tiny BERTs on movie snippets) with ``changes`` applied."""
    data = yaml.safe_load(SMOKE.read_text())
    data.update(changes)
    return data


# ------------------------------------------------------------------ the image smoke suite
#
# The tests whose property is the executors' (kill and resume, claims, retries, Ray, the
# command line, plugins) and not a model family's run this suite instead of smoke.yaml: a
# process that trains it imports neither transformers nor a tokenizer and evaluates tiny
# CNNs on 140 images, so it starts and trains in a few seconds where a tiny-BERT smoke
# process takes about three times as long (in `make test`, dozens of such processes).

IMAGE_CLASSES = 4  # of the task's 100 labels, the ones the generated images use
IMAGE_TRAIN, IMAGE_TEST, IMAGE_VALIDATION = 240, 100, 40


def write_image_task(folder: Path) -> Path:
    """A CIFAR-100 folder (the real python format, as ``cifar100`` reads it) of learnable
    generated images: each class is a colour plus noise, so a tiny CNN scores well above
    chance within a few steps, below 100%, and different seeds give different scores. Always the same
    bytes (the encoded-split cache may be shared between tests). Returns the ``data_dir``."""
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 216, (IMAGE_CLASSES, 3))
    target = folder / "cifar-100-python"
    target.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", IMAGE_TRAIN + IMAGE_VALIDATION), ("test", IMAGE_TEST)):
        labels = rng.integers(0, IMAGE_CLASSES, n)
        # a colour per image drawn around its class's, so that classes overlap: no model
        # reaches 100%, and seeds differ
        images = colours[labels][:, :, None] + rng.normal(0, 45, (n, 3, 1)) + rng.normal(0, 40, (n, 3, 1024))
        batch = {b"data": images.clip(0, 255).astype(np.uint8).reshape(n, 3072), b"fine_labels": labels.tolist(),
                 b"coarse_labels": (labels // 5).tolist(), b"filenames": [b"x.png"] * n, b"batch_label": name.encode()}
        (target / name).write_bytes(pickle.dumps(batch, protocol=2))
    (target / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"c%d" % i for i in range(100)]}, protocol=2))
    return folder


def image_data(data_dir: Path, **changes) -> dict:
    """smoke.yaml's design (a fine-tuned teacher, none vs kd, two seeds, 20 steps) on tiny
    CNNs and the images of :func:`write_image_task` in ``data_dir`` (written if missing)."""
    if not (Path(data_dir) / "cifar-100-python" / "meta").exists():
        write_image_task(Path(data_dir))
    data = {
        "name": "image-smoke",
        "description": "tiny CNN teacher and student on generated images, none vs kd, two seeds",
        "tasks": [{"name": "cifar100", "options": {"data_dir": str(data_dir), "validation_size": IMAGE_VALIDATION,
                                                   "download": False, "augment": False}}],
        "teacher": {"model": "cnn", "options": {"channels": [8, 16], "in_channels": 3, "mean": 0.5, "std": 0.25},
                    "train": {"budget": {"steps": 20, "batch_size": 16, "eval_every": 20}, "optimizer": {"name": "adamw", "lr": 0.01}}},
        "students": [{"model": "cnn", "options": {"channels": [4, 8], "in_channels": 3, "mean": 0.5, "std": 0.25}, "label": "cnn-4-8"}],
        "methods": [{"name": "none"}, {"name": "kd", "params": {"alpha": 0.5, "temperature": 2.0}}],
        "seeds": [0, 1],
        "budget": {"steps": 20, "batch_size": 16, "eval_every": 10, "log_every": 5},
        "optimizer": {"name": "adamw", "lr": 0.01, "schedule": "linear"},
        "quiz_fraction": 0.1,
    }
    data.update(changes)
    return data


def write_image_suite(folder: Path, **changes) -> Path:
    """:func:`image_data` as ``folder/suite.yaml`` (its images in ``folder/images``)."""
    path = Path(folder) / "suite.yaml"
    path.write_text(yaml.safe_dump(image_data(Path(folder) / "images", **changes)))
    return path
