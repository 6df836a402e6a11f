"""Bad-sample accounting that survives Ray Data's many worker processes.

Design: readers flag a bad sample in its ``bad`` column; preprocessing (running in any number
of ``map_batches`` tasks) drops flagged/failed rows and sends one small tally per batch to a
single Ray actor. The actor is the one place that knows the totals, so the stage can read
``data/skipped_<kind>`` metrics from it at any time, and the per-batch call returns the totals
so the *first* batch that pushes the bad fraction over ``max_bad_fraction`` (once at least
``min_samples`` were seen, so a few early bad rows do not trip it) raises in the worker and
fails the dataset with a message naming the dominant cause and an example. Callers also call
``check()`` at the end of each epoch, which applies the budget to whatever was seen.

Outside Ray (plain loops, unit tests) the same object keeps the state in-process.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from workloads.errors import StageError

logger = logging.getLogger("mmkd.data")

MALFORMED_JSON = "malformed_json"        # not JSON, nested too deeply, or no usable conversation
MISSING_IMAGE = "missing_image"          # `image` names a file that is not there
CORRUPT_IMAGE = "corrupt_image"          # the image bytes do not decode
IMAGE_TOKEN_MISMATCH = "image_token_mismatch"
TOO_LONG = "too_long"
TRUNCATED_SHARD = "truncated_shard"      # a shard ends mid-member: that sample and the rest lost
NON_UTF8 = "non_utf8"                    # a record (JSON line/element, .json/.txt member) not UTF-8
WRONG_FIELD_TYPE = "wrong_field_type"    # e.g. a list-valued `image`, a dict-valued `conversations`
UNSAFE_PATH = "unsafe_path"              # `image` is absolute or climbs out of image_root (../)
OVERSIZE_IMAGE = "oversize_image"        # over MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS (not decoded)
BAD_KINDS = (MALFORMED_JSON, MISSING_IMAGE, CORRUPT_IMAGE, IMAGE_TOKEN_MISMATCH, TOO_LONG,
             TRUNCATED_SHARD, NON_UTF8, WRONG_FIELD_TYPE, UNSAFE_PATH, OVERSIZE_IMAGE)
# Caps checked before decoding, so one hostile or broken file cannot exhaust a worker's memory:
# bytes from the file size / tar header (the image is then not read), pixels from the header.
MAX_IMAGE_BYTES = 32 << 20
# any other tar member (.json, .txt, ...): a sample's text is KBs; a 20 GB member is not read
MAX_MEMBER_BYTES = int(__import__("os").environ.get("MMKD_MAX_TAR_MEMBER_BYTES", 64 << 20))
MAX_IMAGE_PIXELS = 8192 * 8192
# Kept, not skipped: counted for visibility but not part of the error budget.
TRUNCATED = "truncated"
MAX_EXAMPLES_PER_KIND = 5

__all__ = ["BAD_KINDS", "TRUNCATED", "MAX_IMAGE_BYTES", "MAX_MEMBER_BYTES", "MAX_IMAGE_PIXELS", "DataQualityError",
           "SampleQuality", "QualityState"]


class DataQualityError(StageError):
    """Too many bad samples: the data (or the preprocessing settings) need fixing. Retrying
    cannot help: Ray Train raises it at once instead of restarting the workers."""


class QualityState:
    """The totals. Runs as a Ray actor (``SampleQuality.create(use_ray=True)``) or in-process."""

    def __init__(self, max_bad_fraction: float, min_samples: int, name: str):
        self.max_bad_fraction = max_bad_fraction
        self.min_samples = min_samples
        self.name = name
        self.seen = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, seen: int, counts: dict[str, int], examples: list[tuple[str, str]]) -> str:
        """Record one batch; returns the budget error message ("" when within budget)."""
        self.seen += seen
        self.counts.update(counts)
        for kind, where in examples:
            kept = self.examples.setdefault(kind, [])
            if len(kept) < MAX_EXAMPLES_PER_KIND:
                kept.append(where)
                logger.warning("%s: skipped sample (%s) %s", self.name, kind, where)
        return self.budget_error(self.min_samples)

    def bad(self) -> int:
        return sum(self.counts[k] for k in BAD_KINDS)

    def budget_error(self, min_samples: int = 0) -> str:
        if self.seen == 0 or self.seen < min_samples:
            return ""
        fraction = self.bad() / self.seen
        if fraction <= self.max_bad_fraction:
            return ""
        kind, n = max(((k, self.counts[k]) for k in BAD_KINDS), key=lambda kv: kv[1])
        example = (self.examples.get(kind) or ["?"])[0]
        return (f"{self.name}: {self.bad()} of {self.seen} samples were bad ({fraction:.1%}), "
                f"over max_bad_fraction={self.max_bad_fraction:.1%}. Most are {kind!r} "
                f"({n}), e.g. {example}. Fix the data, or raise max_bad_fraction if this is "
                f"expected.")

    def reset(self) -> None:
        self.__init__(self.max_bad_fraction, self.min_samples, self.name)

    def snapshot(self) -> dict[str, Any]:
        return {"seen": self.seen, "counts": dict(self.counts),
                "examples": {k: list(v) for k, v in self.examples.items()}}


class SampleQuality:
    """Handle to the bad-sample totals of one dataset; picklable into Ray tasks. The totals
    live in-process, in a small actor of their own, or, in a pipeline run, in the run's
    progress hub (``host``: one process fewer per training stage)."""

    def __init__(self, state: Any, where: str, key: str = ""):
        self._state = state
        self._where = where  # "local" | "actor" | "hosted"
        self._key = key

    @classmethod
    def create(cls, max_bad_fraction: float = 0.01, min_samples: int = 1000,
               name: str = "data", use_ray: bool = True, host: Any = None) -> "SampleQuality":
        """``host``: an actor with ``host(key, state)`` and ``call(key, method, *args)`` (the
        run's progress hub, ``StageContext.reporter``) that keeps the totals."""
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        state = QualityState(max_bad_fraction, min_samples, name)
        if not use_ray:
            return cls(state, "local")
        import ray

        if host is not None:
            import uuid

            key = f"quality/{name}/{uuid.uuid4().hex}"
            ray.get(host.host.remote(key, state))
            return cls(host, "hosted", key)
        actor = ray.remote(num_cpus=0)(QualityState).remote(max_bad_fraction, min_samples, name)
        return cls(actor, "actor")

    def _call(self, method: str, *args: Any) -> Any:
        if self._where == "local":
            return getattr(self._state, method)(*args)
        import ray

        if self._where == "hosted":
            return ray.get(self._state.call.remote(self._key, method, *args))
        return ray.get(getattr(self._state, method).remote(*args))

    def record(self, seen: int, counts: dict[str, int], examples: list[tuple[str, str]]) -> None:
        """Called by preprocessing once per batch; raises when the budget is exceeded."""
        if not seen and not counts:
            return
        error = self._call("add", seen, counts, examples)
        if error:
            raise DataQualityError(error)

    def reset(self) -> None:
        """Forget the counts (after a pass that only counted rows, e.g. to plan the steps)."""
        self._call("reset")

    def check(self) -> None:
        """Apply the error budget to everything seen so far (call at the end of an epoch)."""
        error = self._call("budget_error", 0)
        if error:
            raise DataQualityError(error)

    def metrics(self) -> dict[str, float]:
        """``data/seen``, ``data/skipped_<kind>`` for every kind, and ``data/truncated``."""
        snap = self._call("snapshot")
        out = {"data/seen": float(snap["seen"])}
        out.update({f"data/skipped_{k}": float(snap["counts"].get(k, 0)) for k in BAD_KINDS})
        out["data/truncated"] = float(snap["counts"].get(TRUNCATED, 0))
        return out

    def warnings(self) -> list[str]:
        """One line per recorded example (at most 5 per kind), naming its file and key."""
        snap = self._call("snapshot")
        return [f"skipped {kind} sample {where}"
                for kind, wheres in sorted(snap["examples"].items()) for where in wheres]

    def report(self, ctx: Any, step: int | None = None) -> None:
        """Send the metrics and the example warnings to a ``StageContext``."""
        ctx.report(self.metrics(), step=step)
        for line in self.warnings():
            ctx.log(line, level="warning")
