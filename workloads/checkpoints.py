"""What a training checkpoint holds beside DeepSpeed's files, and how every file of it is read
back without running code from the store.

A checkpoint folder lives in the artifact store, which a team may share: anyone who can write
there could plant a pickle whose ``__reduce__`` runs on every node that resumes. So:

- each worker's state (data position, every RNG's state) is ``mmkd_worker_<rank>.json`` (the
  position, Python's and NumPy's generators) + ``mmkd_worker_<rank>.safetensors`` (torch's and
  CUDA's generator states); no pickle. A ``.pt`` state file of an older mmkd is never opened
  (that worker resumes its data from the epoch's start, as before such files existed).
- DeepSpeed's own ``.pt`` files are read with ``torch.load(weights_only=True)``: tensors,
  containers and numbers, plus the three DeepSpeed classes its optimizer states name
  (``DEEPSPEED_GLOBALS``, plain data holders); any other global is refused, in one paragraph
  naming the file (``UnsafeCheckpointError``), before anything in it is constructed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from typing import Any, Iterator

from workloads.errors import StageError

__all__ = ["UnsafeCheckpointError", "save_worker_state", "load_worker_state",
           "refusing_pickled_code"]


class UnsafeCheckpointError(StageError):
    """A checkpoint file names code to run (a pickled global mmkd does not allow)."""


def _state_files(d: str, rank: int) -> tuple[str, str]:
    base = os.path.join(d, f"mmkd_worker_{rank}")
    return base + ".json", base + ".safetensors"


def save_worker_state(d: str, rank: int, position: dict[str, int]) -> None:
    """This rank's data position (epoch, rows taken in it) and every RNG it draws from."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    meta = {"position": {k: int(v) for k, v in position.items()},
            "numpy": {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss": gauss}}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    json_path, st_path = _state_files(d, rank)
    save_file(tensors, st_path)
    with open(json_path, "w") as f:
        json.dump(meta, f)


def load_worker_state(d: str, rank: int) -> dict[str, int]:
    """Restore what :func:`save_worker_state` saved; returns the data position."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    json_path, st_path = _state_files(d, rank)
    if not (os.path.exists(json_path) and os.path.exists(st_path)):
        return {"epoch": 0, "rows": 0}
    with open(json_path) as f:
        meta = json.load(f)
    tensors = load_file(st_path)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    return {k: int(v) for k, v in meta["position"].items()}


def _deepspeed_globals() -> list[Any]:
    """The non-tensor classes DeepSpeed's own checkpoint files name (seen with DeepSpeed 0.19,
    ZeRO 0-3): plain records with no code of their own in unpickling."""
    found = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            mod = __import__(module, fromlist=[name])
            found.append(getattr(mod, name))
        except (ImportError, AttributeError):
            continue
    return found


@contextlib.contextmanager
def refusing_pickled_code(what: str) -> Iterator[None]:
    """Within the block, every ``torch.load`` (DeepSpeed's included) runs with
    ``weights_only=True`` and DeepSpeed's few record classes allowed; a file naming any other
    global raises :class:`UnsafeCheckpointError` (``what`` says whose checkpoint it is)."""
    import pickle

    import torch

    original = torch.load
    allowed = _deepspeed_globals()

    def safe_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            first = str(e).split("\n")
            named = next((line.strip() for line in first if "GLOBAL" in line), first[0])
            raise UnsafeCheckpointError(
                f"{what}: checkpoint file {f} holds pickled code mmkd does not run ({named}); "
                f"a checkpoint is read as tensors and plain data only, because anyone who can "
                f"write to the artifact store could plant such a file. If you did not write it, "
                f"the store may have been tampered with: remove that checkpoint folder (the "
                f"stage then starts from step 0) or run the stage with --force.") from None

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = original
