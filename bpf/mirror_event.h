/* The one record the kernel hands to user space, followed by piece_len payload bytes, and
 * the one list of the program's counters. Both are read by user space from here:
 * agent/sources/ebpf/layout.py takes the counter names and MIRROR_EVENT_SIZE from this file and
 * checks its struct format against them at import; agent/sources/ring/ring_decode.c includes it. */
#ifndef MIRROR_EVENT_H
#define MIRROR_EVENT_H

#define MIRROR_HOOK_TC_INGRESS 0
#define MIRROR_HOOK_TC_EGRESS 1
#define MIRROR_HOOK_XDP 2

/* Largest payload piece one perf sample carries; bigger (GSO/GRO) packets go in pieces. */
#define MIRROR_PIECE 32768

/* TCP flags in tcp_flags (the header's flags byte). */
#define MIRROR_TCP_FIN 0x01
#define MIRROR_TCP_SYN 0x02
#define MIRROR_TCP_RST 0x04

struct mirror_event {
	__u64 ts_ns;       /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 ifindex;
	__u8 hook;         /* MIRROR_HOOK_* */
	__u8 family;       /* 4 or 6 */
	__u8 tcp_flags;    /* SYN on a packet's first piece only */
	__u8 elided;       /* 1: payload not copied on purpose (nobody consumes this direction) */
	__u8 saddr[16];    /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u16 sport;       /* host byte order */
	__u16 dport;
	__u32 seq;         /* of this piece's first byte (a SYN packet's first: the SYN's) */
	__u32 ack;
	__u16 window;
	__u16 piece_len;   /* payload bytes following this header */
	__u32 piece_off;   /* offset of this piece within the packet's payload */
	__u32 payload_len; /* the packet's whole payload */
	__u32 lost;        /* bytes after this piece that could not be copied */
	__u32 tunnel_id;   /* the tunnel's identity (MIRROR_TUNNEL_*), 0 without one */
	__u8 tunnel;       /* MIRROR_TUNNEL_*: the tunnel the packet came out of (--decap) */
};

/* sizeof(struct mirror_event): 81 bytes of fields, aligned to 8. The payload piece follows. */
#define MIRROR_EVENT_SIZE 88
_Static_assert(sizeof(struct mirror_event) == MIRROR_EVENT_SIZE, "struct mirror_event size");
_Static_assert(__builtin_offsetof(struct mirror_event, saddr) == 16, "mirror_event.saddr");
_Static_assert(__builtin_offsetof(struct mirror_event, seq) == 52, "mirror_event.seq");
_Static_assert(__builtin_offsetof(struct mirror_event, lost) == 72, "mirror_event.lost");
_Static_assert(__builtin_offsetof(struct mirror_event, tunnel) == 80, "mirror_event.tunnel");

/* Tunnel identities (struct mirror_event.tunnel and tunnel_id; --decap): what keeps tenants
 * with the same inner addresses apart. User space names them as agent/decode/tunnels.py
 * does: "vxlan:<VNI>", "geneve:<VNI>", "gre:<key>", "erspan:<session id>". NONE: not from a
 * tunnel, or from one without an identity (IP in IP, GRE without a key, ERSPAN type I). */
#define MIRROR_TUNNEL_NONE 0
#define MIRROR_TUNNEL_VXLAN 1  /* tunnel_id: the 24-bit VNI */
#define MIRROR_TUNNEL_GENEVE 2 /* tunnel_id: the 24-bit VNI */
#define MIRROR_TUNNEL_GRE 3    /* tunnel_id: the GRE key */
#define MIRROR_TUNNEL_ERSPAN 4 /* tunnel_id: the 10-bit session id */

/* Interface sides (the iface_side map, followed specs only; absent: every packet is kept).
 * HOST: an interface with an address of its own (uplink, bridge, lo): only connections whose
 * service address is the host's own. POD: no address of its own (a pod's host-side veth, a
 * bridge port): also connections whose service lies beyond it (in the pod). */
#define MIRROR_SIDE_HOST 1
#define MIRROR_SIDE_POD 2

/* Per-CPU counters, in index order of the "counters" array: X(NAME, "help"). User space
 * names each mirror_agent kernel counter NAME in lower case and shows the help. Every packet
 * the program sees is counted in PACKETS and then in at most one drop reason (NOT_IP ...
 * OWN_FORWARD, ELSEWHERE, BAD_TUNNEL: a help text that starts "packets skipped") or as
 * submitted; the rest count bytes and events (DECAP: packets taken out of a tunnel, whatever
 * became of them after). */
#define MIRROR_COUNTERS(X) \
	X(PACKETS,       "packets the program saw") \
	X(NOT_IP,        "packets skipped: not IPv4/IPv6") \
	X(NOT_TCP,       "packets skipped: not TCP") \
	X(FRAGMENT,      "packets skipped: IP fragments (no TCP header to match)") \
	X(TRUNCATED,     "packets skipped: headers cut short or malformed; should be 0") \
	X(NOT_OUR_PORT,  "packets skipped: not an observed port") \
	X(PURE_ACK,      "packets skipped on purpose: bare ACKs tell user space nothing") \
	X(SUBMITTED,     "records handed to user space") \
	X(SUBMIT_FAILED, "records lost because the ring was full; should be 0") \
	X(COPY_FAILED,   "payload copies that failed (reported as lost bytes); should be 0") \
	X(BYTES,         "payload bytes handed to user space") \
	X(LOST_BYTES,    "payload bytes not handed over (ring full, copy failed); should be 0") \
	X(ELIDED,        "service->client packets whose payload nobody consumes: not copied") \
	X(ELIDED_BYTES,  "payload bytes of those packets") \
	X(OWN_FORWARD,   "packets skipped: a port in the forward source range (shadow traffic)") \
	X(ELSEWHERE,     "packets skipped: their service is captured on another interface (one capture per connection)") \
	X(BAD_TUNNEL,    "packets skipped: a tunnel header (--decap) cut short or malformed; should be 0") \
	X(DECAP,         "packets taken out of a tunnel (--decap); then kept or skipped like any")

enum mirror_counter {
#define MIRROR_COUNTER_ENUM(name, help) MC_##name,
	MIRROR_COUNTERS(MIRROR_COUNTER_ENUM)
#undef MIRROR_COUNTER_ENUM
	MC_MAX,
};

#endif
