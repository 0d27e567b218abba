"""Process-level parallelism shared by the streaming stages (simulate, preprocess, ...)."""
from __future__ import annotations


def run_in_processes(fn, tasks, workers: int, initializer, initargs):
    """Yield ``fn(task)`` results (in completion order) from ``workers`` spawned processes,
    keeping at most 2 × workers tasks submitted at a time (tasks is consumed lazily)."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    it = iter(tasks)
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=initializer, initargs=initargs) as pool:
        pending = set()
        for t in it:
            pending.add(pool.submit(fn, t))
            if len(pending) >= 2 * workers:
                break
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                yield fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.add(pool.submit(fn, nxt))
