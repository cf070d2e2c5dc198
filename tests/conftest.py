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

import gc  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


#: The longest test files (`make test` prints the slowest tests), longest first. `make test`
#: hands each pytest-xdist worker whole files in collection order (--dist loadfile
#: --no-loadscope-reorder): these go first, so that no long file starts near the end while
#: the other worker has nothing left to do.
LONG_FILES = ("test_cli.py", "test_distributed.py", "test_runner.py", "test_teacher_drift.py", "test_faults.py", "test_faults_train.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def frozen_heap():
    """Before the first test: import what nearly every test process builds on (torch's
    compiler front end, which any optimizer imports; transformers' BERT; scipy; pandas),
    collect, and move every object alive to the collector's permanent generation
    (``gc.freeze``). Each run calls ``gc.collect()`` to measure its own memory
    (kdbench.train.cost), and with about 450,000 long-lived objects to traverse each call
    cost 0.4 s: 23 s of 95 in test_paper_suites_e2e and test_teacher_drift. Objects made
    later, by the tests and their runs, are collected as before."""
    import pandas  # noqa: F401
    import scipy.stats  # noqa: F401
    import torch._dynamo  # noqa: F401
    from transformers import BertModel  # noqa: F401

    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session")
def fault_registry():
    """The installed plugins plus the fault-injecting methods and teacher model."""
    from kdbench.registry import Registry, make_plugin_manager

    pm, broken = make_plugin_manager(extra_plugins=["support.fault_methods", "support.fault_models"])
    return Registry(pm, broken)
