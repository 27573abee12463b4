"""The one metrics registry: every counter and gauge of every stage, declared here.

Names are ``mirror_agent_<stage>_<what>_<unit>``: ``_total`` on counters, ``_bytes`` or
``_seconds`` where there is a unit; a reason is a label, never part of the name
(``mirror_agent_forward_connections_dropped_total{reason="connect_failed"}``). Each help text says
what a healthy value is ("should be 0" where it should). The kernel's counters are not
copied here: their names and help come from ``bpf/mirror_event.h`` through
:data:`agent.sources.ebpf.layout.COUNTERS`.

Stages keep owning their counters (plain ints, each written by one thread); nothing is
counted twice. The registry holds one :class:`StageCollector` that, at scrape time, asks the
mirror for every stage's flat ``stats()`` and maps each key to its declared metric
(:func:`lookup`). Every declared metric is rendered, 0 until counted, so a healthy zero is
visible. A key no declaration covers is still rendered, as
``mirror_agent_undeclared_stat{key="<stage>:<key>"}`` (a bug; a unit test keeps it empty).

Views of the registry: :func:`snapshot` (``--stats-json``, the periodic "stats" log line, the
summary in :mod:`agent.cli.summary`) and :func:`render` (the Prometheus text format).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.hooks.select import REASONS as SELECT_REASONS
from agent.mirror.budget import BUFFERS as BUDGET_BUFFERS
from agent.model import EndReason
from agent.sources.ebpf.layout import COUNTERS

__all__ = ["FAMILIES", "Family", "StageCollector", "StageStats", "family", "key", "lookup",
           "new_registry", "render", "snapshot", "split_key", "total", "undeclared"]

PREFIX = "mirror_agent_"
#: Stage name → that stage's flat counters (``source``, ``reassembly``, ``mirror``,
#: ``forward``, ``record``); a stage that does not exist in this run is absent.
StageStats = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class Family:
    """One declared metric: a counter or gauge, with at most one label.

    ``values``: label values that are always rendered (0 until counted). ``open``: other
    label values may come at run time (e.g. a capture's unsupported link type) and are
    declared too. ``scale`` turns the stage's unit into the metric's (ms → seconds)."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    label: str = ""
    values: tuple[str, ...] = ()
    open: bool = False
    scale: float = 1.0

    @property
    def stage(self) -> str:
        return self.name.removeprefix(PREFIX).split("_", 1)[0]


_families: dict[str, Family] = {}
#: (stage, key) → (family, label value).
_exact: dict[tuple[str, str], tuple[Family, str]] = {}
#: (stage, key prefix, family): the rest of the key is the label value.
_prefixes: list[tuple[str, str, Family]] = []
#: (stage, key) of totals that a labelled family already holds (the sum over its labels).
_sums: dict[tuple[str, str], Family] = {}


def _declare(name: str, kind: Literal["counter", "gauge"], help_: str, *, label: str = "",
             values: Iterable[str] = (), open_: bool = False, scale: float = 1.0) -> Family:
    fam = Family(PREFIX + name, kind, help_, label, tuple(values), open_, scale)
    if fam.name in _families:
        raise ValueError(f"metric {fam.name} declared twice")
    _families[fam.name] = fam
    return fam


def _counter(name: str, help_: str, stage: str, *keys: str) -> Family:
    """A counter without labels fed by ``keys`` of ``stage``."""
    fam = _declare(name, "counter", help_)
    for k in keys:
        _exact[(stage, k)] = (fam, "")
    return fam


def _by_reason(name: str, help_: str, stage: str, keys: Mapping[str, str] | None = None,
               prefixes: Iterable[str] = (), values: Iterable[str] = (), label: str = "reason",
               open_: bool = False) -> Family:
    """A counter labelled by ``label``: ``keys`` maps stage keys to label values; a key
    starting with one of ``prefixes`` has its label value after the prefix."""
    keys = keys or {}
    fam = _declare(name, "counter", help_, label=label,
                   values=dict.fromkeys([*values, *keys.values()]), open_=open_)
    for k, v in keys.items():
        _exact[(stage, k)] = (fam, v)
    for p in prefixes:
        _prefixes.append((stage, p, fam))
    return fam


def _gauge(name: str, help_: str, stage: str, key_: str, scale: float = 1.0) -> Family:
    fam = _declare(name, "gauge", help_, scale=scale)
    _exact[(stage, key_)] = (fam, "")
    return fam


# ---------------------------------------------------------------- kernel (bpf/mirror_event.h)

_SKIPPED = re.compile(r"^packets skipped(?: on purpose)?:\s*")
_kernel_skips = {n: h for n, h in COUNTERS if _SKIPPED.match(h)}
_by_reason("kernel_packets_skipped_total",
           "Packets the BPF program skipped, by reason: "
           + "; ".join(f"{n}: {_SKIPPED.sub('', h)}" for n, h in _kernel_skips.items()),
           "source", {f"kernel_{n}": n for n in _kernel_skips})
for _name, _help in COUNTERS:
    if _name not in _kernel_skips:
        _extra = " (AF_PACKET: packets the socket received)" if _name == "packets" else ""
        _counter(f"kernel_{_name}_total", f"BPF program: {_help}{_extra}", "source",
                 f"kernel_{_name}")
_counter("kernel_packets_dropped_total",
         "AF_PACKET: packets the kernel dropped before the socket read them; should be 0",
         "source", "kernel_drops")

# ---------------------------------------------------------------- ring and drain (eBPF source)

_counter("ring_records_total", "Records read from the kernel rings", "source", "events")
_counter("ring_records_coalesced_total",
         "Records merged into the previous segment of their connection", "source", "coalesced")
_counter("ring_lost_samples_total",
         "Perf buffer LOST records: samples the kernel could not store; should be 0",
         "source", "perf_lost_samples")
_counter("ring_discarded_records_total",
         "BPF ring buffer records the program discarded; should be 0", "source",
         "ringbuf_discarded")
_counter("ring_malformed_records_total", "Ring records that could not be parsed; should be 0",
         "source", "records_malformed")
_counter("ring_coalesce_no_slot_total",
         "Records not coalesced because the coalescing table was full; should be 0",
         "source", "coalesce_no_slot")
_gauge("ring_capacity_bytes", "Bytes the kernel rings hold in all", "source", "ring_bytes")
_gauge("ring_peak_bytes", "Most bytes ever waiting in one ring; healthy well below "
       "mirror_agent_ring_capacity_bytes", "source", "ring_peak_bytes")
_gauge("drain_gap_max_seconds", "Longest time between two reads of the rings; healthy "
       "well below the time the rings take to fill", "source", "drain_gap_max_ms", 0.001)
_counter("drain_discarded_bytes_total", "Payload bytes drained from the rings but never "
         "taken because the source failed or closed first; should be 0", "source",
         "drain_discarded_bytes")
_counter("drain_pauses_total", "Times reading the rings paused because the mirror was "
         "behind (the rings held the rest); 0 when it keeps up", "source", "drain_pauses")

# ---------------------------------------------------------------- interfaces (eBPF source)

_gauge("source_interfaces_attached", "Interfaces the program is attached to now",
       "source", "ifaces_attached")
_counter("source_interface_attaches_total", "Interfaces attached (at start, and as ones "
         "matching an --iface pattern or 'any' appeared)", "source", "iface_attaches")
_counter("source_interface_detaches_total", "Interfaces detached while running (deleted, "
         "moved to another namespace, or renamed out of --iface)", "source", "iface_detaches")
_counter("source_interface_attach_failures_total", "New interfaces the program could not be "
         "attached to (most often gone again at once); each is logged", "source",
         "iface_attach_failures")
_counter("source_link_resyncs_total", "Times netlink link events were lost (socket "
         "overflow) and every interface was read again; should be 0", "source",
         "link_resyncs")
_counter("source_link_errors_total", "Errors while following interfaces (each is logged); "
         "should be 0", "source", "link_errors")

# ---------------------------------------------------------------- source and decoding

_counter("source_frames_total", "Frames (or segments) the source read", "source", "frames")
_counter("source_filtered_packets_total", "Packets the --filter expression did not match",
         "source", "filtered")
_counter("source_files_cut_short_total", "Capture files that ended in the middle of a "
         "record; should be 0", "source", "cut_short_files")
_counter("source_bad_frames_total", "Capture file records that could not be read; "
         "should be 0", "source", "bad_frames")
_counter("source_frames_truncated_total", "Frames cut short by the capture length; "
         "should be 0", "source", "frames_truncated")
_by_reason("source_frames_skipped_total", "Frames the source skipped on purpose, by reason: "
           "lo_outgoing (loopback sees each packet twice), other_iface", "source",
           {"lo_outgoing_skipped": "lo_outgoing", "other_iface": "other_iface"})
_counter("decode_frames_decoded_total", "Frames decoded into TCP segments", "source",
         "decoded", "decode_decoded")
_by_reason("decode_frames_skipped_total", "Frames the decoder skipped, by reason "
           "(linktype_<n>: an unsupported link type); not_ip/not_tcp are expected, "
           "truncated, bad_*, too_deep (nested past the layer bound) and "
           "fragment_headers_missing (a datagram given up before its headers were whole) "
           "should be 0", "source",
           prefixes=("skipped_", "decode_skipped_"), open_=True,
           values=("truncated", "not_ip", "bad_ip_header", "not_tcp", "bad_tcp_header",
                   "too_deep", "bad_udp_header", "bad_vxlan_header", "bad_geneve_header",
                   "bad_gre_header", "bad_erspan_header", "bad_pppoe_header",
                   "bad_ppp_header", "bad_chdlc_header", "bad_fragment",
                   "fragment_headers_missing"))
_by_reason("decode_encapsulated_segments_total", "Segments decoded from inside an "
           "encapsulation, by kind (one inside two counts for both); informational: 0 "
           "without tunnels (the label is the encapsulation)", "source",
           prefixes=("encap_", "decode_encap_"),
           values=("vxlan", "geneve", "gre", "erspan", "pppoe", "ppp", "chdlc", "ip4in4",
                   "ip6in4", "ip4in6", "ip6in6"))
_counter("decode_fragments_total", "IP fragments held for reassembly (healthy: each "
         "becomes part of a reassembled datagram)", "source", "defrag_fragments",
         "decode_defrag_fragments")
_counter("decode_datagrams_reassembled_total", "IP datagrams reassembled whole from their "
         "fragments", "source", "defrag_reassembled", "decode_defrag_reassembled")
_by_reason("decode_datagrams_incomplete_total", "Fragmented IP datagrams given up, by "
           "reason: timeout, memory (the defragmentation budget was full), end_of_input; "
           "should be 0 (with their first fragment, the missing bytes are a gap on the "
           "flow)", "source", prefixes=("defrag_incomplete_", "decode_defrag_incomplete_"),
           values=("timeout", "memory", "end_of_input"))
_by_reason("decode_fragment_discarded_bytes_total", "Bytes of held fragments not "
           "delivered, by reason: no_first_fragment (no TCP header: no flow can be named), "
           "after_hole (after a missing piece: inside the gap reported on the flow); should "
           "be 0", "source",
           prefixes=("defrag_discarded_bytes_", "decode_defrag_discarded_bytes_"),
           values=("no_first_fragment", "after_hole"))
_counter("decode_fragment_overlap_bytes_total", "Fragment bytes received more than once "
         "(overlapping or repeated fragments); the first copy wins; healthy: 0",
         "source", "defrag_overlap_bytes", "decode_defrag_overlap_bytes")
_counter("decode_fragment_conflict_bytes_total", "Overlapping fragment bytes that differed "
         "from the first copy (which wins), or a datagram length two last fragments "
         "disagree on; should be 0", "source", "defrag_conflict_bytes",
         "decode_defrag_conflict_bytes")
_DEFRAG_HELD = _gauge("decode_fragment_held_bytes", "Bytes the defragmenter holds now "
                      "(fragments and their bookkeeping); healthy: near 0, always under the "
                      "defrag share of the memory budget", "source", "defrag_held_bytes")
_exact[("source", "decode_defrag_held_bytes")] = (_DEFRAG_HELD, "")

# ---------------------------------------------------------------- capture files (POST /pcap)

_counter("source_pcap_jobs_done_total", "Capture files submitted to the control server and "
         "read to their end", "source", "pcap_jobs_done")
_counter("source_pcap_jobs_failed_total", "Submitted capture files that could not be read "
         "whole (cut short, damaged, or the agent stopped first); should be 0", "source",
         "pcap_jobs_failed")
_counter("source_pcap_jobs_rejected_total", "Capture file submissions refused because the "
         "queue was full (HTTP 429); should be 0", "source", "pcap_jobs_rejected")
_gauge("source_pcap_jobs_queued", "Submitted capture files waiting to be read; healthy: "
       "near 0, not stuck at the queue's limit", "source", "pcap_jobs_queued")

# ---------------------------------------------------------------- reassembly

_counter("reassembly_segments_total", "TCP segments fed to the reassembler", "reassembly",
         "segments")
_counter("reassembly_chunks_total", "Contiguous chunks the reassembler delivered",
         "reassembly", "chunks")
_counter("reassembly_delivered_bytes_total", "Payload bytes delivered in order", "reassembly",
         "bytes_delivered")
_counter("reassembly_flows_opened_total", "Connections opened", "reassembly", "flows_opened")
_by_reason("reassembly_flows_refused_total", "New connections not tracked at all, by reason: "
           "memory (the memory guard shed them: the process neared its memory limit); each "
           "is refused whole, every segment of it; should be 0", "reassembly",
           prefixes=("flows_refused_",), values=("memory",))
_by_reason("reassembly_refused_bytes_total", "Payload bytes of refused connections, never "
           "delivered, by reason; should be 0", "reassembly", prefixes=("refused_bytes_",),
           values=("memory",))
_by_reason("reassembly_flows_closed_total", "Connections closed, by reason: fin, rst, idle, "
           "flush (end of input) are normal; evicted and lifetime are limits (should be 0); "
           "reused: a new connection on the same addresses", "reassembly",
           prefixes=("flows_closed_",),
           values=tuple(EndReason))
_counter("reassembly_gap_bytes_total", "Bytes given up on (holes skipped, lost by the "
         "source, missing at a connection's end); should be 0", "reassembly", "gap_bytes")
_counter("reassembly_retransmitted_bytes_total", "Bytes seen again (retransmits, overlaps); "
         "the first copy wins", "reassembly", "retransmitted_bytes")
_counter("reassembly_conflict_bytes_total", "Bytes of a later copy that differed from the "
         "first copy; should be 0", "reassembly", "conflict_bytes")
_counter("reassembly_keepalives_total", "TCP keepalive probes seen", "reassembly",
         "keepalives")
_counter("reassembly_zero_window_probes_total", "TCP zero-window probes seen", "reassembly",
         "zero_window_probes")
_counter("reassembly_late_segments_total", "Data segments after their connection or "
         "direction ended, dropped; should be 0", "reassembly", "late_segments")
_counter("reassembly_late_bytes_total", "Bytes of those late segments; should be 0",
         "reassembly", "late_bytes")
_counter("reassembly_limit_skips_total", "Segments skipped because a flow or memory limit "
         "was reached; should be 0", "reassembly", "limit_skips")
_counter("reassembly_hole_timeouts_total", "Holes skipped because later data waited longer "
         "than the hole timeout; should be 0", "reassembly", "hole_timeouts")
_counter("reassembly_untracked_segments_total", "Segments of an untracked direction "
         "(responses nobody consumes): only SYN/FIN/RST are used", "reassembly",
         "untracked_segments")
_by_reason("reassembly_rst_ignored_total", "RSTs ignored because their sequence number was "
           "not the receiver's next expected one (RFC 5961 3.2), by reason: in_window (the "
           "receiver answers with a challenge ACK), out_of_window (dropped); the connection "
           "goes on. Should be 0: spoofed resets, or a capture that missed the bytes before a "
           "real one", "reassembly", {"rst_ignored_in_window": "in_window",
                                      "rst_ignored_out_of_window": "out_of_window"})
_counter("reassembly_rst_unchecked_total", "RSTs that closed a connection without a sequence "
         "check because the mirror had not followed the sender's side (a refused SYN's "
         "answer, a side not captured or untracked)", "reassembly", "rst_unchecked")
_counter("reassembly_rst_payload_bytes_total", "Bytes carried on RST segments, not delivered "
         "(the receiving stack discards them)", "reassembly", "rst_payload_bytes")
_counter("reassembly_syn_data_bytes_total", "Bytes carried on a SYN (TCP Fast Open) that the "
         "receiver acknowledged, delivered", "reassembly", "syn_data_bytes")
_counter("reassembly_syn_data_refused_bytes_total", "Bytes carried on a SYN that the receiver "
         "did not acknowledge (Fast Open refused, or no answer seen), not delivered from the "
         "SYN: a refused client sends them again after the handshake, delivered from there",
         "reassembly", "syn_data_refused_bytes")

# ---------------------------------------------------------------- mirror (hooks)

_counter("mirror_chunks_total", "Chunks handed to the hooks", "mirror", "chunks")
_by_reason("mirror_hook_dropped_bytes_total", "Bytes a hook chose not to pass on, by hook",
           "mirror", {"forward_hook_dropped_bytes": "forward",
                      "record_hook_dropped_bytes": "record"}, label="hook")
_by_reason("mirror_unobserved_bytes_total", "Bytes of connections on no observed port "
           "(direction unknown) that a hook passed on: never forwarded or recorded, by hook",
           "mirror", {"forward_unobserved_bytes": "forward",
                      "record_unobserved_bytes": "record"}, label="hook")
_counter("mirror_forward_late_bytes_total", "Bytes not forwarded because the client had "
         "already finished; should be 0", "mirror", "mirror_forward_late_bytes")

# ---------------------------------------------------------------- mirror (selection, rewrite)

_HOOK_PATHS = ("forward", "record")
_by_reason("mirror_selection_requests_total", "HTTP/1.x requests the selection hooks judged "
           "(--allow-*, --deny-*, --sample-by-header, --rate-limit), by hook", "mirror",
           {f"select_{p}_requests": p for p in _HOOK_PATHS}, label="hook")
for _path in _HOOK_PATHS:
    _by_reason(f"mirror_{_path}_requests_unselected_total", f"Requests the {_path} path's "
               "selection dropped whole (body included), by reason: method, path, header, "
               "sample, sample_missing (no header to sample by), rate_limit are the rules at "
               "work; incomplete (a header block cut by the connection's end) and unframed "
               "(framing lost between requests: the rest of the connection dropped) should "
               "be 0", "mirror", prefixes=(f"select_{_path}_unselected_",),
               values=SELECT_REASONS)
_by_reason("mirror_unselected_bytes_total", "Bytes of requests the selection dropped (not "
           "passed on), by hook", "mirror",
           {f"select_{p}_dropped_bytes": p for p in _HOOK_PATHS}, label="hook")
_by_reason("mirror_selection_passthrough_streams_total", "Connections the selection passed on "
           "unjudged, by hook: not HTTP/1.x from their first byte, or a selected request with "
           "a bad body length (the rest goes as the service saw it)", "mirror",
           {f"select_{p}_passthrough_streams": p for p in _HOOK_PATHS}, label="hook")
_counter("mirror_rewritten_paths_total", "Forwarded requests whose target --rewrite-path "
         "changed", "mirror", "rewrite_paths")
_counter("mirror_rewritten_hosts_total", "Forwarded requests whose Host --rewrite-host set",
         "mirror", "rewrite_hosts")
_counter("mirror_rewrites_invalid_total", "Path rewrites not applied because the result was "
         "no valid request-target (empty, a space or control character); should be 0",
         "mirror", "rewrite_invalid")

# ---------------------------------------------------------------- forward sink

_counter("forward_connections_total", "Shadow connections opened (or a flow's bytes refused "
         "before one could be): each ends completed or dropped, in flight until then",
         "forward", "connections")
_counter("forward_connections_completed_total", "Shadow connections whose bytes the target "
         "all acknowledged, and which it then answered or closed", "forward",
         "connections_completed")
_gauge("forward_connections_in_flight", "Shadow connections neither completed nor dropped yet: "
       "connections_total - completed - dropped", "forward", "connections_in_flight")
_counter("forward_forwarded_bytes_total", "Bytes the shadow target acknowledged", "forward",
         "bytes_forwarded")
_counter("forward_dropped_bytes_total", "Bytes handed to the forward sink that the target "
         "did not acknowledge; should be 0", "forward", "bytes_dropped")
_counter("forward_gap_resets_total", "Shadow connections restarted after a gap in the "
         "captured stream; should be 0", "forward", "gap_resets")
_counter("forward_response_bytes_total", "Bytes the shadow target answered (read, "
         "discarded)", "forward", "response_bytes")
#: Why the forward sink dropped a shadow connection (agent/sinks/forward.py says each).
FORWARD_DROP_REASONS = ("connect_failed", "connect_timeout", "no_source_port", "flow_buffer",
                        "total_buffer", "overload", "stalled", "reset", "unconfirmed", "shutdown",
                        "error", "memory")
FORWARD_CONNECTIONS_DROPPED = _by_reason(
    "forward_connections_dropped_total", "Shadow connections dropped, by cause (see "
    "agent/sinks/forward.py); should be 0", "forward", prefixes=("connections_dropped_",),
    values=FORWARD_DROP_REASONS)
_sums[("forward", "connections_dropped")] = FORWARD_CONNECTIONS_DROPPED

# ---------------------------------------------------------------- forward sink: request mode

_counter("forward_requests_total", "HTTP/1.x requests handed to the forward sink in request "
         "mode (--forward-mode request): each ends completed or dropped, in flight until then",
         "forward", "requests")
_counter("forward_requests_completed_total", "Requests whose whole response the shadow sent "
         "(read and discarded)", "forward", "requests_completed")
_gauge("forward_requests_in_flight", "Requests neither completed nor dropped yet: "
       "requests_total - completed - dropped", "forward", "requests_in_flight")
_counter("forward_requests_retried_total", "Requests sent again because a pooled connection "
         "closed before any byte of their response (a keep-alive connection the shadow had "
         "just closed)", "forward", "requests_retried")
_counter("forward_pool_connections_total", "Keep-alive connections opened to the shadow "
         "(request mode); healthy: few, however many the service had", "forward",
         "pool_connections")
_gauge("forward_pool_connections_open", "Keep-alive connections open to the shadow now "
       "(request mode); at most --forward-pool", "forward", "pool_connections_open")
#: Why the request-mode forward sink dropped a request (agent/sinks/request_forward.py).
FORWARD_REQUEST_DROP_REASONS = (
    "connect_failed", "connect_timeout", "no_source_port", "reset", "bad_response", "stalled",
    "overload", "flow_buffer", "total_buffer", "memory", "shutdown", "gap", "not_http",
    "unframed", "upgrade", "incomplete", "error")
FORWARD_REQUESTS_DROPPED = _by_reason(
    "forward_requests_dropped_total", "Requests dropped in request mode, by cause (see "
    "agent/sinks/request_forward.py); should be 0", "forward",
    prefixes=("requests_dropped_",), values=FORWARD_REQUEST_DROP_REASONS)
_sums[("forward", "requests_dropped")] = FORWARD_REQUESTS_DROPPED

# ---------------------------------------------------------------- record sink

_counter("record_records_total", "Records written to the recording (NATS: stored, "
         "acknowledged by JetStream)", "record", "records")
_counter("record_written_bytes_total", "Payload bytes written to the recording (NATS: "
         "acknowledged)", "record", "recorded_bytes")
_counter("record_errors_total", "Recordings that failed (a write error stops the "
         "recording); should be 0", "record", "record_errors")
_by_reason("record_records_lost_total", "Records not in the recording, by reason: "
           "write_failed (the file failed), queue_full (the disk could not keep up), memory "
           "(refused while the process was near its memory limit), vanished (written to a "
           "file that was deleted before it was next seen in place); should be 0", "record",
           {"record_failed_records": "write_failed", "record_dropped_records": "queue_full",
            "record_shed_records": "memory", "record_vanished_records": "vanished"})
_by_reason("record_lost_bytes_total", "Payload bytes of those records; should be 0",
           "record", {"record_failed_bytes": "write_failed",
                      "record_dropped_bytes": "queue_full", "record_shed_bytes": "memory",
                      "record_vanished_bytes": "vanished"})
_counter("record_files_vanished_total", "Recording files that left their path while written "
         "(deleted, moved, replaced, their directory removed), each noticed within a second "
         "and named in an error line; the recording goes on in a new file at that path if "
         "its directory is still there; should be 0", "record", "record_files_vanished")
_counter("record_files_rotated_total", "Recording files started after the first "
         "(--record-rotate: past the size, or a new time slot)", "record",
         "record_files_rotated")
_counter("record_files_deleted_total", "Recording files of this run deleted, oldest first, "
         "to stay within --record-max-total", "record", "record_files_deleted")
_counter("record_connections_total", "Connections handed to the record sink (file or NATS): "
         "each ends completed or dropped, in flight until then", "record", "connections")
_counter("record_connections_completed_total", "Recorded connections whose every record, "
         "end included, reached the recording (file: written; NATS: acknowledged)",
         "record", "connections_completed")
_gauge("record_connections_in_flight", "Recorded connections neither completed nor dropped "
       "yet: connections_total - completed - dropped", "record", "connections_in_flight")
#: Why the record sink dropped a connection: the reason of its first record lost (files:
#: agent/sinks/record/ledger.py; NATS: NATS_REASONS below).
RECORD_DROP_REASONS = ("queue_full", "memory", "write_failed", "vanished", "shutdown",
                       "broker_down", "publish_failed", "unconfirmed")
RECORD_CONNECTIONS_DROPPED = _by_reason(
    "record_connections_dropped_total", "Recorded connections with a record missing from the "
    "recording, by the reason of the first one lost (see record_records_lost_total and "
    "record_nats_records_dropped_total); shutdown: no end before the recording closed; "
    "should be 0", "record", prefixes=("connections_dropped_",), values=RECORD_DROP_REASONS)
_sums[("record", "connections_dropped")] = RECORD_CONNECTIONS_DROPPED

# ---------------------------------------------------------------- record sink: NATS JetStream

#: Why a record is not in the NATS stream (agent/sinks/nats/publisher.py REASONS).
NATS_REASONS = ("queue_full", "broker_down", "publish_failed", "unconfirmed", "shutdown")
_NATS_WHY = ("by reason: queue_full (publishing could not keep up), broker_down (not "
             "connected), publish_failed (JetStream refused it: no stream, limits), "
             "unconfirmed (no acknowledgement before the connection was lost or the ack "
             "timeout: it may be stored), shutdown (unacknowledged when the drain time ran "
             "out); should be 0")
NATS_DROPPED = _by_reason("record_nats_records_dropped_total",
                          f"Records not in the NATS stream, {_NATS_WHY}", "record",
                          prefixes=("nats_dropped_records_",), values=NATS_REASONS)
_by_reason("record_nats_dropped_bytes_total", "Payload bytes of those records", "record",
           prefixes=("nats_dropped_bytes_",), values=NATS_REASONS)
_counter("record_nats_connects_total", "Connections made to the NATS server (the first, "
         "and one per reconnect)", "record", "nats_connects")
_counter("record_nats_connect_failures_total", "Connection attempts to the NATS server "
         "that failed (retried with backoff, 0.1 s up to 5 s); should be 0", "record",
         "nats_connect_failures")
_counter("record_nats_disconnects_total", "Connections to the NATS server lost while "
         "publishing; should be 0", "record", "nats_disconnects")
_gauge("record_nats_connected", "Connected to the NATS server now: 1, or 0; should be 1",
       "record", "nats_connected")
_gauge("record_nats_inflight_messages", "Messages published and not acknowledged yet; "
       "healthy well below the in-flight bound (1024)", "record", "nats_inflight")

# ---------------------------------------------------------------- per-flow pcap files

_counter("flowpcap_files_total", "Per-flow pcap files created (--flow-pcap-dir), one per "
         "connection", "flowpcap", "files")
_counter("flowpcap_files_completed_total", "Per-flow pcap files closed at their "
         "connection's end with every packet (not those of a connection that lost packets "
         "to a full queue or a failed file)", "flowpcap", "files_completed")
_counter("flowpcap_files_reopened_total", "Per-flow pcap files opened again to append "
         "after the open-file limit closed them; high: more concurrent connections than "
         "open files", "flowpcap", "files_reopened")
_counter("flowpcap_files_evicted_total", "Per-flow pcap files closed early because the "
         "open-file limit was reached (the least recently written)", "flowpcap",
         "files_evicted")
_counter("flowpcap_files_failed_total", "Per-flow pcap files that could not be created or "
         "written (that connection's later packets are not saved); should be 0",
         "flowpcap", "files_failed")
_counter("flowpcap_packets_total", "Packets saved to per-flow pcap files", "flowpcap",
         "packets")
_counter("flowpcap_packets_truncated_total", "Saved packets cut to --flow-pcap-snaplen",
         "flowpcap", "packets_truncated")
_counter("flowpcap_written_bytes_total", "Packet bytes saved to per-flow pcap files "
         "(before compression)", "flowpcap", "written_bytes")
_counter("flowpcap_packets_lost_total", "Packets of connections whose pcap file failed, "
         "not saved; should be 0", "flowpcap", "packets_lost")
_counter("flowpcap_packets_unattributed_total", "Packets of no tracked connection (after "
         "its end, e.g. the last ACK of a close, or before any), not saved", "flowpcap",
         "packets_unattributed")
_by_reason("flowpcap_packets_dropped_total", "Packets not saved to per-flow pcap files because "
           "the writer thread could not keep up, by reason: queue_full (refused by the full "
           "queue), flow_dropped (later packets of a connection that lost some: dropped "
           "whole); should be 0", "flowpcap", prefixes=("packets_dropped_",),
           values=("queue_full", "flow_dropped"))
_counter("flowpcap_packets_clamped_total", "Saved packets whose time a pcap cannot hold "
         "(before 1970 or after 2106-02-07, e.g. a damaged capture) saved at the nearest one; "
         "should be 0", "flowpcap", "packets_clamped")
_gauge("flowpcap_open_files", "Per-flow pcap files open now; at most the budget's "
       "flow_pcap_files", "flowpcap", "open_files")
_gauge("flowpcap_open_files_peak", "The most per-flow pcap files open at once",
       "flowpcap", "open_files_peak")

# ---------------------------------------------------------- memory budget (agent/mirror/budget.py)

_BUDGET = _declare("budget_bytes", "gauge", "Bytes of the memory budget (--memory-limit) given "
                   "to each buffer (limit: the whole; slack: for object overhead); constant",
                   label="buffer", values=BUDGET_BUFFERS)
for _b in BUDGET_BUFFERS:
    _exact[("budget", _b)] = (_BUDGET, _b)
_gauge("budget_max_flows", "Connections tracked at most (--max-flows, or from the memory "
       "budget); constant", "budget", "max_flows")

# ------------------------------------------------- memory guard (agent/mirror/memory_guard.py)

_gauge("memory_rss_bytes", "Resident memory of the process at the memory guard's latest look "
       "(every 10 ms); healthy below the high threshold", "memory", "rss_bytes")
_gauge("memory_rss_peak_bytes", "The most resident memory the memory guard saw; at most "
       "the limit (budget_bytes{buffer=\"limit\"})", "memory", "rss_peak_bytes")
_gauge("memory_rss_ratio", "Resident memory / the memory limit at the latest look; the guard "
       "sheds at the high threshold's ratio", "memory", "rss_ppm", 1e-6)
_declare("memory_threshold_bytes", "gauge", "The memory guard's thresholds (constant): trim "
         "(give freed heap back to the OS), high (shed new connections, pause intake), "
         "critical (also drop queued data), low (resume)", label="level",
         values=("trim", "low", "high", "critical"))
_prefixes.append(("memory", "threshold_", _families[PREFIX + "memory_threshold_bytes"]))
_gauge("memory_level", "The memory guard's level now: 0 ok, 1 high (new connections refused, "
       "intake paused), 2 critical (also dropping queued data); healthy: 0", "memory",
       "level")
_by_reason("memory_pressure_episodes_total", "Times the memory guard reached a level (high, "
           "critical); should be 0", "memory", prefixes=("episodes_",),
           values=("high", "critical"), label="level")
_declare("memory_shed_seconds_total", "counter", "Seconds the memory guard spent at high or "
         "critical (shedding); should be 0", scale=0.001)
_exact[("memory", "shed_ms")] = (_families[PREFIX + "memory_shed_seconds_total"], "")
_counter("memory_drops_total", "Times the memory guard had the forward sink drop the "
         "connections holding the most bytes (critical); should be 0", "memory", "drops")
_counter("memory_trims_total", "Times the memory guard gave freed heap memory back to the OS "
         "(malloc_trim) above the trim threshold", "memory", "trims")
_counter("memory_trimmed_bytes_total", "Resident bytes those trims gave back", "memory",
         "trimmed_bytes")

# ------------------------------------------------------------ hand-offs (agent/mirror/handoff.py)

#: The thread boundaries (agent.mirror.handoff.Handoff names).
HANDOFFS = ("ring_drain", "record_writer", "record_nats", "forward", "pcap_ingest",
            "flow_pcap")


def _per_handoff(name: str, kind: Literal["counter", "gauge"], help_: str, stat: str) -> None:
    fam = _declare(name, kind, help_, label="handoff", values=HANDOFFS)
    _prefixes.append(("handoff", f"{stat}:", fam))


_per_handoff("handoff_queued_bytes", "gauge", "Bytes waiting at a thread boundary now",
             "queued_bytes")
_per_handoff("handoff_peak_queued_bytes", "gauge", "The most bytes that waited at a thread "
             "boundary; near its budget means it came close to pausing or dropping",
             "peak_queued_bytes")
_per_handoff("handoff_items_total", "counter", "Items handed across a thread boundary",
             "items")

UNDECLARED = Family(PREFIX + "undeclared_stat", "gauge", "A stage counter that "
                    "agent/metrics.py does not declare (a bug); should be absent", "key")
#: Every declared metric, in declaration order.
FAMILIES: tuple[Family, ...] = tuple(_families.values())


def family(name: str) -> Family:
    """The declared metric called ``name``."""
    return _families[name]


def lookup(stage: str, key_: str) -> tuple[Family, str] | None:
    """Where ``key_`` of ``stage`` goes: (metric, label value); None if undeclared (also for
    a label value its metric does not declare)."""
    hit = _exact.get((stage, key_))
    if hit is not None:
        return hit
    for s, p, fam in _prefixes:
        if s == stage and key_.startswith(p):
            value = key_[len(p):]
            if value and (fam.open or value in fam.values):
                return fam, value
    return None


def undeclared(stages: StageStats) -> list[str]:
    """``stage:key`` of every key in ``stages`` that no metric declares."""
    return [f"{s}:{k}" for s, d in stages.items() for k in d
            if (s, k) not in _sums and lookup(s, k) is None]


class StageCollector(Collector):
    """Renders the declared metrics from the stages' own counters at each collection."""

    def __init__(self, stages: Callable[[], StageStats]) -> None:
        self._stages = stages

    def describe(self) -> Iterator[Metric]:
        for fam in FAMILIES:
            yield _empty(fam)

    def collect(self) -> Iterator[Metric]:
        values: dict[Family, dict[str, float]] = {f: dict.fromkeys(f.values or ("",), 0.0)
                                                  for f in FAMILIES}
        stray: dict[str, float] = {}
        for stage, stats in self._stages().items():
            for k, v in stats.items():
                hit = lookup(stage, k)
                if hit is not None:
                    fam, label = hit
                    per = values[fam]
                    per[label] = per.get(label, 0.0) + v * fam.scale
                elif (stage, k) not in _sums:
                    stray[f"{stage}:{k}"] = v
        for fam in FAMILIES:
            metric = _empty(fam)
            for label, v in values[fam].items():
                metric.add_metric([label] if fam.label else [], v)
            yield metric
        if stray:
            g = GaugeMetricFamily(UNDECLARED.name, UNDECLARED.help, labels=["key"])
            for k, v in sorted(stray.items()):
                g.add_metric([k], v)
            yield g


def _empty(fam: Family) -> CounterMetricFamily | GaugeMetricFamily:
    labels = [fam.label] if fam.label else []
    if fam.kind == "counter":
        return CounterMetricFamily(fam.name, fam.help, labels=labels)
    return GaugeMetricFamily(fam.name, fam.help, labels=labels)


def new_registry(stages: Callable[[], StageStats]) -> CollectorRegistry:
    """A registry of its own (not the process-wide default) collecting from ``stages``."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(StageCollector(stages))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition format (what ``GET /metrics`` serves)."""
    return generate_latest(registry)


def key(name: str, **labels: str) -> str:
    """A sample's name in Prometheus style: ``name{label="value"}`` (``name`` alone without
    labels), as :func:`snapshot` and ``--stats-json`` spell it."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def _escape(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


_KEY = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?$")
_LABEL = re.compile(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"')


def split_key(text: str) -> tuple[str, dict[str, str]]:
    """The inverse of :func:`key`."""
    m = _KEY.match(text)
    if m is None:
        raise ValueError(f"not a sample name: {text!r}")
    labels = {k: re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), v)
              for k, v in _LABEL.findall(m.group(2) or "")}
    return m.group(1), labels


def snapshot(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample now, ``key(name, **labels) → value`` (whole numbers as ``int``)."""
    out: dict[str, float] = {}
    for metric in registry.collect():
        for s in metric.samples:
            v = s.value
            out[key(s.name, **s.labels)] = int(v) if float(v).is_integer() else v
    return out


def total(snap: Mapping[str, float], name: str) -> float:
    """The sum of metric ``name`` over all its labels in a :func:`snapshot`."""
    return sum(v for k, v in snap.items() if k == name or k.startswith(name + "{"))
