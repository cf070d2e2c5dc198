"""``kdbench`` command line: list, validate, run, report, show."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kdbench.api import KDBenchError
from kdbench.loader import printable

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_USAGE = 2
#: ``kdbench run``: every run was trained or skipped, but some run failed or diverged.
EXIT_RUNS_FAILED = 3
#: ``kdbench verify``: some store row failed its checksum (1 stays "a bug in kdbench").
EXIT_CORRUPT = 5
#: ``kdbench run``: nothing failed here, but some selected runs are still held (being
#: trained) by another live process, so not every selected run is done yet.
EXIT_RUNS_HELD = 4
#: The reader of stdout went away (``kdbench validate -v | head``): what a shell reports
#: for a process ended by SIGPIPE.
EXIT_BROKEN_PIPE = 141


def _registry():
    from kdbench.registry import get_registry

    return get_registry()


def cmd_list(args: argparse.Namespace) -> int:
    from kdbench.registry import KINDS
    from tabulate import tabulate

    reg = _registry()
    if args.format == "md":
        if args.kind != "methods":
            raise KDBenchError("--format md makes the README's method table: use it as 'kdbench list methods --format md'")
        from kdbench.catalog import methods_markdown

        if args.pattern != "*" and not reg.listing("methods", args.pattern):
            raise KDBenchError(reg.unknown_message("methods", args.pattern))
        print(methods_markdown(reg, args.pattern), end="")
        return 0
    kinds = [args.kind] if args.kind else list(KINDS)
    for kind in kinds:
        entries = reg.listing(kind, args.pattern)
        if args.pattern != "*" and not entries:
            raise KDBenchError(reg.unknown_message(kind, args.pattern))
        print(f"{kind}:")
        print(tabulate([(e.name, e.description, e.plugin) for e in entries], headers=["name", "description", "plugin"], tablefmt="simple"))
        print()
    for plugin, why in reg.broken.items():
        print(f"broken plugin {plugin}: {why}", file=sys.stderr)
    return 0


def _load(args: argparse.Namespace):
    from kdbench.spec import load_suite

    return load_suite(args.suite)


def cmd_validate(args: argparse.Namespace) -> int:
    suite = _load(args)
    _check_local_labels(suite)
    teachers = {r.teacher_hash for r in suite.runs if r.teacher_hash}
    print(f"{suite.source}: valid. {len(suite.runs)} runs, {len(teachers)} teacher(s), results in {suite.results_dir(args.results)}")
    if args.verbose:
        from kdbench.display import run_titles

        titles = run_titles(suite)
        for r in suite.runs:  # the full specs: `kdbench show` once run
            print(printable(f"  {r.hash}  {r.task.name}  {titles[r.hash]}  {r.student_label}  seed {r.seed}"))
    for line in _estimate(suite, args):
        print(line)
    return 0


def _check_local_labels(suite) -> None:
    """Labels the objective cannot take (a class id past the last class, a regression
    target that is not a number), for the tasks that can read their labels cheaply: a
    :class:`~kdbench.spec.SuiteError` (exit 2) at validate, not a failure at data load."""
    from kdbench.data import local_label_problems
    from kdbench.spec import SuiteError

    # the suite's own task options (an options class need not accept its dump back)
    tasks = {t.model_dump_json(): t for t in suite.spec.tasks}
    problems = [p for task in tasks.values() for p in local_label_problems(_registry(), task)]
    if problems:
        raise SuiteError(suite.source, problems)


def _metric_title(title: str, runs) -> str:
    """``title`` naming the metric, its scale and direction where the report's one task is
    not read as "score x100, higher is better" (an MSE is shown as it is, lower first)."""
    if runs.empty or "scale" not in runs or runs["task"].nunique() != 1:
        return title
    from kdbench.report.frame import SCALE, direction_word

    r = runs.iloc[0]
    if float(r["scale"]) == SCALE and direction_word(r["higher_is_better"]) == "higher":
        return title
    return title.replace("test score x100", f"test {r['metric']} (x{float(r['scale']):g}, {direction_word(r['higher_is_better'])} is better)", 1)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print :func:`kdbench.model_inspect.inspect_model` for the model and options given."""
    from kdbench.loader import LoadError, parse_yaml
    from kdbench.model_inspect import format_inspection, inspect_model

    try:
        options = parse_yaml(args.options.encode())
    except LoadError as exc:
        raise KDBenchError(f"--options: {exc.problem}") from None
    if not isinstance(options, dict):
        raise KDBenchError(f"--options: expected a mapping of option names to values, got {type(options).__name__}")
    for line in format_inspection(inspect_model(_registry(), args.model, options, build=not args.no_build)):
        print(printable(line))
    return 0


def _read_only_store(results: Path | str):
    """The suite's store opened read-only (report, show, validate): never created or changed."""
    from kdbench.executors.phases import STORE_NAME
    from kdbench.store import ResultsStore

    return ResultsStore(Path(results) / STORE_NAME, readonly=True)


def _estimate(suite, args: argparse.Namespace) -> list[str]:
    from kdbench.integrity import estimate
    from kdbench.store import StoreError

    store = None
    try:
        store = _read_only_store(suite.results_dir(args.results))
        return estimate(suite, store)
    except StoreError as exc:
        return estimate(suite, None) + ([f"(no cost estimate: {exc})"] if store is None and "no such file" not in str(exc) else [])


def cmd_prepare(args: argparse.Namespace) -> int:
    """Fetch and cache every task's data (downloads are checksum-verified) so that later
    runs need no network."""
    from kdbench.data import load_task_data
    from kdbench.spec import load_suite

    for path in args.suites:
        suite = load_suite(path)
        seen = set()
        for run in suite.runs:
            key = (run.task.model_dump_json(), run.quiz_fraction, run.data_seed)
            if key not in seen:
                seen.add(key)
                data = load_task_data(_registry(), run.task, run.quiz_fraction, run.data_seed)
                sizes = ", ".join(f"{k} {len(v['label'])}" for k, v in data.splits.items())
                print(f"{path}: {run.task.name}: {sizes}")
    return 0


def _warn_if_dirty() -> None:
    """Runs record the commit they came from; a dirty tree makes that commit not the code.
    Reading it here, before anything trains, also fixes the commit this process records
    (:func:`kdbench.train.environment.git_commit` reads it once per process): a commit made
    while a long suite runs does not become the recorded commit of its later runs."""
    from kdbench.train.environment import git_commit

    if git_commit().endswith("+dirty"):
        print("warning: the kdbench source tree has uncommitted changes; runs will record their commit as '+dirty' "
              "and cannot be reproduced from it. Commit first for a publishable table.", file=sys.stderr)


class _ReportFormatNames:
    """``--format`` choices, read from the report-format registry when first needed."""

    def _names(self) -> list[str]:
        from kdbench.report import report_formats

        return [*report_formats(_registry()), "all"]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def cmd_run(args: argparse.Namespace) -> int:
    suite = _load(args)  # validated before anything is trained or written
    _warn_if_dirty()
    results = suite.results_dir(args.results)
    if not args.results:
        check_suite_results(results)
    only = None
    if args.method or args.task:
        only = lambda s: (not args.method or s.method in args.method) and (not args.task or s.task.name in args.task)  # noqa: E731
    _preflight(suite, results, args, only)
    executor = _registry().executor(args.executor)()
    outcome = executor.run(suite, results, rerun=args.rerun, only=only, registry=_registry(), address=args.address)
    counts: dict[str, int] = {}
    for status in outcome.statuses.values():
        counts[status] = counts.get(status, 0) + 1
    print(f"trained {len(outcome.trained)}, skipped {len(outcome.skipped)} finished, {len(outcome.busy)} held by another process, {len(outcome.given_up)} given up; "
          f"statuses: {json.dumps(counts, sort_keys=True)}", file=sys.stderr)
    code = 0
    if not args.no_report:
        args.format, args.output = None, None
        code = cmd_report(args, suite=suite)
    if code == 0 and getattr(outcome, "unsuccessful", False):
        print(f"error: some runs failed or diverged (see above); exit code {EXIT_RUNS_FAILED}", file=sys.stderr)
        return EXIT_RUNS_FAILED
    if code == 0 and getattr(outcome, "busy", None):
        print(f"note: {len(outcome.busy)} selected run(s) are still being trained by another process, so not every "
              f"selected run is done yet; run the same command again when it ends (exit code {EXIT_RUNS_HELD})", file=sys.stderr)
        return EXIT_RUNS_HELD
    return code


def _preflight(suite, results: Path, args: argparse.Namespace, only) -> None:
    """Refuse before training: an unwritable results folder or a symlink out of it, runs
    finished on other data (see kdbench.integrity); adopt old-hash rows, requeue corrupt ones."""
    from kdbench.executors.phases import open_store
    from kdbench.integrity import check_results_folder, preflight

    check_results_folder(Path(results))
    specs = [s for s in suite.runs if only is None or only(s)]
    preflight(suite, open_store(results), specs, rerun=args.rerun)


def cmd_report(args: argparse.Namespace, suite=None) -> int:
    """Print the report and write it in the asked formats. Everything is recomputed from
    the results store; ``--task/--method/--student/--where`` report on a subset."""
    import yaml

    from kdbench.report import build_report, render_report, write_outputs
    from kdbench.report.formats import BUILTIN

    suite = suite or _load(args)
    results = suite.results_dir(args.results)
    if not (Path(results) / "store.sqlite").exists():
        raise KDBenchError(f"no results store in {results}: run 'kdbench run {suite.source}' first")
    where = {}
    for item in getattr(args, "where", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KDBenchError(f"--where expects KEY=VALUE (a method parameter, student, seed or status), got {item[:100]!r}")
        try:
            where[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise KDBenchError(f"--where {item[:100]!r}: the value is not a YAML scalar or list "
                               f"({str(exc).splitlines()[0][:100]}); quote a text value, e.g. {key.strip()}='\"{value[:20]}\"'") from None
    store = _read_only_store(results)  # a read-only store can be reported on
    store.alias_legacy(suite.runs)
    hashes = [r.hash for r in suite.runs]
    teacher_hashes = {r.teacher_hash for r in suite.runs if r.teacher_hash}
    title = f"{suite.name}: test score x100, mean ± std over seeds (n = seeds), " \
            + ("evaluation selected on validation" if suite.spec.selection == "validation" else "final evaluation")
    report = build_report(store, hashes, teacher_hashes, suite_spec=suite.spec, title=title, tasks=args.task, methods=args.method,
                          students=getattr(args, "student", None), where=where, baseline=getattr(args, "baseline", None),
                          correction=getattr(args, "correction", None) or "holm", strict_filters=True)
    report.title = _metric_title(report.title, report.runs)
    print(printable(render_report(report, "terminal", verbose=getattr(args, "verbose", False))))
    formats = list(dict.fromkeys(args.format or []))
    if "all" in formats:
        formats = list(BUILTIN)
    if args.output and len(formats) > 1:
        raise KDBenchError("--output names one file: give a single --format with it")
    if formats and not args.output and not args.results:
        check_suite_results(Path(results))
    try:
        written = write_outputs(report, formats, Path(results), args.output, plots=not getattr(args, "no_plots", False))
    except OSError as exc:  # a read-only results folder, a full disk, a name too long
        raise KDBenchError(f"cannot write the report to {exc.filename or results}: {exc.strerror or exc}; "
                           "give a writable place with --output (one --format)") from None
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every store row of the suite against its checksum: say how many runs (and
    teachers) are verified, unverified (written before checksums) and corrupt, naming the
    latter two. Exit 0 when none is corrupt, 5 (EXIT_CORRUPT) otherwise."""
    import warnings

    from kdbench.report.integrity import store_integrity, store_lines
    from kdbench.store import CHECKSUM_2, CORRUPT, DONE, FINISHED, UNVERIFIED, VERIFIED, StoreIntegrityWarning

    suite = _load(args)
    store = _read_only_store(suite.results_dir(args.results))
    store.alias_legacy(suite.runs)
    rows = store.runs(include_corrupt=True)
    state = store_integrity(rows, {r.hash for r in suite.runs})
    print(f"{store.path}: {len(suite.runs)} runs in the suite: {state.verified} finished and verified by their checksum, "
          f"{len(state.unverified)} finished but unverified (written before checksums), {len(state.corrupt)} corrupt, "
          f"{state.missing} not in the store")
    wanted = {r.hash for r in suite.runs}
    old = sum(1 for r in rows if r["hash"] in wanted and r["integrity"] == VERIFIED and r["status"] in FINISHED
              and not str(r.get("checksum") or "").startswith(CHECKSUM_2))
    if old:
        print(f"  {old} of the verified rows carry the scheme-1 checksum (before identity columns were covered): "
              "checked under it, their task, method, student, seed, params and teacher checked against their spec")
    for line in store_lines(state):
        print(f"  {line}")
    why = {r["hash"]: r.get("integrity_problem") for r in rows if r.get("integrity_problem")}
    for h in state.corrupt:
        if why.get(h):
            print(f"  {h}: {why[h]}")
    teachers: dict[str, list[str]] = {VERIFIED: [], UNVERIFIED: [], CORRUPT: []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StoreIntegrityWarning)  # counted here instead
        for th in sorted({r.teacher_hash for r in suite.runs if r.teacher_hash}):
            row = store.teacher(th)
            if row is not None and (row["status"] == DONE or row["integrity"] == CORRUPT):
                teachers[row["integrity"]].append(th)
    print(f"teachers: {len(teachers[VERIFIED])} verified, {len(teachers[UNVERIFIED])} unverified, {len(teachers[CORRUPT])} corrupt"
          + (f" ({', '.join(teachers[CORRUPT])})" if teachers[CORRUPT] else ""))
    return EXIT_CORRUPT if state.corrupt or teachers[CORRUPT] else 0


def cmd_show(args: argparse.Namespace) -> int:
    suite = _load(args)
    store = _read_only_store(suite.results_dir(args.results))  # never creates a store
    store.alias_legacy(suite.runs)
    row = store.get(args.hash)
    if row is None:
        known = [r.hash for r in suite.runs]
        from kdbench.registry import did_you_mean

        raise KDBenchError(f"no run {args.hash} in the store.{did_you_mean(args.hash, known)}")
    print(json.dumps(row, indent=2, sort_keys=True, default=str))
    return 0


def report_arguments(rep: argparse.ArgumentParser) -> None:
    """The options of ``kdbench report``."""
    rep.add_argument("--format", action="append", choices=_ReportFormatNames(), metavar="FORMAT",
                     help="also write the report in this format (repeatable; built-in md, csv, json, latex, html, summary, "
                          "all, and any a plugin adds): md, latex and html hold every table "
                          "(html: one self-contained file with plots); csv and json the statistics; summary plain sentences "
                          "with the numbers (refreshing the summary block of the results folder's README.md). Default files: "
                          "<results>/leaderboard.{md,csv,json,tex}, <results>/report.html (json also report.json), "
                          "<results>/summary.md")
    rep.add_argument("--output", help="file for a single --format")
    rep.add_argument("--method", action="append", help="only this method (repeatable)")
    rep.add_argument("--task", action="append", help="only this task (repeatable)")
    rep.add_argument("--student", action="append", help="only this student label (repeatable)")
    rep.add_argument("--where", action="append", metavar="KEY=VALUE",
                     help="only runs with this method parameter (or seed/status/student) value, e.g. temperature=4 (repeatable)")
    rep.add_argument("--baseline", help="method to compare against and cost reference (default: the suite's 'baseline', else its first method)")
    rep.add_argument("--no-plots", action="store_true", help="skip the figures (faster)")
    rep.add_argument("--correction", choices=["holm", "bh"], default="holm",
                     help="multiple-comparison correction over the report's comparisons: holm (family-wise, default) or bh")
    rep.add_argument("-v", "--verbose", action="store_true", help="also print the legend and the environment")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdbench", description="Benchmark knowledge distillation methods fairly.")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="list methods, tasks or models")
    from kdbench.registry import KINDS

    ls.add_argument("kind", nargs="?", choices=list(KINDS))
    ls.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'glue-*'")
    ls.add_argument("--format", choices=["table", "md"], default="table",
                    help="md: the methods as a Markdown table (loss, citation, what they read, whether MetaDistil wraps them), as in README.md")
    ls.set_defaults(func=cmd_list)

    def suite_cmd(name: str, help: str, func) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("suite", help="suite YAML file (see benchmarks/)")
        sp.add_argument("--results", help="results folder (default: the suite's 'results', or results/<name>)")
        sp.set_defaults(func=func)
        return sp

    pr = sub.add_parser("prepare", help="fetch and cache the data of one or more suites")
    pr.add_argument("suites", nargs="+")
    pr.set_defaults(func=cmd_prepare)

    v = suite_cmd("validate", "validate a suite and list its runs", cmd_validate)
    v.add_argument("-v", "--verbose", action="store_true")

    r = suite_cmd("run", "run a suite (finished runs are skipped)", cmd_run)
    r.add_argument("--rerun", action="store_true", help="train finished runs again")
    r.add_argument("--executor", choices=_registry().names("executors"), default="local",
                   help="how the runs are scheduled (executors come from plugins: kdbench list executors)")
    r.add_argument("--address", help="cluster address for executors that use one, e.g. ray (default: start a local one)")
    r.add_argument("--method", action="append", help="only this method (repeatable)")
    r.add_argument("--task", action="append", help="only this task (repeatable)")
    r.add_argument("--no-report", action="store_true")

    rep = suite_cmd("report", "print the leaderboard, statistics, sweeps and cost from the results store", cmd_report)
    report_arguments(rep)

    suite_cmd("verify", "check the suite's store rows against their checksums: verified, unverified, corrupt "
              "(exit 5 when any is corrupt)", cmd_verify)

    sh = suite_cmd("show", "print one run's spec, metrics, cost and environment", cmd_show)
    sh.add_argument("hash")
    ins = sub.add_parser("inspect", help="show what a model exposes, its facts and its capture points, for given options")
    ins.add_argument("model", help="a model plugin (kdbench list models)")
    ins.add_argument("--options", default="{}", help="the model's options as a suite writes them, e.g. "
                     "'{family: roberta, tiny: {layers: 2, hidden: 32, heads: 2, intermediate: 64}}'")
    ins.add_argument("--no-build", action="store_true", help="only what the configuration says (no weights loaded)")
    ins.set_defaults(func=cmd_inspect)
    return p


def check_suite_results(results: Path) -> None:
    """A results folder the suite names (its ``results:``, or the default results/<name>)
    must resolve inside the working directory, through every symlink: a suite file must not
    make kdbench write elsewhere. ``--results`` on the command line may point anywhere."""
    here = Path.cwd().resolve()
    try:
        real = Path(results).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise KDBenchError(f"results folder {str(results)[:200]}: {getattr(exc, 'strerror', None) or exc}") from None
    if real != here and here not in real.parents:
        raise KDBenchError(f"results folder {results} resolves to {real}, outside the working directory {here} "
                           "(through a symlink); give it on the command line with --results to write there")


def main(argv: list[str] | None = None) -> int:
    """The ``kdbench`` command. Everything it prints (its own lines, argparse's, warnings,
    plugins' output) goes through :class:`kdbench.display.PrintableStream`, so no name,
    label, path or message reaches the terminal with control or bidirectional characters."""
    from kdbench.display import PrintableStream

    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrintableStream(stdout), PrintableStream(stderr)
    try:
        return _main(argv)
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for opt in ("method", "task"):
        if getattr(args, opt, None):
            known = _registry().names(opt + "s")
            for name in getattr(args, opt):
                if name not in known:
                    print(f"error: {printable(_registry().unknown_message(opt + 's', name))}", file=sys.stderr)
                    return EXIT_USAGE
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader gone by now is a BrokenPipeError here, not at exit
        return code
    except KDBenchError as exc:
        print(f"error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader (``| head``) is gone: no traceback, and none again when Python
        # flushes stdout at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # a path the file system refuses (a name too long, a loop of links)
        where = f"{str(exc.filename)[:200]}: " if exc.filename else ""
        print(f"error: {printable(where)}{exc.strerror or exc} (errno {exc.errno}); check the suite's name, "
              "--results and the paths it names", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
