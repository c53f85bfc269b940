"""Running one Redis operation written once against a synchronous or an asyncio client.

Store operations are generators that yield *calls* (a function of the client that returns a
reply, or an awaitable reply on an asyncio client) and receive each reply back, so every operation
has one implementation and two thin drivers:

```python
def get_status(job_id):                              # an operation
    raw = yield lambda r: r.hget(job_key(job_id), "status")
    return as_text(raw)

run_sync(redis.Redis(), get_status(jid))              # the worker
await run_async(redis.asyncio.Redis(), get_status(jid))  # the API
```
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Concatenate, ParamSpec, TypeVar

Call = Callable[[Any], Any]
T = TypeVar("T")
P = ParamSpec("P")
Ops = Generator[Call, Any, T]


def pipelined(build: Callable[[Any], None], *, transaction: bool = False) -> Call:
    """A call that queues `build(pipe)`'s commands in one pipeline and returns their replies."""

    def call(client: Any) -> Any:
        pipe = client.pipeline(transaction=transaction)
        build(pipe)
        return pipe.execute()

    return call


def run_sync(client: Any, ops: Ops[T]) -> T:
    reply: Any = None
    try:
        while True:
            reply = ops.send(reply)(client)
    except StopIteration as done:
        return done.value


async def run_async(client: Any, ops: Ops[T]) -> T:
    reply: Any = None
    try:
        while True:
            reply = ops.send(reply)(client)
            if inspect.isawaitable(reply):
                reply = await reply
    except StopIteration as done:
        return done.value


def sync_method(op: Callable[Concatenate[Any, P], Ops[T]]) -> Callable[Concatenate[Any, P], T]:
    """A method running operation `op` on `self.redis` (a synchronous client)."""

    def method(self: Any, *args: P.args, **kwargs: P.kwargs) -> T:
        return run_sync(self.redis, op(self, *args, **kwargs))

    method.__doc__ = op.__doc__
    method.__name__ = op.__name__.lstrip("_")
    return method


def async_method(
    op: Callable[Concatenate[Any, P], Ops[T]],
) -> Callable[Concatenate[Any, P], Awaitable[T]]:
    """A coroutine method running operation `op` on `self.redis` (an asyncio client)."""

    async def method(self: Any, *args: P.args, **kwargs: P.kwargs) -> T:
        return await run_async(self.redis, op(self, *args, **kwargs))

    method.__doc__ = op.__doc__
    method.__name__ = op.__name__.lstrip("_")
    return method
