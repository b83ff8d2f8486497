"""Stage one's audio decoding: worker processes that decode batches of files while the device encodes.

`Decoder` spawns its workers once per run and keeps up to `AHEAD` batches per worker in flight;
each batch comes back as one float32 tensor in shared memory (`_decode_shared`, `_unpack`). A
worker that dies costs only the file that killed it. `wait_result` waits for a future in slices,
so that Ctrl-C is not held behind a batch being decoded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait as wait_futures
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from ser_cache.data import audio as audio_lib
from ser_cache.features.errors import ExtractError

MIN_SECONDS = 0.05  # shorter than a WavLM/Whisper frame or two: nothing to pool
WAIT_SLICE = 0.25  # seconds: the longest a pending Ctrl-C waits in the main thread (see `wait_result`)


def wait_result(future: Future):
    """`future.result()`, waited for in slices of WAIT_SLICE seconds.

    Python runs a signal's handler (Ctrl-C's KeyboardInterrupt) in the main thread, but the kernel
    may hand the signal to any thread of the process; the main thread then learns of it only
    when it next runs Python code. A wait with no timeout would hold Ctrl-C until the future is
    done: a whole batch's decoding, or for ever behind a stuck file. A sliced wait raises it
    within a slice.
    """
    while not future.done():
        wait_futures([future], timeout=WAIT_SLICE)
    return future.result()


def _decode_shared(decode, paths: list[str], kwargs: dict):
    """In a worker: decode a batch into one flat float32 tensor, its lengths and the failures.

    One tensor travels back through shared memory (torch's pickling of tensors), not through the
    pipe: a pickled list of arrays was about 3× slower to hand over (docs/performance.md).
    """
    import torch
    import torch.multiprocessing  # noqa: F401  (registers the shared-memory pickling of tensors)

    out = decode(paths, **kwargs)
    waves = [w for w, _ in out if w is not None]
    flat = torch.from_numpy(np.concatenate(waves)) if waves else torch.empty(0)
    return flat, [None if w is None else len(w) for w, _ in out], [reason for _, reason in out]


def _unpack(flat, lengths: list, reasons: list) -> list:
    """`_decode_shared`'s result as [(waveform view or None, reason or None), ...]."""
    data = flat.numpy()
    out, start = [], 0
    for n, reason in zip(lengths, reasons):
        if n is None:
            out.append((None, reason))
        else:
            out.append((data[start:start + n], None))
            start += n
    return out


class Decoder:
    """Decodes batches of files in worker processes that live for the whole run.

    The workers are spawned once per run, not once per unit of chunks (a spawn costs a second or
    more, which at GPU rates is a unit's worth of encoding), and not forked: the parent runs
    Zarr's I/O thread. Up to `AHEAD` batches per worker are in flight, so the workers decode while
    the device encodes; each batch comes back as one tensor in shared memory. A worker that dies
    (a decoder crash on a malformed file) costs only that file: the batch is decoded again one
    file per task in fresh workers, and the file that kills a worker again is reported as failed.
    Workers that die with no file at all (they cannot start) stop the run with an error instead.
    """

    AHEAD = 4

    def __init__(self, workers: int, max_seconds: float, decode=None):
        self.workers = workers
        self.kwargs = {"max_seconds": max_seconds, "min_seconds": MIN_SECONDS}
        self.decode = decode or audio_lib.load_many
        self._pool = None

    def _executor(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from ser_cache.infra.workers import init_worker

            # init_worker: a worker dies with this process (even one killed with SIGKILL) and
            # leaves Ctrl-C to it. Created and grown from the main thread (see workers.py).
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=init_worker, initargs=(os.getpid(),))
        return self._pool

    def _submit(self, paths: list[str]):
        return self._executor().submit(_decode_shared, self.decode, paths, self.kwargs)

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self, grace: float = 2.0) -> None:
        """Stop the workers. At the end of a run they are idle and leave at once; when the run stops
        early (Ctrl-C, --on-error fail) batches may still be decoding, and a worker still busy
        after `grace` seconds is terminated rather than waited for."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + grace
        for p in processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(grace)

    def batches(self, path_batches: list[list[str]], timings: dict) -> Iterator[list]:
        """For each batch of paths, in order: [(waveform or None, reason or None), ...]."""
        if self.workers == 0:
            for paths in path_batches:
                t = time.perf_counter()
                out = self.decode(paths, **self.kwargs)
                timings["decode_wait"] += time.perf_counter() - t
                yield out
            return
        from collections import deque

        todo = iter(path_batches)
        in_flight: deque = deque()

        def submit() -> None:
            paths = next(todo, None)
            if paths is not None:
                in_flight.append((paths, self._submit(paths)))

        for _ in range(self.AHEAD * self.workers):
            submit()
        while in_flight:
            paths, future = in_flight.popleft()
            t = time.perf_counter()
            try:
                out = _unpack(*wait_result(future))
            except BrokenProcessPool:
                self._check_workers_start()
                out = self._isolate(paths)
                # Every batch in flight died with the pool: send them again to the new one.
                again = [p for p, _ in in_flight]
                in_flight.clear()
                for p in again:
                    in_flight.append((p, self._submit(p)))
            timings["decode_wait"] += time.perf_counter() - t
            submit()
            yield out

    def _check_workers_start(self) -> None:
        """After a worker died: can fresh workers run at all? If a task that decodes nothing kills
        them too, the cause is the environment, not a file, and blaming the files would mark every
        row failed."""
        self._restart()
        try:
            wait_result(self._submit([]))
        except BrokenProcessPool:
            self._restart()
            raise ExtractError("the audio decoding worker processes die as they start (see the messages above); "
                               "pass --workers 0 to decode in the main process") from None

    def _isolate(self, paths: list[str]) -> list:
        """Decode a batch whose worker died one file per task; a file that kills a worker fails.

        Runs on the fresh workers `_check_workers_start` leaves, restarting them only after a crash.
        """
        out = []
        for path in paths:
            try:
                out.extend(_unpack(*wait_result(self._submit([path]))))
            except BrokenProcessPool:
                out.append((None, "decoding crashed the worker process (a malformed file?)"))
                self._restart()
        return out
