"""Single-threaded workers for the candidate search: `split_rows(function, queries, *args)`.

The candidate search is ~15 short operations per block of queries. Run with PyTorch's intra-op threads, each of
them is a parallel region whose threads meet at a barrier; on a loaded machine (other processes on the same cores)
every barrier waits for a descheduled thread, and the search is then no faster on 2 threads than on 1. Here each of
`torch.get_num_threads()` persistent threads takes shares of the queries in turn, with one OpenMP thread of its
own (set with `omp_set_num_threads`, which is per calling thread; the process-wide setting is not touched), so the
threads never wait on each other until the end. Where the OpenMP runtime cannot be reached (another build), the
function runs as is, on the intra-op threads.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

MIN_ROWS_PER_WORKER = 256  # below this a share is too small to pay for the hand-over
# larger calls are cut into shares of at most this many rows: their working set stays in cache, and on a loaded
# machine the shares balance the workers (measured at 8192 rows, load 6.6: 452 ms in shares of 256, 995 in 2 halves)
MAX_ROWS_PER_SHARE = 256
SERIAL_ROWS_PER_SHARE = 1024  # on one thread: shares of 256 cost ~10 % more than 1024 (fixed costs per call)
_local = threading.local()


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime PyTorch is linked with (torch/lib/libgomp.so.1), or None."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        path = Path(torch.__file__).parent / "lib" / name
        if path.is_file():
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                return None
    return None


def _single_threaded() -> None:
    torch.get_num_threads()  # PyTorch's lazy per-thread set-up first, else it would reset the count below
    _openmp().omp_set_num_threads(1)
    _local.worker = True


@functools.cache
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per thread count and process (a forked child has the parent's pool object but not its threads)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="patchcore-search", initializer=_single_threaded)


def split_rows(function: Callable[..., tuple[torch.Tensor, ...]], queries: torch.Tensor, *args,
               ) -> tuple[torch.Tensor, ...]:
    """`function(queries, *args)` (a tuple of tensors whose first dimension follows the queries' rows), the rows cut
    into shares of at most MAX_ROWS_PER_SHARE run by single-threaded workers when there are enough rows (a worker
    that is descheduled simply takes fewer shares), else into shares of SERIAL_ROWS_PER_SHARE run one after the other
    here; the results concatenated."""
    n_rows = queries.shape[0]
    workers = min(torch.get_num_threads(), n_rows // MIN_ROWS_PER_WORKER)
    parallel = workers >= 2 and not getattr(_local, "worker", False) and queries.device.type == "cpu" \
        and _openmp() is not None
    n_shares = -(-n_rows // (MAX_ROWS_PER_SHARE if parallel else SERIAL_ROWS_PER_SHARE))
    if n_shares <= 1 and not parallel:
        return function(queries, *args)
    shares = queries.tensor_split(max(n_shares, workers if parallel else 1))
    if parallel:
        futures = [_pool(workers, os.getpid()).submit(function, share, *args) for share in shares]
        results = [future.result() for future in futures]
    else:
        results = [function(share, *args) for share in shares]
    return tuple(torch.cat(parts) for parts in zip(*results, strict=True))
