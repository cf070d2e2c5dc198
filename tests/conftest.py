"""Shared test set-up: fast, deterministic, offline; the registries most tests use."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process, the commands the tests start included: `make test` runs two
# pytest-xdist workers on two cores, and more threads than cores only wait on each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fault_registry():
    """The installed plugins plus the fault-injecting methods and teacher model."""
    from kdbench.registry import Registry, make_plugin_manager

    pm, broken = make_plugin_manager(extra_plugins=["support.fault_methods", "support.fault_models"])
    return Registry(pm, broken)
