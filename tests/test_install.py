"""A non-editable install (``pip install .``) works on its own: the wheel carries every
built-in plugin and the recipes, and ``kdbench`` run from another folder lists the
methods and trains a suite whose method comes from a built-in recipe."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _kdbench(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy comes before the editable one
    code = "import sys; from kdbench.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_an_installed_wheel_lists_methods_and_runs_a_suite_with_a_builtin_recipe(tmp_path):
    wheels, site, work, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "work", tmp_path / "src"
    work.mkdir()
    # built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "results", "build", "*.egg-info", "__pycache__", "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("kdbench-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)

    where = _kdbench(site, work, "list", "methods")
    assert where.returncode == 0, where.stderr
    assert {"kd", "pkd", "metadistil"} <= set(where.stdout.split())
    probe = subprocess.run([sys.executable, "-c", "import kdbench, kdbench.recipes as r; print(kdbench.__file__); print(r.plugin_dirs()[0])"],
                           cwd=work, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=300)
    module, recipes = probe.stdout.split()
    assert Path(module).is_relative_to(site) and Path(recipes).is_relative_to(site), probe.stdout  # not the checkout's copy
    assert (Path(recipes) / "kd-glue.yaml").is_file()

    (work / "suite.yaml").write_text(textwrap.dedent("""\
        name: installed
        tasks:
          - name: movie-sentiment
            options: {train_size: 120, max_length: 16}
        teacher:
          model: bert
          options: {tiny: {layers: 1, hidden: 16, heads: 2, intermediate: 32}}
          train:
            budget: {steps: 4, batch_size: 16, eval_every: 4}
            optimizer: {name: adamw, lr: 0.001}
        students:
          - model: bert
            options: {tiny: {layers: 1, hidden: 16, heads: 2, intermediate: 32}}
        methods:
          - recipe: kd-glue
        seeds: [0]
        budget: {steps: 4, batch_size: 16, eval_every: 4}
        optimizer: {name: adamw, lr: 0.001}
        results: out
        """))
    ran = _kdbench(site, work, "run", "suite.yaml")
    assert ran.returncode == 0, ran.stderr[-2000:]
    with sqlite3.connect(work / "out" / "store.sqlite") as con:
        rows = con.execute("SELECT method, params, status FROM runs").fetchall()
    assert [(m, s) for m, _, s in rows] == [("kd", "done")]
    assert '"temperature": 20.0' in rows[0][1] and '"alpha": 0.7' in rows[0][1]  # the recipe's values, cited in kd-glue.yaml
