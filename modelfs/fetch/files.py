"""What the reader remembers of each file version being read: one bounded record
per content id, evicted as a whole, least recently read first.

- `stream`: its sequential streams and read-ahead windows (`StreamTracker`);
- `last_end`: where its latest read ended (the on-open prefetch follows it);
- `moved`: set at its next read, for a follower waiting for one;
- `delivered`: chunks whose every byte went to the kernel (its page cache has
  them), not worth loading ahead again;
- `in_order`: its reader follows an order other than offsets (tensors by
  name), and its follower loads ahead for it;
- `touched`: when it was last read (or followed), for `FileStates.active`.

Forgetting a record costs little: a stream restarts its read-ahead from the
smallest window, and a delivered chunk may be loaded ahead once more.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import trio

from .readahead import ReadAheadConfig, StreamTracker

# File versions remembered; a daemon reads far fewer at once.
FILE_STATES = 1024


@dataclass(slots=True, eq=False)
class FileState:
    stream: StreamTracker
    last_end: int | None = None
    moved: trio.Event | None = None
    delivered: set[int] = field(default_factory=set)
    in_order: bool = False
    touched: float = 0.0

    def wake(self) -> None:
        if self.moved is not None:
            self.moved.set()
            self.moved = None


class FileStates:
    def __init__(self, readahead: ReadAheadConfig, capacity: int = FILE_STATES) -> None:
        self._config = readahead
        self._capacity = capacity
        self._states: OrderedDict[str, FileState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, content_id: str) -> FileState | None:
        return self._states.get(content_id)

    def touch(self, content_id: str) -> FileState:
        """The record of `content_id`, made if new, now the most recent."""
        state = self._states.get(content_id)
        if state is None:
            state = self._states[content_id] = FileState(StreamTracker(self._config))
            while len(self._states) > self._capacity:
                _, old = self._states.popitem(last=False)
                old.wake()  # a follower waiting on it looks again
        else:
            self._states.move_to_end(content_id)
        state.touched = trio.current_time()
        return state

    def active(self, within: float = 1.0) -> int:
        """How many files were touched in the last `within` seconds: the most
        recent ones, so this stops at the first older one."""
        since = trio.current_time() - within
        n = 0
        for state in reversed(self._states.values()):
            if state.touched < since:
                break
            n += 1
        return n

    def forget_delivered(self, content_id: str) -> None:
        state = self._states.get(content_id)
        if state is not None:
            state.delivered.clear()
