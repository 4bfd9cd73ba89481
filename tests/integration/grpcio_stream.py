"""A grpcio server stream read from trio: a thread pumps its messages into a trio channel, so
a test can wait for the next one with a deadline, or check that none comes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import grpc
import trio


class ServerStream(Protocol):
    """What a grpcio unary-stream call returns, as far as `pumped` uses it."""

    def __next__(self) -> Any: ...

    def cancel(self) -> bool: ...


@asynccontextmanager
async def pumped(
    stream: ServerStream, buffer: int = 100, send_error: bool = True
) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    """The messages of `stream` (a grpcio unary-stream call's result) in a trio channel of
    `buffer` places, closed when the stream ends. An RpcError ending the stream is sent into
    the channel as a last item if `send_error`, else the channel just closes. On exit the
    stream is cancelled."""
    send, receive = trio.open_memory_channel[Any](buffer)

    async def pump() -> None:
        async with send:
            while True:
                try:
                    message = await trio.to_thread.run_sync(
                        next, stream, None, abandon_on_cancel=True
                    )
                except grpc.RpcError as exc:
                    if send_error:
                        await send.send(exc)
                    return
                if message is None:
                    return
                await send.send(message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        try:
            yield receive
        finally:
            stream.cancel()  # ends the thread still blocked in next()
            nursery.cancel_scope.cancel()
