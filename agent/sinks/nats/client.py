"""Connecting to a NATS server with nats-py (imported only when a connection is made)."""

from __future__ import annotations

from agent.sinks.nats.url import NatsTarget

__all__ = ["connect", "describe"]


async def connect(target: NatsTarget, timeout: float, name: str, **callbacks: object) -> object:
    """A nats-py connection to ``target``'s server, without nats-py's own reconnecting
    (callers reconnect themselves, or not at all): one attempt of at most ``timeout``
    seconds. Raises ConnectionError naming the cause."""
    import nats

    errors: list[BaseException] = []

    async def note(e: BaseException) -> None:
        errors[:] = [e]  # the last one only

    try:
        return await nats.connect(
            servers=[target.server], allow_reconnect=False, max_reconnect_attempts=1,
            reconnect_time_wait=0, connect_timeout=timeout, name=name, error_cb=note,
            **callbacks)
    except Exception as e:
        cause = errors[-1] if errors else e
        text = str(cause) or type(cause).__name__
        raise ConnectionError(f"cannot reach {target.server}: {text}") from None


def describe(e: BaseException | None) -> str:
    """``Type: message`` of an exception (the type alone if it has no message)."""
    text = str(e) if e is not None else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
