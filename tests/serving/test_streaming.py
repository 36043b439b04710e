"""The stream bridge: text pieces from the engine's thread to an async stream, and a
consumer that goes away stopping the generation."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from r3mes.serving.streaming import stream_pieces


async def test_pieces_arrive_in_order_then_the_result():
    async def run(emit, cancel):
        def produce():
            for piece in ("a", "", "b", "c"):
                emit(piece)
        await asyncio.get_running_loop().run_in_executor(None, produce)
        return {"done": True}

    items = [item async for item in stream_pieces(run)]
    assert items == ["a", "b", "c", {"done": True}]


async def test_a_consumer_that_stops_early_cancels_the_generation():
    stopped = threading.Event()

    async def run(emit, cancel):
        def produce():
            while not cancel.wait(0.005):  # the engine's per-token check
                emit("x")
            stopped.set()
        await asyncio.get_running_loop().run_in_executor(None, produce)
        return "never read"

    async with contextlib.aclosing(stream_pieces(run)) as items:
        async for _ in items:
            break
    assert await asyncio.get_running_loop().run_in_executor(None, stopped.wait, 10)
