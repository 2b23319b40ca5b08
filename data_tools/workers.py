"""Case work spread over worker processes, results back in job order."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any


def ordered_map(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> Iterator[Any]:
    """Results in job order, with at most 2 x workers results waiting so memory stays bounded."""
    if workers <= 1:
        yield from map(fn, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
        todo = iter(jobs)
        try:
            for job in todo:
                pending.append(pool.submit(fn, job))
                if len(pending) >= 2 * workers:
                    break
            while pending:
                result = pending.popleft().result()
                for job in todo:
                    pending.append(pool.submit(fn, job))
                    break
                yield result
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
