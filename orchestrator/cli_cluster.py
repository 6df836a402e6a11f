"""`mmkd submit / jobs / status / logs / stop`: pipelines on a Ray cluster."""

from __future__ import annotations

import argparse
import os

from rich.console import Console
from rich.table import Table

from orchestrator.console import print_table
from orchestrator.loader import load_pipeline

console = Console()
err = Console(stderr=True)


def _cluster(fn):
    """Run a cluster command; SubmitError becomes one clear line and exit code 2."""
    def wrapped(args) -> int:
        from orchestrator.submit import SubmitError

        try:
            _check_transport(args.address, getattr(args, "insecure", False))
            return fn(args)
        except SubmitError as e:
            err.print(f"[red]error[/]: {e}", highlight=False, soft_wrap=True)
            return 2
    return wrapped


@_cluster
def cmd_submit(args) -> int:
    from orchestrator import submit

    pipeline = load_pipeline(args.pipeline, args.set or [])  # lint here, not after the upload
    if args.only:
        pipeline.only(args.only)
    env = job_env(args.env or [], args.allow_secret_env)
    if args.store:
        env["MMKD_STORE"] = args.store
    _refuse_secret_values(env, args.set or [], args.allow_secret_env)
    job = submit.submit(args.pipeline, args.address, args.set or [], args.working_dir, env,
                        args.job_id, only=args.only or [])
    console.print(f"submitted [bold]{job}[/] to {args.address}\n"
                  f"  mmkd logs {job} --address {args.address} --follow")
    if args.wait:
        status = submit.wait(args.address, job, timeout=args.wait)
        console.print(f"{job}: {status}")
        if status != "SUCCEEDED":
            tail = submit.logs(args.address, job).splitlines()[-40:]
            err.print("last lines of the job's log:\n" + "\n".join(tail), markup=False,
                      highlight=False)
            return 1
        return 0
    return 0


def _refuse_secret_values(env: dict[str, str], overrides: list[str], allow: bool) -> None:
    """Credentials inside values (``s3://AK:SK@bucket``, ``?sig=...``, a token in ``--set``)
    would sit in the job's runtime_env and entrypoint, shown in plain text by the dashboard."""
    from orchestrator.secret_env import contains_secret, redact
    from orchestrator.submit import SubmitError

    found = [f"{k}={redact(v, k)}" for k, v in env.items() if contains_secret(v)]
    found += [f"--set {redact(o)}" for o in overrides if redact(o) != o]
    if found and not allow:
        raise SubmitError(
            f"{'; '.join(found)}: this value holds credentials (shown masked), and a job's "
            f"environment and command line are shown in plain text by the Ray dashboard, "
            f"`ray job list` and Ray's logs. Give the nodes their own access instead (an "
            f"instance role for S3, a credentials file or MLFLOW_TRACKING_USERNAME/PASSWORD "
            f"on the nodes), or pass --allow-secret-env if you accept that.")


INSECURE_HELP = ("send the Ray auth token over plain http:// to a host that is not this "
                 "machine (it can be read on the way; use an SSH tunnel or https:// instead)")


def _check_transport(address: str, insecure: bool) -> None:
    """The bearer token goes in every request: never in clear text across a network unless
    the user says so (a tunnel from `ray dashboard cluster.yaml` is http://127.0.0.1)."""
    from urllib.parse import urlparse

    from orchestrator.submit import SubmitError, read_token

    url = urlparse(address if "://" in address else f"http://{address}")
    loopback = (url.hostname or "") in ("localhost", "::1") or (url.hostname or "").startswith(
        "127.")
    if url.scheme == "http" and not loopback and not insecure and read_token():
        raise SubmitError(
            f"--address {address}: the Ray auth token would travel in clear text over http:// "
            f"to {url.hostname}. Forward the dashboard through SSH (`ray dashboard "
            f"cluster.yaml`, then --address http://127.0.0.1:8265), put it behind https://, "
            f"or pass --insecure on a network you trust.")


def job_env(pairs: list[str], allow_secrets: bool) -> dict[str, str]:
    """``--env K=V`` pairs; names that look like secrets are refused (SubmitError) unless
    ``allow_secrets``: the job's runtime_env is shown in plain text by the dashboard."""
    from orchestrator.secret_env import looks_secret, refusal
    from orchestrator.submit import SubmitError

    env = {}
    for kv in pairs:
        name, eq, value = kv.partition("=")
        if not eq or not name.strip():
            raise SubmitError(f"--env {kv!r}: expected NAME=VALUE, e.g. --env "
                              "MLFLOW_TRACKING_URI=http://127.0.0.1:5000")
        env[name.strip()] = value
    secret = [k for k in env if looks_secret(k)]
    if secret and not allow_secrets:
        raise SubmitError(refusal(secret))
    return env


@_cluster
def cmd_jobs(args) -> int:
    from orchestrator import submit

    table = Table(title=f"jobs on {args.address}")
    for col in ("job", "status", "entrypoint"):
        table.add_column(col)
    for j in submit.list_jobs(args.address):
        table.add_row(j.submission_id or j.job_id or "", str(j.status), j.entrypoint[:80])
    print_table(table, console, keep=("job",))
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


def cmd_cluster_token(args) -> int:
    from orchestrator.cluster_setup import fetch_auth_token, write_auth_token

    try:
        token = fetch_auth_token(args.secret_id, create=args.create, wait_s=args.wait,
                                 region=args.region)
    except Exception as e:  # noqa: BLE001 - AWS's own errors: one paragraph, exit 2
        return _aws_error(e, f"the Ray auth token {args.secret_id}")
    path = write_auth_token(token, args.path)
    console.print(f"Ray auth token of {args.secret_id} written to {path} (mode 600)",
                  highlight=False)
    return 0


def cmd_cluster_security_group(args) -> int:
    from orchestrator.cluster_setup import ensure_security_group

    try:
        gid = ensure_security_group(args.cidr, args.name, args.vpc_id, args.region)
    except Exception as e:  # noqa: BLE001 - AWS's own errors: one paragraph, exit 2
        return _aws_error(e, f"the security group {args.name}")
    console.print(f"security group {args.name} ({gid}): SSH from {args.cidr} only, all traffic "
                  f"between its members", highlight=False)
    return 0


def _aws_error(e: Exception, what: str) -> int:
    """One paragraph for what AWS (or our own checks) refused; anything else is re-raised."""
    module = type(e).__module__
    if isinstance(e, (LookupError, ValueError)) or module.startswith(("botocore", "boto3")):
        hint = ("" if isinstance(e, (LookupError, ValueError)) else
                " Check that AWS credentials are available here (an instance role, "
                "~/.aws/credentials or AWS_PROFILE), that --region names the cluster's region, "
                "and that this identity may use Secrets Manager / EC2 as cluster.yaml's header "
                "says.")
        err.print(f"error: {what}: {type(e).__name__}: {e}.{hint}", highlight=False,
                  markup=False, soft_wrap=True)
        return 2
    raise e


def cmd_cluster_supervise(args) -> int:
    from orchestrator.cluster_setup import supervise

    command = [c for c in args.command if c != "--"]
    if not command:
        err.print("[red]error[/]: mmkd cluster supervise --log FILE -- COMMAND ...")
        return 2
    return supervise(command, args.log, max_starts=args.max_starts)


def _add_cluster_setup(sub) -> None:
    cluster = sub.add_parser("cluster", help="what cluster.yaml runs on its nodes (token, "
                                             "security group, MLflow supervisor)")
    csub = cluster.add_subparsers(dest="cluster_cmd", required=True)
    t = csub.add_parser("token", help="fetch (or, on the head, make) the cluster's Ray auth "
                                      "token from AWS Secrets Manager into ~/.ray/auth_token")
    t.add_argument("--secret-id", default="mmkd/ray-auth-token")
    t.add_argument("--create", action="store_true", help="make it if it does not exist (head)")
    t.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for the head to make it (workers)")
    t.add_argument("--region")
    t.add_argument("--path", help="where to write it (default ~/.ray/auth_token)")
    t.set_defaults(fn=cmd_cluster_token)
    g = csub.add_parser("security-group", help="create the nodes' EC2 security group: SSH from "
                                               "one CIDR, all traffic between nodes")
    g.add_argument("--cidr", required=True, help="your network, e.g. 203.0.113.7/32")
    g.add_argument("--name", default="mmkd-cluster")
    g.add_argument("--vpc-id")
    g.add_argument("--region")
    g.set_defaults(fn=cmd_cluster_security_group)
    s = csub.add_parser("supervise", help="run a command and restart it whenever it exits")
    s.add_argument("--log", required=True)
    s.add_argument("--max-starts", type=int, help=argparse.SUPPRESS)
    s.add_argument("command", nargs="+")
    s.set_defaults(fn=cmd_cluster_supervise)


def add_cluster_commands(sub, add_pipeline_args) -> None:
    _add_cluster_setup(sub)
    default = os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
    p = sub.add_parser("submit", help="run a pipeline on a Ray cluster (Ray Jobs API)")
    add_pipeline_args(p)
    p.add_argument("--address", default=default, help="Ray dashboard, http://HEAD:8265")
    p.add_argument("--working-dir", default=".", help="folder uploaded with the job (the project)")
    p.add_argument("--env", action="append", metavar="K=V",
                   help="extra environment for the job (shown by the Ray dashboard: names that "
                        "look like secrets are refused)")
    p.add_argument("--allow-secret-env", action="store_true",
                   help="let --env pass names that look like secrets (AWS_SECRET_ACCESS_KEY, "
                        "*_TOKEN, *_PASSWORD, ...) into the job's runtime_env anyway")
    p.add_argument("--job-id", help="submission id (default: Ray picks one)")
    p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the job to finish")
    p.add_argument("--only", action="append", metavar="STAGE",
                   help="run only STAGE and the stages it needs (repeatable)")
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
        p.add_argument("--insecure", action="store_true", help=INSECURE_HELP)
        p.set_defaults(fn=fn)
