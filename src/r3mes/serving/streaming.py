"""Streaming: token ids to text pieces (:class:`IncrementalDecoder`), and a generation
running in the engine's thread to an async stream of pieces (:func:`stream_pieces`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

R = TypeVar("R")

#: ``emit(piece)``: hands a text piece to the stream; callable from any thread.
Emit = Callable[[str], None]


class IncrementalDecoder:
    """Token ids in, text pieces out; handles multi-byte characters split across tokens and
    stop strings (the text stops before the first stop string).

    ``tokenizer`` needs ``decode(ids) -> str``. :meth:`add` returns the text a new token
    completes (held back while a stop string could still be forming), :meth:`flush` the
    rest at the end; :attr:`stopped` says a stop string was seen.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""      # decoded so far (complete characters)
        self.sent = 0       # characters of text already returned
        self.stopped = False

    def add(self, token: int) -> str:
        """The text ``token`` releases (often ``""``)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self.text = text
        return self._release(final=False)

    def flush(self) -> str:
        """Everything not yet returned (up to a stop string)."""
        if not self.stopped and self.ids:
            self.text = self.tokenizer.decode(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at != -1:
                self.stopped = True
                piece = self.text[self.sent:max(self.sent, at)]
                self.sent = max(self.sent, at)
                return piece
        end = len(self.text) if final or not self.stop else len(self.text) - self.hold
        if end <= self.sent:
            return ""
        piece = self.text[self.sent:end]
        self.sent = end
        return piece


async def stream_pieces(
        run: Callable[[Emit, threading.Event], Awaitable[R]]) -> AsyncIterator[str | R]:
    """Yields the non-empty pieces ``run(emit, cancel)`` emits, as they come, then what it
    returns (the last item, never a ``str`` piece's twin: callers tell it by type).

    ``emit`` may be called from any thread. A consumer that stops early sets ``cancel``
    (generation stops at its next token) and cancels ``run``.
    """
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    cancel = threading.Event()

    def emit(piece: str) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, piece)

    async def produce() -> R:
        try:
            return await run(emit, cancel)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    task = loop.create_task(produce())
    try:
        while (piece := await queue.get()) is not None:
            if piece:
                yield piece
    finally:
        if not task.done():
            cancel.set()
            task.cancel()
    yield await task
