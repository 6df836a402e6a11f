"""Which environment variables are secrets, so they stay out of Ray's metadata.

Whatever goes into a job's or a task's ``runtime_env`` is shown in plain text by Ray's dashboard
and written to its logs and state API. mmkd therefore never puts credentials there: on a cluster
the nodes get object-store access from their instance role (cluster.yaml), and locally the stage
tasks read the credential chain the raylet inherited from the process that started Ray (its
environment, ``~/.aws/credentials``, an instance role) — the same one the driver reads.
"""

from __future__ import annotations

# Words of a name (split at "_") that mark a secret: AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
# HF_TOKEN, MLFLOW_TRACKING_PASSWORD, OPENAI_API_KEY, AWS_ACCESS_KEY_ID, ...
_SECRET_WORDS = {"SECRET", "SECRETS", "TOKEN", "PASSWORD", "PASSWD", "PASS", "CREDENTIAL",
                 "CREDENTIALS", "PRIVATE", "KEY", "APIKEY"}
# ... but a path to a file holding one is not (AWS_SHARED_CREDENTIALS_FILE, RAY_AUTH_TOKEN_PATH)
_PATH_WORDS = {"FILE", "PATH", "DIR"}


def looks_secret(name: str) -> bool:
    """True for names that usually hold credentials (AWS_ACCESS_KEY_ID included: an access key
    id alone is not a secret, but it is useless without its secret and names the account)."""
    words = name.upper().split("_")
    secret = any(w in _SECRET_WORDS or "SECRET" in w or "PASSW" in w for w in words)
    return secret and words[-1] not in _PATH_WORDS


def refusal(names: list[str]) -> str:
    """The sentence `mmkd submit --env` prints when it refuses secret-looking names."""
    listed = ", ".join(sorted(names))
    return (f"--env {listed}: this looks like a secret, and a job's environment is shown in "
            f"plain text by the Ray dashboard (Jobs → the job → runtime_env), `ray job list` and "
            f"Ray's logs to anyone who can reach the cluster. Give the nodes their own access instead "
            f"(an instance role for S3: see cluster.yaml; files on the nodes), or pass "
            f"--allow-secret-env if you accept that.")
