"""The built-in recipes: the settings of each paper's official code, one cited YAML file per
recipe in this folder (see :mod:`kdbench.recipes` for the format). Registered through the
``kdbench_recipe_dirs`` hook by the entry point ``builtin-recipes``, as an outside package
registers its own; shipped as package data, so an installed kdbench finds them too."""

from __future__ import annotations

from pathlib import Path

from kdbench.hookspecs import hookimpl


@hookimpl
def kdbench_recipe_dirs() -> list[str]:
    return [str(Path(__file__).resolve().parent)]
