"""A moto S3 (and Secrets Manager, EC2, ...) server on 127.0.0.1 for the object-store and
cluster tests. The OS picks the port and the listening socket is handed to the server as it
is (``moto_on_socket.py``), so no other process can take the port between choosing and
serving; the server is awaited by its first HTTP answer, with a deadline and its log on
failure."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from mmkd_test_plugins.gates import wait_until

LAUNCHER = Path(__file__).with_name("moto_on_socket.py")


def _answers(port: int) -> bool:
    """True once an HTTP server answers on ``port`` (any status: it is serving)."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
    except urllib.error.HTTPError:
        return True
    except OSError:  # not accepting yet (the connection waits in the backlog): try again
        return False
    return True


@contextlib.contextmanager
def moto_s3(workdir: Path, bucket: str = "mmkd-test") -> Iterator[str]:
    """Yield an ``s3://bucket/store?...`` URI served by a fresh moto server; credentials as a
    user's machine has them (a shared credentials file)."""
    import boto3

    creds = workdir / "credentials"
    creds.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(creds)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    log_path = workdir / "moto.log"
    with sock, open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, str(LAUNCHER), str(sock.fileno()), str(port)],
                                  stdout=log, stderr=subprocess.STDOUT, pass_fds=[sock.fileno()])

    def serving() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"the moto server exited ({server.returncode}) before serving:\n"
                                 f"{log_path.read_text()[-3000:]}")
        return _answers(port)

    try:
        wait_until(f"the moto server to answer on 127.0.0.1:{port} (log: {log_path})", serving)
        # a fresh session: boto3's default one keeps the credentials files it read first,
        # and an earlier in-process test may have pointed them at nothing
        s3 = boto3.session.Session().client("s3", endpoint_url=f"http://127.0.0.1:{port}")
        s3.create_bucket(Bucket=bucket)
        yield f"s3://{bucket}/store?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
