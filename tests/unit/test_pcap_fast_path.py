"""The pcap reader's fast path (frames decoded in the reading loop) against the reference: each
frame read by ``read_frames`` and decoded by a ``Decoder``. Same segments, same counts, on
every kind of frame, whole or damaged files."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from agent.decode import LINKTYPE_ETHERNET, LINKTYPE_RAW, Decoder, DecodeStats
from agent.model import ACK, FIN, SYN, Segment
from agent.sources.files.pcapfile import PcapFileSource, read_frames
from agent.sources.filter import synthesize_frame

DEMO = Path(__file__).resolve().parents[2] / "agent" / "data" / "demo.pcap"
A, B = bytes([192, 0, 2, 1]), bytes([198, 51, 100, 2])
A6 = bytes.fromhex("20010db8000000000000000000000001")
B6 = bytes.fromhex("20010db8000000000000000000000002")


def _variants(rng: random.Random) -> list[bytes]:
    """Frames of every shape: the common one, and each way to miss the fast path."""
    f = synthesize_frame(A, B, 40000, 8080, rng.randbytes(rng.randint(0, 300)),
                         seq=rng.getrandbits(32), ack=rng.getrandbits(32),
                         flags=rng.choice([ACK, SYN, FIN | ACK]), window=rng.choice([0, 512]))
    opts = bytearray(f)
    opts[14] = 0x46  # IPv4 options: general path
    return [
        f,
        f + b"\0" * 6,  # Ethernet padding
        f[: rng.randint(0, len(f))],  # cut by the snap length, or truncated
        f[:12] + b"\x81\x00\x00\x07" + f[12:],  # VLAN tag
        f[:20] + b"\x20\x00" + f[22:],  # more fragments
        f[:23] + b"\x11" + f[24:],  # UDP
        f[:46] + b"\x20" + f[47:],  # TCP data offset past the end
        f[:16] + b"\xff\xff" + f[18:],  # IP total length past the end
        f[:16] + b"\x00\x10" + f[18:],  # IP total length shorter than its headers
        bytes(opts),
        synthesize_frame(A6, B6, 40000, 8080, b"six"),
        rng.randbytes(rng.randint(0, 80)),
    ]


def _pcap(path: Path, frames: list[bytes], linktype: int = LINKTYPE_ETHERNET,
          endian: str = "<", snaplen_cut: bool = False) -> None:
    out = [struct.pack(endian + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, linktype)]
    for i, fr in enumerate(frames):
        orig = len(fr) + (7 if snaplen_cut and i % 3 == 0 else 0)
        out.append(struct.pack(endian + "IIII", 1_700_000_000 + i, i * 37 % 1_000_000, len(fr),
                               orig) + fr)
    path.write_bytes(b"".join(out))


def _fields(s: Segment) -> tuple[object, ...]:
    return (s.src_ip, s.src_port, s.dst_ip, s.dst_port, s.seq, s.ack, s.flags, s.payload, s.ts,
            s.window, s.lost, s.tunnel)


def _reference(path: Path) -> tuple[list[tuple[object, ...]], dict[str, int]]:
    """Each frame through a decoder; the segments of datagrams it gave up first, then the
    frame's own; at the end, those of the datagrams still waiting."""
    stats = DecodeStats()
    decoders: dict[int, Decoder] = {}
    segs = []
    for linktype, ts, frame, orig in read_frames(path):
        dec = decoders.setdefault(linktype, Decoder(linktype, stats))
        seg = dec.decode(frame, ts, orig)
        segs += [_fields(s) for s in dec.take_ready()]
        if seg is not None:
            segs.append(_fields(seg))
    for dec in decoders.values():
        dec.finish()
        segs += [_fields(s) for s in dec.take_ready()]
    return segs, stats.as_dict()


def _fast(path: Path) -> tuple[list[tuple[object, ...]], dict[str, int]]:
    src = PcapFileSource([path])
    segs = [_fields(s) for batch in src.batches() for s in batch]
    stats = src.stats()
    return segs, {k: v for k, v in stats.items() if k not in
                  ("frames", "filtered", "cut_short_files", "bad_frames")}


@pytest.mark.parametrize("seed", range(20))
def test_the_fast_path_decodes_as_the_decoder(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    frames = [f for _ in range(60) for f in _variants(rng)]
    rng.shuffle(frames)
    path = tmp_path / "x.pcap"
    _pcap(path, frames, endian=rng.choice("<>"), snaplen_cut=rng.random() < 0.5)
    want, want_stats = _reference(path)
    got, got_stats = _fast(path)
    assert got == want
    assert got_stats == want_stats
    assert PcapFileSource([path]).stats()["frames"] == 0  # nothing counted before reading


def test_the_demo_capture_and_its_counts(tmp_path: Path) -> None:
    want, want_stats = _reference(DEMO)
    src = PcapFileSource([DEMO])
    got = [_fields(s) for batch in src.batches() for s in batch]
    assert got == want and len(got) > 100
    stats = src.stats()
    assert stats["frames"] == sum(1 for _ in read_frames(DEMO))
    assert stats["decoded"] == want_stats["decoded"] == len(got)


def test_a_filter_that_keeps_everything_changes_nothing(tmp_path: Path) -> None:
    """With a filter the general path runs: the same segments and counts."""
    rng = random.Random(5)
    path = tmp_path / "x.pcap"
    _pcap(path, [f for _ in range(40) for f in _variants(rng)])
    plain, filtered = PcapFileSource([path]), PcapFileSource([path], lambda lt, f: True)
    assert ([_fields(s) for b in plain.batches() for s in b]
            == [_fields(s) for b in filtered.batches() for s in b])
    assert plain.stats() == filtered.stats()


@pytest.mark.parametrize("linktype", [LINKTYPE_ETHERNET, LINKTYPE_RAW])
@pytest.mark.parametrize("size", [10, 1400])
def test_batches_end_at_their_count_or_their_bytes(tmp_path: Path, linktype: int,
                                                   size: int) -> None:
    """Up to 4096 segments or 1 MiB of frames a batch (the fast path, and the decoder for
    other link types), every segment once, in order."""
    skip = 14 if linktype == LINKTYPE_RAW else 0
    frames = [synthesize_frame(A, B, 1, 2, i.to_bytes(4, "big") * (size // 4))[skip:]
              for i in range(5000)]
    path = tmp_path / "x.pcap"
    _pcap(path, frames, linktype=linktype)
    batches = list(PcapFileSource([path]).batches())
    assert [s for b in batches for s in b] and len(batches) > 1
    assert all(len(b) <= 4096 for b in batches)
    assert all(sum(16 + len(frames[0]) for _ in b) < (1 << 20) + 2000 for b in batches)
    got, stats = _fast(path)
    assert got == _reference(path)[0] and stats["decoded"] == 5000


@pytest.mark.parametrize("cut", [1, 10, 17, 40])
def test_a_damaged_end_is_cut_short_after_every_whole_frame(tmp_path: Path, cut: int) -> None:
    frames = [synthesize_frame(A, B, 1, 2, bytes([i % 256]) * 50) for i in range(600)]
    path = tmp_path / "x.pcap"
    _pcap(path, frames)
    path.write_bytes(path.read_bytes()[:-cut])
    src = PcapFileSource([path])
    got = [s for b in src.batches() for s in b]
    assert len(got) == 599
    assert src.stats()["frames"] == 599 and src.stats()["cut_short_files"] == 1


def test_an_absurd_captured_length_cuts_the_file_short(tmp_path: Path) -> None:
    frames = [synthesize_frame(A, B, 1, 2, b"x" * 10) for _ in range(5)]
    path = tmp_path / "x.pcap"
    _pcap(path, frames)
    raw = bytearray(path.read_bytes())
    rec = 24 + 2 * (16 + len(frames[0]))  # the third record
    struct.pack_into("<I", raw, rec + 8, 1 << 30)
    path.write_bytes(bytes(raw))
    src = PcapFileSource([path])
    assert sum(len(b) for b in src.batches()) == 2
    assert src.stats()["frames"] == 2 and src.stats()["cut_short_files"] == 1
