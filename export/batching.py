"""Request batching for the server: concurrent requests merged into model batches.

Requests that arrive while the model is busy wait in a queue; when it is free,
the batcher takes everything queued (up to `max_batch` images) as one batch. A
lone request runs at once (no added latency); under load, batches grow by
themselves. `delay_seconds` > 0 also waits that long for company before each
batch. The model runs in one worker thread, so the event loop keeps parsing
requests meanwhile.

Imports no TensorFlow.
"""

import asyncio
import concurrent.futures

import numpy as np

from export.validate import ClientError


def unavailable(message, retry_after=1):
    """The 503 of a server that cannot take this request now."""
    return ClientError(503, message, {"Retry-After": str(retry_after)})


class Batcher:
    """Merges concurrent requests into batches for `run` (see the module doc).

    `run(x)` returns an array or a tuple of arrays, each [len(x), ...]; every
    request gets its own rows. `on_batch(images)` is told of each batch run.
    Should its task ever end other than by `stop` (a bug, or the process out of
    memory), `failure` says why, `ready` turns False, and every waiting and later
    request gets a 503.
    """

    def __init__(self, run, max_batch, delay_seconds=0.0, on_batch=None):
        self._run, self._max_batch, self._delay = run, max_batch, delay_seconds
        self.on_batch = on_batch or (lambda images: None)
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "onnxruntime")
        self._task = None
        self._stopping = False
        self._held = None  # taken off the queue, waiting for the next batch
        self._group = []   # the batch the model is running
        self.failure = None
        self.requests = self.batches = self.images = 0

    @property
    def queued(self):
        """Requests waiting for the model."""
        return self._queue.qsize() + (self._held is not None)

    @property
    def ready(self):
        return self._task is not None and not self._task.done() and self.failure is None

    def check_ready(self):
        """Raises the 503 of a batcher that cannot take requests (see the class doc)."""
        if not self.ready:
            raise unavailable(f"the model is unavailable ({self.failure or 'not started'})",
                              retry_after=30)

    def start(self):
        self._task = asyncio.get_running_loop().create_task(self._serve())
        self._task.add_done_callback(self._ended)

    async def stop(self):
        self._stopping = True
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _ended(self, task):
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        self.failure = f"the batcher stopped: {error!r}" if error else "the batcher was cancelled"
        waiting = list(self._group) + ([self._held] if self._held else [])
        self._held, self._group = None, []
        while not self._queue.empty():
            waiting.append(self._queue.get_nowait())
        for _, future in waiting:
            if not future.done():
                try:
                    self.check_ready()
                except ClientError as err:
                    future.set_exception(err)

    async def predict(self, x):
        self.check_ready()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((x, future))
        return await future

    async def _serve(self):
        while True:
            first = self._held or await self._queue.get()
            self._held, self._group = None, [first]
            if self._delay:
                await asyncio.sleep(self._delay)
            group, size = [first], len(first[0])
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if size + len(item[0]) > self._max_batch:
                    self._held = item
                    break
                group.append(item)
                size += len(item[0])
            self._group = group
            try:
                x = group[0][0] if len(group) == 1 else np.concatenate([g[0] for g in group])
                out = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run, x)
            except Exception as err:  # a model failure answers these requests, not the loop
                for _, future in group:
                    if not future.done():
                        future.set_exception(err)
                self._group = []
                continue
            self.batches += 1
            self.requests += len(group)
            self.images += size
            self.on_batch(size)
            start = 0
            for part, future in group:
                end = start + len(part)
                if not future.done():  # a client that went away cancels its future
                    future.set_result(tuple(o[start:end] for o in out)
                                      if isinstance(out, tuple) else out[start:end])
                start = end
            self._group = []
