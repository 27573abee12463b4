/* The one record the kernel hands to user space, followed by piece_len payload bytes.
 * Layout is fixed (explicit padding); agent/capture/ebpf.py mirrors it with struct. */
#ifndef MIRROR_EVENT_H
#define MIRROR_EVENT_H

#define MIRROR_HOOK_TC_INGRESS 0
#define MIRROR_HOOK_TC_EGRESS 1
#define MIRROR_HOOK_XDP 2

/* Largest payload piece one perf sample carries; bigger (GSO/GRO) packets go in pieces. */
#define MIRROR_PIECE 32768

struct mirror_event {
	__u64 ts_ns;       /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 ifindex;
	__u8 hook;         /* MIRROR_HOOK_* */
	__u8 family;       /* 4 or 6 */
	__u8 tcp_flags;
	__u8 elided;       /* 1: payload not copied on purpose (nobody consumes this direction) */
	__u8 saddr[16];    /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__u16 sport;       /* host byte order */
	__u16 dport;
	__u32 seq;         /* of the packet's first payload byte (SYN: the SYN's number) */
	__u32 ack;
	__u16 window;
	__u16 piece_len;   /* payload bytes following this header */
	__u32 piece_off;   /* offset of this piece within the packet's payload */
	__u32 payload_len; /* the packet's whole payload */
	__u32 lost;        /* bytes after this piece that could not be copied */
};

/* Per-CPU counters (index into the "counters" array). */
enum mirror_counter {
	MC_PACKETS = 0,    /* packets seen by the program */
	MC_NOT_IP,
	MC_NOT_TCP,
	MC_FRAGMENT,
	MC_TRUNCATED,      /* headers cut short / malformed */
	MC_NOT_OUR_PORT,
	MC_PURE_ACK,       /* skipped on purpose: nothing for user space */
	MC_SUBMITTED,      /* events submitted */
	MC_SUBMIT_FAILED,  /* perf ring full: bytes become a gap */
	MC_COPY_FAILED,
	MC_BYTES,          /* payload bytes submitted */
	MC_LOST_BYTES,     /* payload bytes that could not be submitted */
	MC_ELIDED,         /* service->client packets whose payload nobody consumes: skipped */
	MC_ELIDED_BYTES,
	MC_OWN_FORWARD,    /* a port in the forward source range: an agent's own shadow traffic */
	MC_MAX,
};

#endif
