"""Task output: the two log files the shim writes, followed line by line from saved offsets.

Lines are split as they always were: at `\\n` (a `\\r` stays in the text), cut at `max_log_line`
bytes without splitting a UTF-8 character, decoded with replacement characters; the unterminated
rest of a file becomes a line only once the task is over. Each line carries the file offset just
past it, which the outbox commits with the event, so a restarted agent reads on from exactly the
next line. The split depends only on the bytes, never on how they were chunked by the reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mle_proto.v1 import agent_pb2 as pb

__all__ = ["POLL_INTERVAL", "LineSink", "LineSplitter", "LogFollower"]

log = logging.getLogger(__name__)

LineSink = Callable[["pb.LogStream.ValueType", str, int], None]  # stream, text, offset after it
POLL_INTERVAL = 0.05
_CHUNK = 64 * 1024  # per file and read: the events of one chunk are committed before the next


class LineSplitter:
    """Splits a byte stream into lines of at most max_line bytes."""

    def __init__(self, max_line: int) -> None:
        self._max = max_line
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes fed but not yet part of a line."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        """Every line completed by data, each with the number of bytes it consumed."""
        self._buffer += data
        lines = []
        while self._buffer:
            newline = self._buffer.find(b"\n", 0, self._max + 1)
            if newline >= 0:
                lines.append(self._take(newline, newline + 1))
            elif len(self._buffer) > self._max:  # data[max] exists: _utf8_boundary may look at it
                cut = _utf8_boundary(self._buffer, self._max)
                lines.append(self._take(cut, cut))
            else:
                break
        return lines

    def rest(self) -> list[tuple[bytes, int]]:
        """The unterminated last line, if any (at the end of the stream)."""
        return [self._take(len(self._buffer), len(self._buffer))] if self._buffer else []

    def _take(self, end: int, consumed: int) -> tuple[bytes, int]:
        line = bytes(self._buffer[:end])
        del self._buffer[:consumed]
        return line, consumed


class LogFollower:
    """Follows a task's stdout and stderr files from saved offsets, emitting lines to a sink."""

    def __init__(
        self,
        files: Sequence[tuple[Path, pb.LogStream.ValueType, int]],
        sink: LineSink,
        max_line: int,
    ) -> None:
        self._files = [_LogFile(path, stream, offset, max_line) for path, stream, offset in files]
        self._sink = sink
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Poll the files every POLL_INTERVAL until close() (a quick task is only read there)."""
        self._schedule(POLL_INTERVAL)

    async def close(self) -> None:
        """Stop polling, emit everything left (unterminated last lines too), close the files."""
        if self._timer is not None:
            self._timer.cancel()
        while self.read():
            await asyncio.sleep(0)  # let the lines of each chunk be committed
        for file in self._files:
            file.finish(self._sink)

    def read(self) -> bool:
        """Emit the lines in up to one chunk of each file; return whether more may be waiting."""
        more = [file.read(self._sink) for file in self._files]
        return any(more)

    def _poll(self) -> None:
        self._schedule(0 if self.read() else POLL_INTERVAL)

    def _schedule(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._poll)


class _LogFile:
    """One log file, read from the offset just past the last line emitted."""

    def __init__(self, path: Path, stream: pb.LogStream.ValueType, offset: int, max_line: int):
        self._path = path
        self._stream = stream
        self._offset = offset
        self._splitter = LineSplitter(max_line)
        self._fd: int | None = None
        self._failed = False

    def read(self, sink: LineSink) -> bool:
        """Emit the lines completed by the next chunk; return whether the chunk was full."""
        data = self._next_chunk()
        for line, used in self._splitter.feed(data):
            self._offset += used
            sink(self._stream, line.decode("utf-8", errors="replace"), self._offset)
        return len(data) == _CHUNK

    def finish(self, sink: LineSink) -> None:
        """Emit the unterminated rest and close the file."""
        for line, used in self._splitter.rest():
            self._offset += used
            sink(self._stream, line.decode("utf-8", errors="replace"), self._offset)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _next_chunk(self) -> bytes:
        if self._fd is None and not self._failed:
            with contextlib.suppress(FileNotFoundError):  # nothing written, nothing to read
                self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        if self._fd is None:
            return b""
        try:
            return os.pread(self._fd, _CHUNK, self._offset + self._splitter.pending)
        except OSError as exc:  # an I/O error must not take the agent down: stop reading this log
            if not self._failed:
                log.warning("cannot read %s: %s", self._path, exc)
            self._failed = True
            return b""


def _utf8_boundary(data: bytearray, limit: int) -> int:
    """The largest cut <= limit that does not split a UTF-8 sequence (when it can)."""
    cut = limit
    while cut > limit - 4 and cut > 0 and data[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut if cut > 0 else limit
