"""A moto S3 server on 127.0.0.1 for the object-store tests: started on a port the OS gave,
retried on another one if that port was taken before the server bound it, and awaited by its
own log line (not a fixed time)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


def _os_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(workdir: Path, bucket: str = "mmkd-test", deadline_s: float = 120.0
            ) -> Iterator[str]:
    """Yield an ``s3://bucket/store?...`` URI served by a fresh moto server."""
    import boto3

    creds = workdir / "credentials"
    creds.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(creds)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = None
    for attempt in range(5):
        port = _os_port()
        log_path = workdir / f"moto-{attempt}.log"
        log = open(log_path, "w")
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                   "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + deadline_s
        while server.poll() is None and time.monotonic() < end:
            if "Running on" in log_path.read_text():
                break
            time.sleep(0.1)
        if server.poll() is None and "Running on" in log_path.read_text():
            break
        text = log_path.read_text()
        server.kill()
        server.wait()
        if "Address already in use" not in text:
            raise RuntimeError(f"moto server did not start within {deadline_s:.0f} s on port "
                               f"{port}; its log:\n{text[-2000:]}")
    else:
        raise RuntimeError("moto server: 5 ports in a row were taken before it could bind")
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}").create_bucket(Bucket=bucket)
        yield f"s3://{bucket}/store?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.terminate()
        server.wait(30)
