"""Hooks: what runs on each reassembled chunk before it is forwarded or recorded.

A hook is anything with ``handle(chunk) -> (data, keep)``:

* ``keep=False`` drops the chunk (counted as a hook drop);
* empty ``data`` with ``keep=True`` skips this write/forward (a hook holding bytes back);
* an exception aborts :meth:`agent.mirror.driver.TrafficMirror.run`; so does a result that is not
  a ``(bytes, bool)`` pair (:class:`HookError`, naming the hook).

Hooks that hold bytes across chunks (see :mod:`agent.hooks.http`) also implement
``flow_end(chunk) -> bytes``: called once per direction when the connection ends, with the last
chunk of that direction as a template, returning whatever they still hold.

Hooks run inside the mirror's step (:class:`agent.mirror.step.MirrorStep`), on the single
mirror thread, so they need no locking. They see every chunk, those of connections on no
observed port (direction ``unknown``) too; but such a chunk never reaches a sink, whatever
they return (what they pass on is counted as unobserved).
"""

from __future__ import annotations

import importlib
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from agent.model import Direction, TrafficChunk

__all__ = [
    "DEFAULT_FORWARD_HOOK",
    "DEFAULT_RECORD_HOOK",
    "Hook",
    "HookError",
    "HookFunc",
    "HookLoadError",
    "HookPipeline",
    "KeepAll",
    "OnlyToObserved",
    "ReportsStats",
    "SampleFlows",
    "hook_name",
    "hook_stats",
    "load_hook",
]

HookResult = tuple[bytes, bool]


@runtime_checkable
class Hook(Protocol):
    """The hook contract (see the module docstring)."""

    def handle(self, chunk: TrafficChunk) -> HookResult: ...


@runtime_checkable
class FlowAwareHook(Hook, Protocol):
    """A hook that holds bytes across chunks and must give them back when a flow ends."""

    def flow_end(self, chunk: TrafficChunk) -> bytes: ...


class HookFunc:
    """Adapts a plain function ``fn(chunk) -> (data, keep)`` to the :class:`Hook` protocol."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[TrafficChunk], HookResult]) -> None:
        self.fn = fn

    def handle(self, chunk: TrafficChunk) -> HookResult:
        return self.fn(chunk)

    def __repr__(self) -> str:
        return f"HookFunc({getattr(self.fn, '__qualname__', self.fn)!r})"


class KeepAll:
    """Keeps every chunk unchanged (record both directions with this)."""

    #: The directions kept: a :class:`HookPipeline` decides for this hook without a call.
    keeps = frozenset(Direction)

    def handle(self, chunk: TrafficChunk) -> HookResult:
        return chunk.data, True


class OnlyToObserved:
    """Keeps only client→service chunks: the default for both forwarding and recording."""

    keeps = frozenset({Direction.TO_OBSERVED})

    def handle(self, chunk: TrafficChunk) -> HookResult:
        return chunk.data, chunk.direction is Direction.TO_OBSERVED


#: Built-in hooks that only keep or drop a chunk by its direction (their ``keeps``).
_DIRECTION_FILTERS = (KeepAll, OnlyToObserved)


DEFAULT_FORWARD_HOOK: Hook = OnlyToObserved()
DEFAULT_RECORD_HOOK: Hook = OnlyToObserved()


class SampleFlows:
    """Keeps a stable fraction of connections (all chunks of a kept flow, none of the rest).

    The decision hashes the flow id, so it is the same for both paths and both directions.
    """

    def __init__(self, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("sample fraction must be within [0, 1]")
        self._threshold = int(fraction * 0xFFFFFFFF)

    def handle(self, chunk: TrafficChunk) -> HookResult:
        h = zlib.crc32(chunk.flow_id.to_bytes(8, "little"))
        return chunk.data, h <= self._threshold


class HookError(Exception):
    """A hook broke the contract: its result was not ``(bytes, bool)`` (or, from
    ``flow_end``, not bytes). The message names the hook."""


def hook_name(hook: object) -> str:
    """``module:name`` of a hook: its function's for a :class:`HookFunc`, else its class's."""
    obj = hook.fn if isinstance(hook, HookFunc) else type(hook)
    name = getattr(obj, "__qualname__", None) or repr(obj)
    return f"{getattr(obj, '__module__', '?')}:{name}"


def _type_names(result: object) -> str:
    if isinstance(result, tuple):
        return f"({', '.join(type(x).__name__ for x in result)})"
    return type(result).__name__


class HookPipeline:
    """Runs hooks in order; the first drop or empty result ends the chain for that chunk.

    Every result is checked: one that is not ``(bytes, bool)`` raises :class:`HookError`
    before it reaches a sink."""

    __slots__ = ("_aware", "_called", "_keeps", "hooks")

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self.hooks = list(hooks)  # fixed from here on: what runs is worked out below
        self._aware = any(isinstance(h, FlowAwareHook) for h in self.hooks)
        # The leading built-in direction filters decide without a call: the directions all
        # of them keep; the hooks after them are called.
        self._keeps = frozenset(Direction)
        first = 0
        for hook in self.hooks:  # exactly these classes: a subclass may handle() otherwise
            if not isinstance(hook, _DIRECTION_FILTERS) or type(hook) not in _DIRECTION_FILTERS:
                break
            self._keeps &= hook.keeps
            first += 1
        self._called = list(enumerate(self.hooks))[first:]

    @property
    def flow_aware(self) -> bool:
        """True if some hook holds bytes and needs :meth:`flow_end`."""
        return self._aware

    def handle(self, chunk: TrafficChunk) -> HookResult:
        if chunk.direction not in self._keeps:
            return b"", False
        data = chunk.data
        for i, hook in self._called:
            if i:
                chunk = chunk.with_data(data)
            data, keep = _checked(hook, hook.handle(chunk))
            if not keep:
                return b"", False
            if not data:
                return b"", True
        return data, True

    def flow_end(self, chunk: TrafficChunk) -> bytes:
        """Collect bytes held by hooks for the flow of ``chunk``, passed through later hooks."""
        carry = b""
        for hook in self.hooks:
            if carry:
                carry, keep = _checked(hook, hook.handle(chunk.with_data(carry)))
                if not keep:
                    carry = b""
            if isinstance(hook, FlowAwareHook):
                tail = hook.flow_end(chunk)
                if not isinstance(tail, bytes):
                    raise HookError(f"hook {hook_name(hook)} returned "
                                    f"{type(tail).__name__} from flow_end, expected bytes")
                carry += tail
        return carry


def _checked(hook: Hook, result: object) -> HookResult:
    """``result`` if it is ``(bytes, bool)``, else HookError naming ``hook``."""
    if (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bytes)
            and isinstance(result[1], bool)):
        return result
    raise HookError(f"hook {hook_name(hook)} returned {_type_names(result)}, expected "
                    "(bytes, bool)")


class HookLoadError(Exception):
    """A ``MODULE:NAME`` hook spec could not be loaded (bad name, import error, wrong type)."""


def load_hook(spec: str) -> Hook:
    """Load ``MODULE:NAME``: a hook object, a hook class (built with no arguments) or a
    function ``fn(chunk) -> (data, keep)``."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise HookLoadError(f"hook {spec!r}: expected MODULE:NAME")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # the user's module may fail in any way
        raise HookLoadError(f"hook {spec!r}: cannot import {mod_name}: {e}") from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise HookLoadError(f"hook {spec!r}: {mod_name} has no attribute {attr!r}") from None
    if isinstance(obj, type):
        try:
            obj = obj()
        except Exception as e:
            raise HookLoadError(f"hook {spec!r}: cannot construct {attr}: {e}") from None
    if isinstance(obj, Hook):
        return obj
    if callable(obj):
        return HookFunc(obj)
    raise HookLoadError(f"hook {spec!r}: {attr} is neither a hook nor a function")


@runtime_checkable
class ReportsStats(Protocol):
    """A hook with counters of its own for the ``mirror`` stage of the metrics registry: every
    key it reports must be declared in :mod:`agent.metrics`."""

    def mirror_stats(self) -> Mapping[str, int]: ...


def hook_stats(*hooks: object) -> dict[str, int]:
    """The counters of every hook among ``hooks`` (hooks, lists of hooks, pipelines, None)
    that reports some (:class:`ReportsStats`), summed by key; a hook found twice counts
    once."""
    out: Counter[str] = Counter()
    seen: set[int] = set()
    stack: list[object] = list(hooks)
    while stack:
        hook = stack.pop()
        if hook is None or id(hook) in seen:
            continue
        seen.add(id(hook))
        if isinstance(hook, Sequence) and not isinstance(hook, str | bytes):
            stack.extend(hook)
        elif isinstance(hook, ReportsStats):
            out.update(hook.mirror_stats())
        elif isinstance(hook, HookPipeline):
            stack.extend(hook.hooks)
    return dict(out)
