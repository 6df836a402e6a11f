"""Which environment variables are secrets, so they stay out of Ray's metadata; and secrets by
value (``redact``): credentials inside URIs, query strings, known token formats and the values
of secret-named variables are replaced by ``***`` in everything mmkd writes (MLflow params and
tags, the tracking journal, run records, stage manifests).

Whatever goes into a job's or a task's ``runtime_env`` is shown in plain text by Ray's dashboard
and written to its logs and state API. mmkd therefore never puts credentials there: on a cluster
the nodes get object-store access from their instance role (cluster.yaml), and locally the stage
tasks read the credential chain the raylet inherited from the process that started Ray (its
environment, ``~/.aws/credentials``, an instance role) — the same one the driver reads.
"""

from __future__ import annotations

import os
import re
from typing import Any

# Words of a name (split at "_") that mark a secret: AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
# HF_TOKEN, MLFLOW_TRACKING_PASSWORD, OPENAI_API_KEY, AWS_ACCESS_KEY_ID, ...
_SECRET_WORDS = {"SECRET", "SECRETS", "TOKEN", "PASSWORD", "PASSWD", "PASS", "CREDENTIAL",
                 "CREDENTIALS", "PRIVATE", "KEY", "APIKEY"}
# ... but a path to a file holding one is not (AWS_SHARED_CREDENTIALS_FILE, RAY_AUTH_TOKEN_PATH)
_PATH_WORDS = {"FILE", "PATH", "DIR"}
# KEY marks a secret only beside one of these (OPENAI_API_KEY, AWS_ACCESS_KEY_ID)
_KEY_QUALIFIERS = {"API", "ACCESS", "PRIVATE", "SECRET", "ACCOUNT", "SIGNING", "ENCRYPTION",
                   "AUTH", "LICENSE", "MASTER", "SSH"}
# words that mark a secret only in such names: AZURE_STORAGE_SAS, SENTRY_DSN, GITHUB_PAT
_SECRET_TAIL_WORDS = {"SAS", "DSN", "PAT"}
# whole names whose values embed credentials (a connection string; an index URL with a
# password; a service account's JSON)
_SECRET_NAMES = {"AZURE_STORAGE_CONNECTION_STRING", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL",
                 "GCP_SA_JSON", "GOOGLE_APPLICATION_CREDENTIALS_JSON", "DATABASE_URL"}


def looks_secret(name: str) -> bool:
    """True for names that usually hold credentials (AWS_ACCESS_KEY_ID included: an access key
    id alone is not a secret, but it is useless without its secret and names the account)."""
    upper = name.upper()
    if upper in _SECRET_NAMES:
        return True
    words = upper.replace(".", "_").replace("-", "_").split("_")
    marks = {w for w in words if w in _SECRET_WORDS or "SECRET" in w or "PASSW" in w}
    if words[-1] in _SECRET_TAIL_WORDS:
        marks.add(words[-1])
    if marks == {"KEY"} and not set(words) & _KEY_QUALIFIERS:
        return False  # a stage key, a cache key, `key_parts`: not credentials
    return bool(marks) and words[-1] not in _PATH_WORDS


# ------------------------------------------------------------------------- secrets by value

_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@\s'\"]+)@")
_QUERY = re.compile(r"([?&;])([^=&\s#'\"]+)=([^&\s#'\"]+)")
_QUERY_SECRETS = {"sig", "signature", "x-amz-signature", "x-amz-credential",
                  "x-amz-security-token", "sas", "token", "password", "secret", "access_key",
                  "secret_key", "session_token", "accountkey", "sharedaccesssignature", "key",
                  "api_key", "apikey", "auth"}
# well-known token formats: Hugging Face, GitHub, OpenAI-style, AWS access key ids, Slack
_TOKENS = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|"
                     r"sk-[A-Za-z0-9_-]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|xox[abprs]-[\w-]{10,})\b")
# Azure connection strings: AccountKey=...; SharedAccessSignature=...
_KEYVALUE = re.compile(r"\b(AccountKey|SharedAccessSignature|Password|Pwd)=([^;\s'\"]+)",
                       re.IGNORECASE)
MASK = "***"


def _env_secret_values() -> list[str]:
    """Values of this process's secret-named variables (long enough not to match by chance)."""
    values = [v for k, v in os.environ.items() if looks_secret(k) and len(v) >= 8]
    return sorted(set(values), key=len, reverse=True)


def redact_text(text: str) -> str:
    """``text`` with every credential it holds replaced by ``***``."""
    if not text:
        return text
    out = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK}@", text)
    out = _QUERY.sub(lambda m: (f"{m.group(1)}{m.group(2)}={MASK}"
                                if m.group(2).lower() in _QUERY_SECRETS
                                or looks_secret(m.group(2)) else m.group(0)), out)
    out = _KEYVALUE.sub(lambda m: f"{m.group(1)}={MASK}", out)
    out = _TOKENS.sub(MASK, out)
    for value in _env_secret_values():
        out = out.replace(value, MASK)
    return out


def redact(obj: Any, key: str = "") -> Any:
    """``obj`` (str, dict, list, tuple, anything else left as is) with credentials replaced; a
    mapping value under a secret-looking key (``hf_token: ...``) is replaced whole."""
    if isinstance(obj, str):
        if key and looks_secret(key.rsplit(".", 1)[-1]) and len(obj) >= 8 and " " not in obj:
            return MASK  # `hf_token: ...` (not `image_token: <image>`)
        if "=" in obj and key == "" and looks_secret(obj.split("=", 1)[0].rsplit(".", 1)[-1]):
            return f"{obj.split('=', 1)[0]}={MASK}"  # an override: stages.x.params.hf_token=...
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def contains_secret(text: str) -> bool:
    return redact_text(text) != text


def refusal(names: list[str]) -> str:
    """The sentence `mmkd submit --env` prints when it refuses secret-looking names."""
    listed = ", ".join(sorted(names))
    return (f"--env {listed}: this looks like a secret, and a job's environment is shown in "
            f"plain text by the Ray dashboard (Jobs → the job → runtime_env), `ray job list` and "
            f"Ray's logs to anyone who can reach the cluster. Give the nodes their own access instead "
            f"(an instance role for S3: see cluster.yaml; files on the nodes), or pass "
            f"--allow-secret-env if you accept that.")
