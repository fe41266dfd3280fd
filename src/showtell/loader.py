"""Photos decoded and resized ahead of the model: the next batch loads in threads while the current one is captioned.

PIL's decoders and resizing release the GIL, so threads decode in parallel. ``load_ahead`` pulls batches from its
source in a thread of its own (the source may block, as the server's request queue does), starts their loads, and
hands them over in order; at most ``ahead`` batches beyond the one being captioned are taken from the source, so
memory stays bounded whatever the length of the input.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")
MAX_WORKERS = 8  # a cap, so that a big machine does not decode 64 photos at once (memory) for a batch of 16


def default_workers() -> int:
    """Threads that decode photos: one per CPU core this process may use, at most ``MAX_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def process_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """Processes that decode photos, for :func:`load_ahead`'s ``pool``: where a GPU runs the model, decoding threads
    and the captioner's own Python share one interpreter lock, which held a GPU to a fraction of its speed. Forked,
    as torch's DataLoader does (no re-import of the caller's script, no start-up cost), all at once, here: before the
    loader's threads exist. Each computes in one thread and never touches the GPU."""
    pool = ProcessPoolExecutor(max_workers=workers or default_workers(), mp_context=multiprocessing.get_context("fork"),
                               initializer=_one_thread)
    pool.submit(int).result()  # with fork, the first task starts every process
    return pool


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


class _End:
    """The source is exhausted (``error`` None) or raised ``error``."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def load_ahead(batches: Iterable[Sequence[T]], load: Callable[[T], U], workers: int | None = None,
               ahead: int = 1, pool: Executor | None = None, chunk: int = 1) -> Iterator[tuple[Sequence[T], list[U]]]:
    """Each batch of ``batches`` with ``load`` applied to its items, in order. The items of a batch load in
    ``workers`` threads (default :func:`default_workers`), or in ``pool`` (the caller's, e.g. a
    :func:`process_pool`; then ``load`` and the items must pickle), ``chunk`` items a task (for processes: each task
    and result crosses a pipe, and the caller's share of that work was what bounded a GPU; see
    benchmarks/loader_ipc.py), and the next ``ahead`` batches start loading while the caller works on this one (0: a
    batch starts loading when it is asked for). An exception raised by ``load`` or by the source is raised here,
    after the batches before it."""
    if ahead < 0 or chunk < 1:
        raise ValueError(f"ahead must be >= 0 and chunk >= 1, got {ahead} and {chunk}")
    own = pool is None
    if own:
        pool = ThreadPoolExecutor(max_workers=workers or default_workers(), thread_name_prefix="showtell-load")
    slots = threading.Semaphore(ahead + 1)  # the batch the caller holds, and those loading ahead of it
    ready: queue.Queue[tuple[Sequence[T], list[Future]] | _End] = queue.Queue()
    closed = threading.Event()

    def feed() -> None:
        try:
            for batch in _acquired(batches, slots, closed):
                ready.put((batch, [pool.submit(_load_all, load, batch[i:i + chunk])
                                   for i in range(0, len(batch), chunk)]))
        except BaseException as e:  # noqa: BLE001 - handed to the caller, in order
            ready.put(_End(e))
        else:
            ready.put(_End())

    feeder = threading.Thread(target=feed, name="showtell-feed", daemon=True)
    feeder.start()
    try:
        while not isinstance(item := ready.get(), _End):
            batch, futures = item
            yield batch, [x for f in futures for x in f.result()]
            slots.release()
        if item.error is not None:
            raise item.error
    finally:
        closed.set()
        slots.release()  # wakes the feeder if it waits for a slot; it then stops
        # nothing may still be decoding once the caller has gone: a load running while the interpreter exits (an
        # error ended the run) aborted it ("terminate called without an active exception")
        feeder.join(timeout=5)
        if own:  # the caller's pool goes on (loads already started for batches nobody takes just finish)
            pool.shutdown(wait=True, cancel_futures=True)


def _load_all(load: Callable[[T], U], items: Sequence[T]) -> list[U]:
    return [load(item) for item in items]


def _acquired(batches: Iterable[Sequence[T]], slots: threading.Semaphore, closed: threading.Event) -> Iterator:
    """The batches, each taken from the source only once a slot is free and while the caller is still there."""
    it = iter(batches)
    while True:
        slots.acquire()
        if closed.is_set():
            return
        batch = next(it, None)
        if batch is None:
            return
        yield batch

