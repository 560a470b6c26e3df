"""A background thread that applies ledger writes in batches, so dispatch never waits on disk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mle_cli.ledger._ledger import Ledger, LedgerError

__all__ = ["LedgerWriter"]

log = logging.getLogger(__name__)

Write = Callable[[Ledger], None]
_MAX_BATCH = 500
_LINGER = 0.02  # seconds


class LedgerWriter:
    """Queue writes with `submit`; `await flush()` returns once all earlier writes are committed."""

    def __init__(self, path: Path) -> None:
        self._ledger_path = path
        self._queue: queue.SimpleQueue[Write | asyncio.Future[None] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mle-ledger-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def submit(self, write: Write) -> None:
        """Queue a write; it will be committed with the next batch."""
        self._queue.put(write)

    async def flush(self) -> None:
        """Wait until every write submitted so far is committed (re-raises a failed write)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put(future)
        await future

    def close(self) -> None:
        """Commit what is queued and stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        try:
            ledger = Ledger(self._ledger_path)
        except BaseException as e:  # noqa: BLE001 - re-raised by the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._run_batch(ledger):
                pass
        finally:
            ledger.close()

    def _run_batch(self, ledger: Ledger) -> bool:
        items = [self._queue.get()]
        # Writes wait up to _LINGER for more, unless a flush (or close) asks for them: one commit
        # for a step's writes instead of one per write, and fewer wake-ups of this thread. They
        # are applied only then: the write lock is held for the commit alone, never for the
        # linger, so `mle cancel`, `mle approve` or another run writing this ledger get it at once.
        deadline = time.monotonic() + _LINGER
        while len(items) < _MAX_BATCH and callable(items[-1]):
            try:
                items.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        writes = [i for i in items if callable(i)]
        if writes and self._error is None:
            try:
                with ledger.transaction():
                    for write in writes:
                        write(ledger)
            except Exception as e:  # a bug or a broken disk: fail every later flush
                log.exception("ledger write failed")
                self._error = LedgerError(f"ledger write failed: {type(e).__name__} {e}".strip())
        for item in items:
            if isinstance(item, asyncio.Future):
                self._resolve(item)
        return None not in items

    def _resolve(self, future: asyncio.Future[None]) -> None:
        def settle() -> None:
            if future.done():
                return
            if self._error is not None:
                future.set_exception(self._error)
            else:
                future.set_result(None)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            future.get_loop().call_soon_threadsafe(settle)
