"""The `mmkd` command line.

Exit codes: 0 success; 1 a stage failed; 2 the pipeline file or the command line is invalid;
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from orchestrator.spec import PipelineError, load_pipeline

console = Console()
err = Console(stderr=True)


def _load(args) -> "object":
    return load_pipeline(args.pipeline, args.set or [])


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a value, e.g. --set stages.dft.params.alpha=0.5 (repeatable)")
    p.add_argument("--store", help="artifact store root (path or URI); default .mmkd/artifacts")


def cmd_validate(args) -> int:
    pipeline = _load(args)
    n = len(pipeline.stages)
    console.print(f"[green]ok[/]: {args.pipeline}: pipeline {pipeline.name!r}, {n} stage(s)")
    problems = _deep_validate(pipeline)
    for p in problems:
        err.print(f"[red]problem[/]: {p}")
    return 2 if problems else 0


def _deep_validate(pipeline) -> list[str]:
    """Workload-specific checks (paths exist, vocabularies fit) that need no Ray."""
    from workloads.registry import get_workload

    problems = []
    for name, stage in pipeline.stages.items():
        info = get_workload(stage.workload)
        if info.validate is not None:
            for p in info.validate(stage.config, stage.resolved_inputs) or []:
                problems.append(f"{Path(pipeline.path).name}: stage {name!r}: {p}")
    return problems


def cmd_plan(args) -> int:
    from orchestrator.runner import make_plan, store_for

    pipeline = _load(args)
    rows = make_plan(pipeline, store_for(pipeline, args.store), args.force or [])
    table = Table(title=f"plan: {pipeline.name} ({args.pipeline})")
    for col in ("stage", "workload", "status", "after", "resources", "key"):
        table.add_column(col)
    style = {"cached": "blue", "run": "green", "forced": "yellow"}
    for r in rows:
        table.add_row(r.name, r.workload, f"[{style[r.status]}]{r.status}[/]",
                      ", ".join(r.upstream), r.resources, r.key[:12])
    console.print(table)
    todo = sum(r.status != "cached" for r in rows)
    console.print(f"{todo} stage(s) to run, {len(rows) - todo} cached")
    for p in _deep_validate(pipeline):
        err.print(f"[red]problem[/]: {p}")
    return 0


def cmd_run(args) -> int:
    from orchestrator.runner import PipelineRunner
    from orchestrator.view import LiveView

    pipeline = _load(args)
    problems = _deep_validate(pipeline)
    if problems:
        for p in problems:
            err.print(f"[red]problem[/]: {p}")
        return 2
    try:
        runner = PipelineRunner(pipeline, force=args.force or [], resume=args.resume,
                                store_root=args.store, overrides=args.set or [],
                                view=LiveView(live=None if not args.plain else False))
    except ValueError as e:
        err.print(f"[red]error[/]: {e}")
        return 2
    try:
        record = runner.run()
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]; run again with --resume to continue")
        return 130
    counts = {}
    for s in record.stages.values():
        counts[s.status] = counts.get(s.status, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    _print_results(record)
    if record.status == "success":
        console.print(f"[green]{pipeline.name}[/] {record.run_id}: success ({summary}); "
                      f"MLflow: {record.tracking_uri}")
        if not runner.tracker.online:
            err.print(f"[yellow]MLflow was unreachable[/] ({runner.tracker.offline_reason}); "
                      f"re-log with: mmkd relog {record.run_id}")
        return 0
    err.print(f"[red]{pipeline.name} {record.run_id}: {record.status}[/] ({summary}).\n"
              f"{record.error}\nFix the cause and run the same command again: finished "
              f"stages are cached and an interrupted stage resumes from its checkpoint.")
    return 1


def _print_results(record) -> None:
    """Print results tables (markdown) written by stages such as `evaluate`."""
    for s in record.stages.values():
        if s.status not in ("done", "cached") or not s.uri or "://" in s.uri:
            continue
        table = Path(s.uri) / "results" / "results.md"
        if table.exists():
            console.print(f"\n[bold]{s.name}[/] results ({table}):\n{table.read_text()}")


def cmd_runs(args) -> int:
    from orchestrator.runs import format_duration, list_runs

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
    console.print(table)
    return 0


def cmd_show(args) -> int:
    from orchestrator.runs import RunRecord
    from orchestrator.view import stage_table

    try:
        record = RunRecord.load(args.run)
    except FileNotFoundError as e:
        err.print(f"[red]error[/]: {e}")
        return 2
    console.print(stage_table(record))
    for s in record.stages.values():
        nums = {k: v for k, v in (s.metrics or {}).items() if isinstance(v, (int, float))}
        if nums:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in list(nums.items())[:8])
            console.print(f"  {s.name}: {shown}")
        if s.error:
            console.print(f"  [red]{s.name} error[/]: {s.error}")
    if record.error:
        console.print(f"[red]error[/]: {record.error}")
    _print_results(record)
    console.print(f"MLflow run {record.mlflow_run_id} at {record.tracking_uri}")
    return 0


def cmd_workloads(args) -> int:
    from workloads.registry import list_workloads

    table = Table(title="registered workloads")
    for col in ("name", "version", "outputs", "distributed", "description"):
        table.add_column(col)
    for w in list_workloads():
        table.add_row(w.name, w.version, ", ".join(w.outputs), "yes" if w.distributed else "",
                      w.description)
    console.print(table)
    return 0


def cmd_ui(args) -> int:
    from orchestrator.tracking import default_tracking_uri

    uri = default_tracking_uri()
    console.print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port)]
    return subprocess.call(cmd)


def cmd_relog(args) -> int:
    from orchestrator.runs import RunRecord
    from orchestrator.tracking import replay

    record = RunRecord.load(args.run)
    if not record.journal.exists():
        err.print(f"[red]error[/]: run {args.run} has no tracking journal")
        return 2
    tracker = replay(record.journal, args.uri)
    console.print(f"re-logged {args.run} to {tracker.uri} as MLflow run {tracker.run_id()}")
    return 0


def _cluster(fn):
    """Run a cluster command; SubmitError becomes one clear line and exit code 2."""
    def wrapped(args) -> int:
        from orchestrator.submit import SubmitError

        try:
            return fn(args)
        except SubmitError as e:
            err.print(f"[red]error[/]: {e}", highlight=False)
            return 2
    return wrapped


@_cluster
def cmd_submit(args) -> int:
    from orchestrator import submit

    load_pipeline(args.pipeline, args.set or [])  # lint here, not after the upload
    env = dict(kv.split("=", 1) for kv in (args.env or []))
    if args.store:
        env["MMKD_STORE"] = args.store
    job = submit.submit(args.pipeline, args.address, args.set or [], args.working_dir, env,
                        args.job_id)
    console.print(f"submitted [bold]{job}[/] to {args.address}\n"
                  f"  mmkd logs {job} --address {args.address} --follow")
    if args.wait:
        status = submit.wait(args.address, job, timeout=args.wait)
        console.print(f"{job}: {status}")
        if status != "SUCCEEDED":
            tail = submit.logs(args.address, job).splitlines()[-40:]
            err.print(f"last lines of the job's log:\n" + "\n".join(tail), markup=False,
                      highlight=False)
            return 1
        return 0
    return 0


@_cluster
def cmd_jobs(args) -> int:
    from orchestrator import submit

    table = Table(title=f"jobs on {args.address}")
    for col in ("job", "status", "entrypoint"):
        table.add_column(col)
    for j in submit.list_jobs(args.address):
        table.add_row(j.submission_id or j.job_id or "", str(j.status), j.entrypoint[:80])
    console.print(table)
    return 0


@_cluster
def cmd_status(args) -> int:
    from orchestrator import submit

    info = submit.status(args.address, args.job)
    console.print(f"{args.job}: {info.status} {info.message or ''}")
    return 0


@_cluster
def cmd_logs(args) -> int:
    from orchestrator import submit

    if args.follow:
        for chunk in submit.follow_logs(args.address, args.job):
            print(chunk, end="", flush=True)
    else:
        print(submit.logs(args.address, args.job), end="")
    return 0


@_cluster
def cmd_stop(args) -> int:
    from orchestrator import submit

    stopped = submit.stop(args.address, args.job)
    console.print(f"{args.job}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _add_cluster_commands(sub) -> None:
    default = os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
    p = sub.add_parser("submit", help="run a pipeline on a Ray cluster (Ray Jobs API)")
    _add_pipeline_args(p)
    p.add_argument("--address", default=default, help="Ray dashboard, http://HEAD:8265")
    p.add_argument("--working-dir", default=".", help="folder uploaded with the job (the project)")
    p.add_argument("--env", action="append", metavar="K=V", help="extra environment for the job")
    p.add_argument("--job-id", help="submission id (default: Ray picks one)")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the job to finish")
    p.set_defaults(fn=cmd_submit)
    for name, fn, helptext in (("jobs", cmd_jobs, "list jobs on the cluster"),
                               ("status", cmd_status, "a job's status"),
                               ("logs", cmd_logs, "a job's logs"),
                               ("stop", cmd_stop, "stop a job")):
        p = sub.add_parser(name, help=helptext)
        if name != "jobs":
            p.add_argument("job")
        if name == "logs":
            p.add_argument("--follow", action="store_true")
        p.add_argument("--address", default=default, help="Ray dashboard, http://HEAD:8265")
        p.set_defaults(fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmkd", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a pipeline (cached stages are skipped)")
    _add_pipeline_args(p)
    p.add_argument("--force", action="append", metavar="STAGE",
                   help="rerun STAGE and everything downstream (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue the last interrupted run of this pipeline (same MLflow run)")
    p.add_argument("--plain", action="store_true", help="plain log lines instead of a live table")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("validate", help="check a pipeline file without running anything")
    _add_pipeline_args(p)
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("plan", help="show the DAG, cached stages and resources")
    _add_pipeline_args(p)
    p.add_argument("--force", action="append", metavar="STAGE")
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

    p = sub.add_parser("ui", help="MLflow UI on the default store (127.0.0.1)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(fn=cmd_ui)

    p = sub.add_parser("relog", help="re-log a run's journal after MLflow was unreachable")
    p.add_argument("run")
    p.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI or the local db)")
    p.set_defaults(fn=cmd_relog)

    _add_cluster_commands(sub)
    _add_data_commands(sub)
    return parser


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="data set tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    try:
        from workloads.data.shapes import add_shapes_arguments, run_shapes_command
    except ImportError:
        return
    p = dsub.add_parser("shapes", help="generate the shapes VQA benchmark as WebDataset shards")
    add_shapes_arguments(p)
    p.set_defaults(fn=lambda a: run_shapes_command(a) or 0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.fn(args) or 0)
    except PipelineError as e:
        err.print("[red]invalid pipeline[/]")
        err.print(str(e), highlight=False, markup=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
