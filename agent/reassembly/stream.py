"""One direction of a TCP connection as a byte stream: :class:`StreamBuffer`.

Positions in, in-order bytes out. A buffer orders data by position, trims retransmissions and
overlaps (the first copy wins; a later copy that differs is counted), holds out-of-order data,
turns bytes a source lost and holes given up on into gaps, and knows where its FIN is: bytes
past the FIN are not the stream's. It knows no flows, no addresses and no clock:
:class:`~agent.reassembly.table.Reassembler` and its
:class:`~agent.reassembly.datapath.DataPath` own those, decide when a hole is given up on (time,
memory limits, the connection's end) and turns what a buffer releases into chunks.

Positions are *unwrapped* sequence numbers: unbounded ints congruent to the 32-bit sequence
numbers (:meth:`StreamBuffer.unwrap`), so wraparound needs no special case.
"""

from __future__ import annotations

import bisect
from operator import itemgetter
from typing import Literal, NamedTuple, Protocol

__all__ = ["MAX_WINDOW", "Piece", "Ready", "ResetVerdict", "StreamBuffer", "StreamCounters"]

_MASK = 0xFFFFFFFF
_HALF = 0x80000000

#: The largest receive window TCP can advertise (65535 << 14, RFC 7323 §2.3), rounded up. The
#: mirror does not see window scaling: no receiver's window is larger.
MAX_WINDOW = 1 << 30

ResetVerdict = Literal["accept", "in_window", "out_of_window"]
_start = itemgetter(0)

Ready = list[tuple[int, bytes]]
"""What a buffer released, in stream order: (bytes skipped right before, data)."""


class Piece(NamedTuple):
    """Out-of-order bytes held at [start, end); ``data`` None: bytes a source lost."""

    start: int
    end: int
    data: bytes | None


#: ``pending`` while nothing is held: no list for each stream that never needed one.
_NOTHING: tuple[Piece, ...] = ()


class StreamCounters(Protocol):
    """The counters a buffer adds to (:class:`~agent.reassembly.flow.ReassemblyStats` has
    them)."""

    retransmitted_bytes: int
    conflict_bytes: int
    keepalives: int
    zero_window_probes: int
    late_segments: int
    late_bytes: int


class StreamBuffer:
    """The byte stream of one direction.

    ``nxt`` is the position of the next byte to release (None: not started; the owner sets
    it from the first SYN or byte seen). Released bytes go to the ``ready`` list a method is
    given, each with the bytes skipped right before it; bytes skipped with nothing released
    after them stay in ``gap`` (see :meth:`trailing`). A *hole* is missing bytes with held
    data, or the FIN, after them: :attr:`waiting`. The owner gives up on one with
    :meth:`skip_hole`.
    """

    __slots__ = ("blocked", "counters", "fin", "gap", "held", "last", "nxt", "pending", "probe")

    def __init__(self, counters: StreamCounters) -> None:
        self.counters = counters
        self.nxt: int | None = None
        self.fin: int | None = None  # position of the FIN, once seen (the first one wins)
        self.gap = 0  # bytes skipped, to report with the next bytes released
        # Held pieces: sorted, non-overlapping, all past nxt (a list once there are any).
        self.pending: list[Piece] | tuple[Piece, ...] = _NOTHING
        self.held = 0  # bytes of data in pending (lost pieces hold none)
        self.last: tuple[int, bytes] | None = None  # last piece released, for conflict checks
        self.blocked = False  # the receiver advertised a zero window
        self.probe: tuple[int, bytes] | None = None  # a held zero-window probe byte

    def unwrap(self, seq: int) -> int:
        """Position of 32-bit ``seq`` nearest to the next expected byte."""
        nxt = self.nxt
        assert nxt is not None
        return nxt + (((seq - nxt + _HALF) & _MASK) - _HALF)

    @property
    def streaming(self) -> bool:
        """Do the next in-order bytes go straight out? Nothing held, probed, blocked or
        skipped, and no FIN known: the reassembler's one fast-path predicate."""
        return not (self.pending or self.probe or self.blocked or self.gap
                    or self.fin is not None)

    @property
    def waiting(self) -> bool:
        """Is a hole holding data (or the FIN) back?"""
        if self.pending:
            return True
        fin, nxt = self.fin, self.nxt
        return fin is not None and nxt is not None and nxt < fin

    @property
    def complete(self) -> bool:
        """Has the stream reached its FIN (every byte before it released or a gap)?"""
        fin, nxt = self.fin, self.nxt
        return fin is not None and nxt is not None and nxt >= fin

    def trailing(self) -> int:
        """Bytes known missing after the last bytes released: skipped ones nothing carried,
        and those before the FIN never reached."""
        missing = self.gap
        fin, nxt = self.fin, self.nxt
        if fin is not None and nxt is not None and nxt < fin:
            missing += fin - nxt
        return missing

    def reset_verdict(self, seq: int) -> ResetVerdict:
        """What the receiver of this stream does with a RST its sender sent at 32-bit ``seq``
        (RFC 5961 §3.2), as far as the stream knows; needs ``nxt``.

        ``accept`` if ``seq`` is where the receiver's RCV.NXT can be: the next byte expected,
        the end of a held piece (the receiver may have bytes the capture missed; Linux also
        takes the highest SACKed byte), just past a held zero-window probe, or, once a FIN is
        known, the FIN's number or the one after it (Linux takes RCV.NXT - 1 after a FIN).
        Otherwise the receiver ignores it: ``in_window`` if ahead of the next byte by less than
        :data:`MAX_WINDOW` (it answers with a challenge ACK), else ``out_of_window`` (dropped).
        """
        nxt = self.nxt
        assert nxt is not None
        pos = self.unwrap(seq)
        fin, probe = self.fin, self.probe
        if (pos == nxt or (fin is not None and fin <= pos <= fin + 1)
                or (probe is not None and pos == probe[0] + 1)
                or any(p.end == pos for p in self.pending)):
            return "accept"
        return "in_window" if 0 < pos - nxt < MAX_WINDOW else "out_of_window"

    # ------------------------------------------------------------------ input

    def set_fin(self, pos: int) -> None:
        """The FIN is at ``pos``. The first FIN wins; held bytes past it are dropped as late."""
        if self.fin is not None:
            return
        self.fin = pos
        if not self.pending or self.pending[-1].end <= pos:
            return
        pending = self._pieces()
        dropped = 0
        while pending and pending[-1].end > pos:
            s, e, data = pending.pop()
            if data is not None:
                dropped += e - max(s, pos)
            if s < pos:
                pending.append(Piece(s, pos, None if data is None else data[: pos - s]))
                break
        if dropped:
            self.held -= dropped
            self.counters.late_segments += 1
            self.counters.late_bytes += dropped

    def add(self, pos: int, payload: bytes, lost: int, ready: Ready) -> None:
        """Place ``payload``, then ``lost`` bytes the source could not deliver, at ``pos``;
        release what is now in order."""
        counters = self.counters
        if self.probe is not None:
            self._settle_probe(pos, ready)
        fin = self.fin
        if fin is not None and pos + len(payload) + lost > fin:
            if pos == fin and len(payload) <= 1 and not lost:
                counters.keepalives += 1  # a half-closed side's keep-alive: snd_una - 1
                return
            keep = max(0, fin - pos)
            if keep < len(payload):
                counters.late_segments += 1
                counters.late_bytes += len(payload) - keep
                payload = payload[:keep]
            lost = max(0, min(lost, fin - pos - len(payload)))
            if not payload and not lost:
                return
        nxt = self.nxt
        assert nxt is not None
        size = len(payload)
        if pos + size + lost <= nxt:
            if pos == nxt - 1 and size <= 1:
                counters.keepalives += 1
            else:
                counters.retransmitted_bytes += size
                self._check_conflict(pos, payload)
            return
        if pos < nxt:
            cut = min(nxt - pos, size)
            if cut:
                counters.retransmitted_bytes += cut
                self._check_conflict(pos, payload[:cut])
                payload = payload[cut:]
                size -= cut
            lost -= (nxt - pos) - cut
            pos = nxt
        end = pos + size
        pending = self.pending
        # Fast path: in order and ending before any held data (else merge via the buffer).
        if pos == nxt and (not pending or pending[0].start > end + lost):
            if self.blocked and size == 1 and not lost:
                # A one-byte zero-window probe: hold it until we know the receiver took it.
                self.probe = (pos, payload)
                counters.zero_window_probes += 1
                return
            if size:
                self.nxt = end
                self.last = (pos, payload)
                ready.append((self.gap, payload))
                self.gap = 0
            if lost:
                self.nxt = end + lost
                self.gap += lost
                if pending:
                    self._drain(ready)
            return
        self._insert(pos, payload, lost)
        if self.pending[0].start <= nxt:
            self._drain(ready)

    def skip_hole(self, ready: Ready) -> None:
        """Give up on the first hole: the bytes missing before held data, or, with nothing
        held, before the FIN. They become a gap; what follows them is released."""
        nxt = self.nxt
        assert nxt is not None
        if self.pending:
            start = self.pending[0].start
            if start > nxt:
                self.gap += start - nxt
                self.nxt = start
            self._drain(ready)
        elif self.fin is not None and nxt < self.fin:
            self.gap += self.fin - nxt
            self.nxt = self.fin

    def release_all(self, ready: Ready) -> None:
        """Release everything held, its holes as gaps (the bytes before the FIN stay missing:
        :meth:`trailing`). The probe byte, never confirmed, is dropped."""
        while self.pending:
            self.skip_hole(ready)
        self.probe = None

    # ------------------------------------------------------------------ inside

    def _pieces(self) -> list[Piece]:
        """``pending`` as a list to change (made when the first piece comes)."""
        pending = self.pending
        if isinstance(pending, list):
            return pending
        made: list[Piece] = []
        self.pending = made
        return made

    def _settle_probe(self, pos: int, ready: Ready) -> None:
        """A segment follows a held probe byte: at nxt+1 the receiver took it, else drop it."""
        assert self.probe is not None
        ppos, pbyte = self.probe
        self.probe = None
        if pos == ppos + 1:
            self.nxt = pos
            self.last = (ppos, pbyte)
            ready.append((self.gap, pbyte))
            self.gap = 0

    def _check_conflict(self, pos: int, data: bytes) -> None:
        """Count bytes of a retransmission that differ from the copy already released."""
        last = self.last
        if last is None or not data:
            return
        lpos, ldata = last
        lo = max(pos, lpos)
        hi = min(pos + len(data), lpos + len(ldata))
        if lo < hi:
            self._count_conflict(data[lo - pos : hi - pos], ldata[lo - lpos : hi - lpos])

    def _count_conflict(self, mine: bytes, theirs: bytes) -> None:
        if mine != theirs:
            self.counters.conflict_bytes += sum(
                1 for x, y in zip(mine, theirs, strict=True) if x != y
            )

    def _insert(self, pos: int, payload: bytes, lost: int) -> None:
        """Add [pos, pos+len+lost) to the pending list; bytes already held win (first copy)."""
        pending = self._pieces()
        end = pos + len(payload)
        pieces: list[Piece] = []
        i = bisect.bisect_left(pending, pos, key=_start)
        if i > 0 and pending[i - 1].end > pos:
            i -= 1
        cur = pos
        j = i
        total_end = end + lost
        while j < len(pending) and pending[j].start < total_end:
            s, e, held = pending[j]
            if s > cur:
                _piece(pieces, cur, s, pos, payload, end)
            lo, hi = max(cur, s), min(end, e)
            if lo < hi and held is not None:
                self._count_conflict(payload[lo - pos : hi - pos], held[lo - s : hi - s])
            self.counters.retransmitted_bytes += max(0, hi - lo)
            cur = max(cur, e)
            j += 1
        if cur < total_end:
            _piece(pieces, cur, total_end, pos, payload, end)
        if pieces:
            if i == j:  # no overlap with held data: the common case, O(1) at the tail
                pending[i:i] = pieces
            else:  # interleave with the held pieces it overlapped
                pending[i:j] = sorted(pending[i:j] + pieces, key=_start)
            self.held += sum(p.end - p.start for p in pieces if p.data is not None)

    def _drain(self, ready: Ready) -> None:
        """Release pending pieces that now start at or before ``nxt``, joined where adjacent."""
        pending = self._pieces()
        nxt = self.nxt
        assert nxt is not None
        parts: list[bytes] = []
        released = 0
        k = 0
        while k < len(pending) and pending[k].start <= nxt:
            s, e, data = pending[k]
            k += 1
            if data is not None:
                released += e - s
            if e <= nxt:
                continue
            if data is None:
                if parts:
                    ready.append((self.gap, b"".join(parts)))
                    self.gap = 0
                    parts = []
                self.gap += e - nxt
            else:
                piece = data[nxt - s :] if s < nxt else data
                parts.append(piece)
                self.last = (max(s, nxt), piece)
            nxt = e
        del pending[:k]
        if not pending:
            self.pending = _NOTHING  # the list goes with the last piece
        self.nxt = nxt
        self.held -= released
        if parts:
            ready.append((self.gap, parts[0] if len(parts) == 1 else b"".join(parts)))
            self.gap = 0


def _piece(pieces: list[Piece], lo: int, hi: int, pos: int, payload: bytes, end: int) -> None:
    """Append the part [lo, hi) of a new segment at ``pos``: its bytes up to ``end``, lost
    after."""
    if lo < end:
        pieces.append(Piece(lo, min(hi, end), payload[lo - pos : min(hi, end) - pos]))
    if hi > end:
        pieces.append(Piece(max(lo, end), hi, None))
