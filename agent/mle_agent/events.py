"""Per-task event sequencing: assign seq, commit to the outbox, then wake watchers."""

from __future__ import annotations

import asyncio
import time

from mle_agent.outbox import FINAL_STATES, Outbox, State
from mle_proto.v1 import agent_pb2 as pb

__all__ = ["TaskEvents"]


class TaskEvents:
    """The event stream of one live task.

    Log lines are buffered and committed together on the next loop iteration (one transaction per
    batch, not per line); state changes and the result are committed at once, after any buffered
    lines. Each line's log file offset is committed with it, so a restarted agent reads on from
    exactly the next line. Watchers are woken only after the commit, so nothing is sent that the
    outbox lacks.
    """

    def __init__(self, outbox: Outbox, task_id: str, last_seq: int, state: State) -> None:
        self._outbox = outbox
        self.task_id = task_id
        self.last_seq = last_seq
        self.state = state
        self.changed = asyncio.Event()
        self._pending: list[pb.TaskEvent] = []
        self._offsets: dict[int, int] = {}  # by stream: the log offset just past the last line
        self._flush_scheduled = False

    @property
    def final(self) -> bool:
        """Whether the result has been committed."""
        return self.state in FINAL_STATES

    def log(self, stream: pb.LogStream.ValueType, text: str, offset: int) -> None:
        """Buffer one line ending at offset in its log file; committed on the next iteration."""
        self._pending.append(pb.TaskEvent(log=pb.LogLine(stream=stream, text=text)))
        self._offsets[stream] = offset
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def set_state(self, state: State, message: str = "") -> None:
        """Commit a state change (and any buffered lines before it)."""
        self._pending.append(pb.TaskEvent(state=pb.StateChange(state=state, message=message)))
        self.flush(state=state)

    def finish(self, result: pb.TaskResult) -> None:
        """Commit the final event; nothing may follow it."""
        self._pending.append(pb.TaskEvent(result=result))
        self.flush(state=result.state, exit_code=result.exit_code, finished=time.time())

    def flush(
        self,
        *,
        state: State | None = None,
        exit_code: int | None = None,
        finished: float | None = None,
    ) -> None:
        """Assign seqs to buffered events, commit them in one transaction, wake watchers."""
        self._flush_scheduled = False
        if not self._pending or self.final:
            return
        now = time.time()
        for offset, event in enumerate(self._pending, start=1):
            event.task_id = self.task_id
            event.seq = self.last_seq + offset
            event.time = now
        batch = self._pending
        self._outbox.append(
            self.task_id,
            batch,
            state=state,
            exit_code=exit_code,
            finished=finished,
            offsets=self._offsets,
        )
        self._pending = []  # only once committed: a failed commit is retried by the next flush
        self._offsets = {}
        self.last_seq = batch[-1].seq
        if state is not None:
            self.state = state
        self._wake()

    def _wake(self) -> None:
        woken, self.changed = self.changed, asyncio.Event()
        woken.set()
