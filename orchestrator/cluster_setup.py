"""What ``cluster.yaml`` runs on its nodes, as commands of mmkd's own (``mmkd cluster ...``), so
the file stays short and every step is tested here:

- ``token``: the cluster's Ray auth token, one per cluster, kept in AWS Secrets Manager. The
  head makes it the first time (``--create``: a random 256-bit token; of two heads racing, the
  second reads the first's); every node writes it to ``~/.ray/auth_token`` (mode 600) before
  ``ray start``, and a laptop with the same IAM access fetches it the same way for
  ``mmkd submit``. Ray 2.60's token auth needs the same token on every node and client.
- ``security-group``: the EC2 security group the nodes use: SSH only from the CIDR you give,
  and all traffic between members of the group. (Ray's launcher, left to make its own group,
  opens SSH to 0.0.0.0/0; it uses an existing group by name as it is.)
- ``supervise``: run a command (the head's MLflow server) and start it again whenever it exits,
  with a growing pause, until the supervisor itself is stopped.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["fetch_auth_token", "write_auth_token", "ensure_security_group", "supervise"]


def _client(service: str, region: str | None) -> Any:
    import boto3

    # A fresh session per call, not boto3's process-wide default one: that one reads the
    # credential and config files once and keeps them, so an environment changed since
    # (another profile, a credentials file written later) would be ignored.
    session = boto3.session.Session(region_name=region or os.environ.get("AWS_DEFAULT_REGION"))
    return session.client(service)


def fetch_auth_token(secret_id: str, create: bool = False, wait_s: float = 0.0,
                     region: str | None = None) -> str:
    """The token stored under ``secret_id``; made and stored first with ``create``; with
    ``wait_s``, waits that long for another node (the head) to make it."""
    sm = _client("secretsmanager", region)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return sm.get_secret_value(SecretId=secret_id)["SecretString"].strip()
        except sm.exceptions.ResourceNotFoundException:
            pass
        if create:
            try:
                sm.create_secret(Name=secret_id, SecretString=secrets.token_hex(32),
                                 Description="Ray auth token of an mmkd cluster (RAY_AUTH_MODE=token)")
            except sm.exceptions.ResourceExistsException:
                pass  # another head made it meanwhile: read that one
            continue
        if time.monotonic() >= deadline:
            raise LookupError(
                f"no Ray auth token in AWS Secrets Manager under {secret_id!r} (region "
                f"{sm.meta.region_name}); the head node makes it (`mmkd cluster token --create`) "
                f"— is the head up, and does this node's role allow secretsmanager:GetSecretValue?")
        time.sleep(2.0)


def write_auth_token(token: str, path: str | os.PathLike | None = None) -> Path:
    """Write ``token`` where Ray reads it (``~/.ray/auth_token``), readable by the owner only."""
    path = Path(path or Path.home() / ".ray" / "auth_token")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(path, 0o600)
    return path


def ensure_security_group(cidr: str, name: str = "mmkd-cluster", vpc_id: str | None = None,
                          region: str | None = None) -> str:
    """Create (or bring in line) group ``name``: inbound SSH from ``cidr`` only and every
    protocol from the group itself; any other inbound rule is removed. Returns its id."""
    import ipaddress

    ipaddress.ip_network(cidr)  # ValueError for a typo, before anything changes
    ec2 = _client("ec2", region)
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise LookupError("no default VPC in this region: pass --vpc-id")
        vpc_id = vpcs[0]["VpcId"]
    found = ec2.describe_security_groups(Filters=[
        {"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc_id]}])
    if found["SecurityGroups"]:
        group = found["SecurityGroups"][0]
        gid = group["GroupId"]
        if group.get("IpPermissions"):
            ec2.revoke_security_group_ingress(GroupId=gid, IpPermissions=group["IpPermissions"])
    else:
        gid = ec2.create_security_group(
            GroupName=name, VpcId=vpc_id,
            Description="mmkd Ray cluster: SSH from one network, all traffic inside")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": cidr, "Description": "SSH from the operator's network"}]},
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": gid,
                                                   "Description": "node to node"}]},
    ])
    return gid


def supervise(command: list[str], log: str | os.PathLike, max_pause_s: float = 30.0,
              max_starts: int | None = None) -> int:
    """Run ``command``, start it again each time it exits (pauses 1, 2, 4 ... ``max_pause_s``
    seconds; back to 1 after a run of a minute or more). SIGTERM/SIGINT stop the command and
    the supervisor. ``max_starts`` (tests) bounds the restarts."""
    stopping = False
    child: subprocess.Popen | None = None

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pause, starts, code = 1.0, 0, 0
    with open(log, "a", buffering=1) as out:
        while not stopping and (max_starts is None or starts < max_starts):
            starts += 1
            began = time.monotonic()
            out.write(f"[mmkd supervise] start {starts}: {' '.join(command)}\n")
            child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            code = child.wait()
            out.write(f"[mmkd supervise] exited with {code}\n")
            if stopping:
                break
            pause = 1.0 if time.monotonic() - began >= 60 else min(pause * 2, max_pause_s)
            end = time.monotonic() + pause
            while not stopping and time.monotonic() < end:
                time.sleep(0.1)
    return code


if __name__ == "__main__":  # pragma: no cover - `mmkd cluster supervise` is the entry
    sys.exit(supervise(sys.argv[2:], sys.argv[1]))
