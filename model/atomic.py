"""Atomic file writes, the one way every part of anomalyd writes a file another reader may open at any moment
(checkpoints, reference banks, artifacts, reports, training results).

The data goes to a hidden temporary sibling, `.<name>.<pid>.<thread>.tmp` (one per writer, so processes and
threads writing the same target never share it), which then replaces the target with `os.replace`: a reader sees
the old file or the new one, never half of one. A failed write removes the temporary file. Leftovers of a crash
match `.*.tmp` (`adapters.storage.cleanup_stale_tmp` sweeps them in the artifact store).

It lives in `model/` because the model's checkpoint writers use it and `model/` imports nothing from the outer
layers; `adapters/` and `daemon/` import it from here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temporary_sibling(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | Path, *, make_parents: bool = True) -> Iterator[Path]:
    """Yields the temporary path to write (by any means: `torch.save`, `save_file`, ...); when the block ends
    without an exception it replaces `path`, otherwise it is removed."""
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; a missing parent folder is made (only when the first open fails, which
    saves a stat per file on the artifact store's hot path)."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        handle = open(tmp, "wb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(tmp, "wb")  # noqa: SIM115
    try:
        with handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))
