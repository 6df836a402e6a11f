"""Writing output folders so that nobody ever sees half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def atomic_dir(out_dir: str) -> Iterator[str]:
    """Yield a temp folder next to ``out_dir``; on success it replaces ``out_dir`` in one rename,
    on any error it is deleted and ``out_dir`` is left as it was."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(out_dir)}-", dir=parent)
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
