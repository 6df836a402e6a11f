"""The `mmkd` command line.

Exit codes: 0 success; 1 a stage failed (or mmkd itself did: an internal error, whose traceback
goes to a file under .mmkd/logs/); 2 the pipeline file, the command line or what it names (a
path, a run, the cluster's address, the object store) is wrong; 130 interrupted. Every error is
one paragraph on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.console import QuietOutput, print_table
from orchestrator.errors import explain
from orchestrator.loader import load_pipeline
from orchestrator.secret_env import redact_text

console = Console()
err = Console(stderr=True)


def _load(args) -> "object":
    pipeline = load_pipeline(args.pipeline, args.set or [])
    if getattr(args, "only", None):
        pipeline = pipeline.only(args.only)
    return pipeline


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a value, e.g. --set stages.dft.params.alpha=0.5 (repeatable)")
    p.add_argument("--store", help="artifact store root (path or URI); default .mmkd/artifacts")


def cmd_validate(args) -> int:
    from orchestrator import api

    pipeline = _load(args)
    n = len(pipeline.stages)
    problems = api.validate(pipeline, offline=args.offline)
    for p in problems:
        err.print(f"[red]problem[/]: {escape(p)}", highlight=False, soft_wrap=True)
    if problems:
        return 2
    console.print(f"[green]ok[/]: {args.pipeline}: pipeline {pipeline.name!r}, {n} stage(s)")
    if args.offline:
        console.print("offline: data sources and model files were not opened")
    return 0


def cmd_plan(args) -> int:
    from orchestrator import api

    pipeline = _load(args)
    rows = api.plan(pipeline, force=args.force or [], store=args.store, offline=args.offline)
    table = Table(title=f"plan: {pipeline.name} ({args.pipeline})")
    for col in ("stage", "workload", "status", "after", "resources", "key"):
        table.add_column(col)
    style = {"cached": "blue", "run": "green", "forced": "yellow"}
    for r in rows:
        table.add_row(r.name, r.workload, f"[{style[r.status]}]{r.status}[/]",
                      ", ".join(r.upstream), r.resources, r.key[:12])
    print_table(table, console)
    reasons = [(r.name, r.reason) for r in rows if r.status != "cached" and r.reason]
    if reasons:
        console.print("why they run (against each stage's last result in this store):")
        for name, reason in reasons:
            console.print(f"  {name}: {escape(reason)}", highlight=False, soft_wrap=True)
    todo = sum(r.status != "cached" for r in rows)
    console.print(f"{todo} stage(s) to run, {len(rows) - todo} cached")
    if args.offline:
        console.print("offline: the artifact store, data and model files were not opened "
                      "(keys exclude data fingerprints; 'run' means not checked)")
        return 0
    problems = api.validate(pipeline)
    for p in problems:
        err.print(f"[red]problem[/]: {escape(p)}", highlight=False, soft_wrap=True)
    return 2 if problems else 0


def cmd_run(args) -> int:
    from orchestrator import api
    from orchestrator.view import LiveView

    pipeline = _load(args)
    quiet = None if args.verbose else QuietOutput()

    def started(record) -> None:
        if quiet is not None:
            output = quiet.to_file(record.dir / "output.log")
            err.print(f"Ray's and MLflow's own output: {output} (--verbose shows it here)",
                      highlight=False, soft_wrap=True)

    try:
        result = api.run(pipeline, overrides=args.set or [], force=args.force or [],
                         resume=args.resume, store=args.store, on_start=started,
                         view=LiveView(live=None if not args.plain else False),
                         defer_tracking=True)
    except api.InvalidPipeline as e:
        for p in e.problems:
            err.print(f"[red]problem[/]: {escape(p)}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]; run again with --resume to continue")
        return 130
    record = result.record
    counts = {}
    for s in record.stages.values():
        counts[s.status] = counts.get(s.status, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    _print_results(record)
    if record.status == "success":
        console.print(f"[green]{pipeline.name}[/] {record.run_id}: success ({summary}); "
                      f"MLflow: {redact_text(record.tracking_uri)}")
        if result.tracking_deferred:
            console.print("every stage was cached: MLflow gets this run from a background "
                          f"`mmkd relog {record.run_id}` in a moment", highlight=False)
        elif result.tracking_error:
            err.print(f"[yellow]MLflow was unreachable[/] ({result.tracking_error}); "
                      f"re-log with: mmkd relog {record.run_id}")
        return 0
    err.print(f"[red]{escape(pipeline.name)} {record.run_id}: {record.status}[/] "
              f"({escape(summary)}).\n{escape(record.error)}\nFix the cause and run the same command again: finished "
              f"stages are cached and an interrupted stage resumes from its checkpoint.")
    return 1


def _print_results(record) -> None:
    """Print the summaries (markdown results tables) stages wrote, e.g. `evaluate`'s."""
    from orchestrator.api import RunResult

    result = RunResult(record)
    for name in record.stages:
        text = result.summary(name)
        if text:
            console.print(f"\n[bold]{name}[/] ({result.path(name)}):\n{text}", highlight=False)


def cmd_runs(args) -> int:
    from orchestrator.run_records import format_duration, list_runs

    table = Table(title="recent pipeline runs")
    for col in ("run", "pipeline", "status", "stages", "started", "duration"):
        table.add_column(col)
    import datetime as dt

    for r in list_runs(args.pipeline, args.limit):
        counts = {}
        for s in r.stages.values():
            counts[s.status] = counts.get(s.status, 0) + 1
        started = dt.datetime.fromtimestamp(r.started).strftime("%Y-%m-%d %H:%M:%S")
        dur = format_duration((r.ended - r.started) if r.ended else None)
        table.add_row(r.run_id, r.pipeline, r.status,
                      " ".join(f"{v} {k}" for k, v in sorted(counts.items())), started, dur)
    print_table(table, console, keep=("run", "pipeline"))
    return 0


def cmd_show(args) -> int:
    from orchestrator.run_records import RunRecord
    from orchestrator.view import stage_table

    record = RunRecord.load(args.run)  # FileNotFoundError: exit 2 (main)
    print_table(stage_table(record), console, keep=("stage", "key"))
    for s in record.stages.values():
        nums = {k: v for k, v in (s.metrics or {}).items() if isinstance(v, (int, float))}
        if nums:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(nums.items())[:8])
            console.print(f"  {s.name}: {escape(shown)}")
        if s.error:
            console.print(f"  [red]{s.name} error[/]: {escape(s.error)}")
    if record.error:
        console.print(f"[red]error[/]: {escape(record.error)}")
    _print_results(record)
    console.print(f"MLflow run {record.mlflow_run_id} at {redact_text(record.tracking_uri)}")
    return 0


def cmd_workloads(args) -> int:
    from orchestrator.plugin import list_workloads

    table = Table(title="registered workloads (entry-point group mmkd.workloads)")
    for col in ("name", "from", "outputs", "distributed", "description"):
        table.add_column(col)
    for w in list_workloads():
        table.add_row(w.name, w.source, ", ".join(w.outputs), "yes" if w.distributed else "",
                      w.description)
    print_table(table, console, keep=("name",))
    return 0


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 1 or more")
    return value


def cmd_ui(args) -> int:
    from orchestrator.tracking import default_tracking_uri

    uri = default_tracking_uri()
    base = f"http://127.0.0.1:{args.port}"
    from orchestrator.ui import open_when_up, runs_page

    page = runs_page(uri, base, args.pipeline)
    console.print(f"MLflow UI for {redact_text(uri)}: {page}", highlight=False)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port), "--workers", str(args.workers)]
    from orchestrator.process_group import run_in_own_group

    desktop = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or \
        sys.platform == "darwin"
    if desktop and not args.no_browser:
        open_when_up(base, page)
    return run_in_own_group(cmd)


def cmd_relog(args) -> int:
    from orchestrator.run_records import RunRecord
    from orchestrator.tracking import replay

    record = RunRecord.load(args.run)
    if not record.journal.exists():
        err.print(f"[red]error[/]: run {args.run} has no tracking journal")
        return 2
    tracker = replay(record.journal, args.uri,
                     tag="mmkd.tracking_deferred" if args.deferred else "mmkd.relogged")
    record = RunRecord.load(args.run)  # the MLflow ids of this run are now known: keep them
    record.mlflow_run_id = tracker.run_id()
    for name, stage in record.stages.items():
        stage.mlflow_run_id = tracker.run_id(name) or stage.mlflow_run_id
    record.tracking_uri = tracker.uri
    record.save()
    console.print(f"re-logged {args.run} to {tracker.uri} as MLflow run {tracker.run_id()}")
    return 0


def cmd_tune(args) -> int:
    from orchestrator.tune_runner import run_tune
    from orchestrator.tune_spec import TuneError, load_tune

    try:
        spec, pipeline = load_tune(args.spec, args.set or [])
    except TuneError as e:
        err.print(f"[red]invalid tune spec[/]: {e}", highlight=False)
        return 2
    if not args.verbose:  # Ray Tune's boxes and the trials' output go to a file, as for `run`
        from orchestrator.artifact_store import mmkd_home
        from orchestrator.tune_spec import tune_name

        output = QuietOutput().to_file(mmkd_home() / "tune" / tune_name(spec, pipeline)
                                       / "output.log")
        err.print(f"Ray Tune's and MLflow's own output: {output} (--verbose shows it here)",
                  highlight=False, soft_wrap=True)
    outcome = run_tune(spec, pipeline, args.spec, resume=args.resume, overrides=args.set or [])
    metrics = [spec.metric] + ([spec.select.metric] if spec.select else [])
    ranked_by = metrics[-1]
    table = Table(title=f"tune {outcome.name}: best by {ranked_by}")
    for col in ("trial", *spec.space, *metrics, "steps", "status"):
        table.add_column(col)
    for t in outcome.trials:
        status = "error" if t["error"] else ("done" if t["completed"] else "stopped early")
        values = ["" if t.get(m) is None else f"{t[m]:.5g}" for m in metrics]
        table.add_row(t["trial"], *(f"{t['params'][k]:.4g}" if isinstance(t["params"][k], float)
                                   else str(t["params"][k]) for k in spec.space),
                      *values, str(t["steps"]), status)
    print_table(table, console, keep=("trial",))
    console.print(f"{outcome.stopped_early} trial(s) stopped early; {outcome.steps_run} of "
                  f"{outcome.steps_budget} trial-steps run. Best params: {outcome.best_params_file}")
    if outcome.freed_groups:
        console.print(f"freed {outcome.freed_groups} placement group(s) that stopped trials' Ray "
                      f"Train runs left behind")
    console.print(f"apply them with:\n  {outcome.run_line}", highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmkd", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, Ray Data's and MLflow's own output too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a pipeline (cached stages are skipped)")
    _add_pipeline_args(p)
    p.add_argument("--force", action="append", metavar="STAGE",
                   help="rerun STAGE and everything downstream (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the last interrupted run of this pipeline (same MLflow run)")
    p.add_argument("--plain", action="store_true", help="plain log lines instead of a live table")
    p.add_argument("--only", action="append", metavar="STAGE",
                   help="run only STAGE and the stages it needs (repeatable)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("validate", help="check a pipeline file without running anything")
    _add_pipeline_args(p)
    p.add_argument("--offline", action="store_true",
                   help="check structure and params only; open no data or model files "
                        "(for a pipeline whose data lives on a cluster)")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("plan", help="show the DAG, cached stages and resources")
    _add_pipeline_args(p)
    p.add_argument("--force", action="append", metavar="STAGE")
    p.add_argument("--offline", action="store_true",
                   help="open no data or model files (keys then exclude data fingerprints)")
    p.add_argument("--only", action="append", metavar="STAGE",
                   help="plan only STAGE and the stages it needs")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("runs", help="list recent pipeline runs")
    p.add_argument("--pipeline")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(fn=cmd_runs)

    p = sub.add_parser("show", help="a run's stage table and results")
    p.add_argument("run")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("workloads", help="list registered workloads")
    p.set_defaults(fn=cmd_workloads)

    p = sub.add_parser("ui", help="MLflow UI on the default store (127.0.0.1), opened on a "
                                  "pipeline's runs")
    p.add_argument("pipeline", nargs="?", help="whose runs to open (default: the most recent "
                                               "run's pipeline)")
    p.add_argument("--port", type=int, default=5000)
    # one user on a local store: one server process (MLflow's default is 4)
    p.add_argument("--workers", type=_at_least_one, default=1,
                   help="server worker processes (default 1; uvicorn kills a worker still "
                        "starting after 5 s, so more may not come up on a busy machine)")
    p.add_argument("--no-browser", action="store_true", help="print the page, open nothing")
    p.set_defaults(fn=cmd_ui)

    p = sub.add_parser("relog", help="re-log a run's journal after MLflow was unreachable")
    p.add_argument("run")
    p.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI or the local db)")
    p.add_argument("--deferred", action="store_true", help=argparse.SUPPRESS)  # mmkd run's own
    p.set_defaults(fn=cmd_relog)

    p = sub.add_parser("tune", help="Ray Tune over one stage's params (a tune spec)")
    p.add_argument("spec", help="tune YAML, or a pipeline file with a tune: block")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a value of the pipeline")
    p.add_argument("--resume", action="store_true", help="continue an interrupted tune")
    p.set_defaults(fn=cmd_tune)

    from orchestrator.cli_cluster import add_cluster_commands

    add_cluster_commands(sub, _add_pipeline_args)
    _add_plugin_commands(sub)
    for p in [q for top in sub.choices.values() for q in [top, *_subparsers_of(top)]]:
        # `mmkd run P --verbose` as well as `mmkd --verbose run P`; SUPPRESS keeps the
        # subcommand's default from overwriting the top-level flag
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show Ray's, Ray Data's and MLflow's own output too")
    return parser


def _subparsers_of(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for p in a.choices.values()]


def _add_plugin_commands(sub) -> None:
    """Commands of plugin packages: each ``mmkd.commands`` entry point is a function that adds
    its sub-commands to mmkd's (mmkd's own: ``mmkd data shapes``)."""
    import importlib.metadata

    for ep in importlib.metadata.entry_points(group="mmkd.commands"):
        ep.load()(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a bad command line: usage and exit 2 (argparse)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        return 130
    except Exception as e:  # noqa: BLE001 - every error ends as one paragraph, never a traceback
        code, text = explain(e)
        err.print(text, highlight=False, markup=False, soft_wrap=True)  # paths stay whole
        return code


if __name__ == "__main__":
    sys.exit(main())
