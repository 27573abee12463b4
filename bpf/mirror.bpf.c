/* mirror-agent kernel side: keep only the observed ports' TCP packets that carry something
 * (payload, SYN, FIN, RST) and push their payload to user space through a perf buffer (or, with
 * MIRROR_RINGBUF, the BPF ring buffer). With MIRROR_DECAP (--decap) the TCP packets inside
 * tunnels too: the ports, the flow and the payload are the inner packet's.
 * Entry points only; parsing is in parse.h (decap.h: tunnels), the record in mirror_event.h.
 * Never changes traffic and never ends another program's hook: TC returns "next" (TCX_NEXT ==
 * TC_ACT_UNSPEC == -1, so the programs and filters after it still run), XDP returns XDP_PASS,
 * whatever happens. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "mirror_event.h"
#include "parse.h"
#ifdef MIRROR_DECAP
#include "decap.h"
#endif

#ifndef MAX_CPUS
#define MAX_CPUS 128
#endif
/* The most observed ports: agent/sources/__init__.py says why (the AF_PACKET engine's filter
 * length bounds it, and every engine takes the same list). The map is a hash, so a packet
 * costs two lookups (its ports) whatever the bound; user space removes ports before it adds
 * any, so a change never needs more entries than the larger of the two lists. */
#ifndef MAX_PORTS
#error "MAX_PORTS (the most observed ports) comes from program.py"
#endif
#define MAX_IFACES 4096      /* classified interfaces: pods' veths and uplinks */
#define MAX_LOCAL_ADDRS 1024 /* the host's own addresses */
/* 4 pieces of 32 KiB cover the largest GSO/GRO packet (64 KiB) with room to spare; bytes of
 * a larger (BIG TCP) packet past 128 KiB are reported as lost, so user space sees a gap. */
#define MAX_PIECES 4
/* Shadow connections are bound to local ports in this range (agent/sinks/forward.py), so a
 * packet with either port in it is an agent's own forwarded traffic (this agent's or one on
 * another host): never captured, or the mirror would feed itself. */
#if !defined(MIRROR_OWN_PORT_LO) || !defined(MIRROR_OWN_PORT_HI)
#error "MIRROR_OWN_PORT_LO/HI (the forward source port range) come from ebpf.py"
#endif
/* TCX_NEXT and TC_ACT_UNSPEC are both -1; the 6.1 UAPI headers here predate TCX_NEXT. */
#define MIRROR_TC_NEXT -1

struct scratch {
	struct mirror_event ev;
	__u8 data[MIRROR_PIECE];
};

BPF_HASH(ports, u16, u8, MAX_PORTS); /* observed ports, host order; changed live (PUT /ports) */
/* Followed interface specs (agent/sources/ebpf/follow.py): ifindex -> MIRROR_SIDE_*, and the
 * host's own addresses (16 bytes, IPv4 as ::ffff:a.b.c.d), both kept from netlink events. */
BPF_HASH(iface_side, u32, u8, MAX_IFACES);
struct addr_key {
	__u8 b[16];
};
BPF_HASH(local_addrs, struct addr_key, u8, MAX_LOCAL_ADDRS);
#ifdef MIRROR_RINGBUF
/* One ring shared by all CPUs (kernel >= 5.8); size in pages, a power of two. */
BPF_RINGBUF_OUTPUT(events, MIRROR_RINGBUF_PAGES);
#ifndef MIRROR_WAKEUP_BYTES
#error "MIRROR_WAKEUP_BYTES (bytes per CPU between forced wakeups) comes from ebpf.py"
#endif
BPF_PERCPU_ARRAY(since_wakeup, u64, 1); /* bytes this CPU submitted since it last woke the reader */
#else
BPF_PERF_OUTPUT(events);
#endif
/* One scratch record per CPU. Not a per-CPU map: those cap values at 32 KiB. */
BPF_ARRAY(scratch_map, struct scratch, MAX_CPUS);
BPF_PERCPU_ARRAY(hdr_map, struct hdr_buf, 1);
BPF_PERCPU_ARRAY(counters, u64, MC_MAX);

static long (*xdp_load_bytes)(void *ctx, __u32 off, void *buf, __u32 len) =
	(void *)BPF_FUNC_xdp_load_bytes;

static __always_inline void count(int idx, u64 n)
{
	u64 *v = counters.lookup(&idx);
	if (v)
		*v += n;
}

/* Hand one record to user space through whichever transport was compiled in. */
static __always_inline long submit(void *ctx, struct scratch *s, __u32 size)
{
#ifdef MIRROR_RINGBUF
	/* Like perf's watermark: the reader drains on a timer and is woken early only after
	 * this CPU has written MIRROR_WAKEUP_BYTES since its last wakeup (bcc 0.26 has no
	 * ringbuf_query), so even all CPUs together wake it before the ring is full. */
	int zero = 0;
	__u64 flags = BPF_RB_NO_WAKEUP;
	__u64 *n = since_wakeup.lookup(&zero);

	if (n) {
		*n += size;
		if (*n >= MIRROR_WAKEUP_BYTES) {
			*n = 0;
			flags = BPF_RB_FORCE_WAKEUP;
		}
	}
	return events.ringbuf_output(s, size, flags);
#else
	return events.perf_submit(ctx, s, size);
#endif
}

static __always_inline long load(void *ctx, __u32 off, void *buf, __u32 len, int is_xdp)
{
	if (is_xdp)
		return xdp_load_bytes(ctx, off, buf, len);
	return bpf_skb_load_bytes(ctx, off, buf, len);
}

static __always_inline int own_port(__u16 port)
{
	return port >= MIRROR_OWN_PORT_LO && port <= MIRROR_OWN_PORT_HI;
}

/* One capture per connection when an interface spec is followed: a connection routed
 * through the host (uplink in, pod's veth out) is kept only on the interface next to its
 * service. Kept: the service address is the host's own (on any interface), or the
 * interface is a POD side and the service lies beyond it (to the service on egress, from it
 * on ingress). Interfaces without a side (fixed names) keep everything. */
static __always_inline int here(const struct parsed *p, __u32 ifindex, __u8 hook,
				int to_service)
{
	struct addr_key k = {};
	const __u8 *svc = to_service ? p->daddr : p->saddr;
	__u8 *side = iface_side.lookup(&ifindex);
	int i;

	if (!side)
		return 1;
	if (p->family == 4) {
		k.b[10] = 0xff;
		k.b[11] = 0xff;
#pragma unroll
		for (i = 0; i < 4; i++)
			k.b[12 + i] = svc[i];
	} else {
#pragma unroll
		for (i = 0; i < 16; i++)
			k.b[i] = svc[i];
	}
	if (local_addrs.lookup(&k))
		return 1;
	return *side == MIRROR_SIDE_POD && to_service == (hook == MIRROR_HOOK_TC_EGRESS);
}

/* Copy up to HDR_COPY bytes of the frame from `off`, where `avail` (> 0) bytes remain;
 * *have: how many. -1 if nothing could be copied. */
static __always_inline int copy_hdr(void *ctx, struct hdr_buf *h, __u32 off, __u32 avail,
				    int is_xdp, __u32 *have)
{
	__u32 n;

	if (!avail)
		return -1;
	/* n in [1, HDR_COPY], computed so the verifier can see both bounds. */
	n = (avail < HDR_COPY ? avail : HDR_COPY) - 1;
	asm volatile("%0 &= 0xff" : "+r"(n));
	n += 1;
	if (load(ctx, off, h->b, n, is_xdp) < 0)
		return -1;
	*have = n;
	return 0;
}

#ifdef MIRROR_DECAP
/* The tunnel after the outer IP header l (decap.h), then the inner frame, copied from where
 * it starts into h and parsed like any frame up to its TCP header; p's addresses, ports and
 * payload are the inner packet's (payload_off from the start of the outer frame). */
static __always_inline int parse_tunnel(void *ctx, struct hdr_buf *h, __u32 have, int is_xdp,
					struct l3 *l, struct parsed *p)
{
	struct inner in = {};
	__u32 off = 0;
	int proto, reason;

	reason = decap(h, have, l, &in, p);
	if (reason)
		return reason;
	count(MC_DECAP, 1);
	if (in.off >= l->end) /* a tunnel header with nothing after it */
		return MC_BAD_TUNNEL;
	__u32 inner_len = l->end - in.off; /* the inner frame ends with the tunnel */
	if (copy_hdr(ctx, h, in.off, inner_len, is_xdp, &have) < 0)
		return MC_TRUNCATED;
	proto = in.type;
	if (proto == ETH_P_TEB) {
		proto = parse_eth(h, have, &off);
		if (proto < 0)
			return MC_TRUNCATED;
	}
	reason = parse_ip(h, have, inner_len, proto, off, l, p);
	if (reason)
		return reason;
	reason = parse_tcp(h, have, l, p);
	p->payload_off += in.off;
	return reason;
}
#endif

/* The frame's headers up to TCP (inside one tunnel with --decap): 0 with p filled, else the
 * drop reason. */
static __always_inline int parse(void *ctx, __u32 len, int is_xdp, struct parsed *p)
{
	int zero = 0, reason;
	struct hdr_buf *h = hdr_map.lookup(&zero);
	struct l3 l = {};
	__u32 have;

	if (!h || len < 14) /* the lookup cannot fail (one entry); the verifier wants the check */
		return MC_TRUNCATED;
	if (copy_hdr(ctx, h, 0, len, is_xdp, &have) < 0)
		return MC_TRUNCATED;
	reason = parse_l2_l3(h, have, len, &l, p);
	if (reason)
		return reason;
#ifdef MIRROR_DECAP
	if (l.proto != 6) /* TCP first: plain traffic pays one comparison for --decap */
		return parse_tunnel(ctx, h, have, is_xdp, &l, p);
#endif
	return parse_tcp(h, have, &l, p);
}

/* Does user space need this packet? 0 if so (p and *to_service filled in), else the drop
 * reason, the counter it is counted under: each packet is counted in one reason at most. */
static __always_inline int keep(void *ctx, __u32 len, __u32 ifindex, __u8 hook, int is_xdp,
				struct parsed *p, int *to_service)
{
	int reason = parse(ctx, len, is_xdp, p);

	if (reason)
		return reason;
	u16 sport = p->sport, dport = p->dport;
	*to_service = ports.lookup(&dport) != NULL;
	if (!*to_service && !ports.lookup(&sport))
		return MC_NOT_OUR_PORT;
	if (own_port(sport) || own_port(dport))
		return MC_OWN_FORWARD;
	/* A pure ACK tells user space nothing it needs: skip it here, where it is cheapest. */
	if (p->payload_len == 0 && !(p->flags & (MIRROR_TCP_FIN | MIRROR_TCP_SYN | MIRROR_TCP_RST)))
		return MC_PURE_ACK;
	if (!here(p, ifindex, hook, *to_service))
		return MC_ELSEWHERE;
	return 0;
}

static __always_inline void handle(void *ctx, __u32 len, __u32 ifindex, __u8 hook, int is_xdp)
{
	struct parsed p = {};
	struct scratch *s;
	__u32 cpu, off = 0;
	int i, reason, to_service = 0;

	count(MC_PACKETS, 1);
	reason = keep(ctx, len, ifindex, hook, is_xdp, &p, &to_service);
	if (reason) {
		count(reason, 1);
		return;
	}
	__u8 elided = 0;
#ifdef MIRROR_REQUESTS_ONLY
	/* Nobody forwards or records responses: of those only SYN/FIN/RST matter (they open
	 * and close the connection), and their payload is never copied. */
	if (!to_service && p.payload_len) {
		count(MC_ELIDED, 1);
		count(MC_ELIDED_BYTES, p.payload_len);
		if (!(p.flags & (MIRROR_TCP_FIN | MIRROR_TCP_SYN | MIRROR_TCP_RST)))
			return;
		elided = 1;
	}
#endif
	cpu = bpf_get_smp_processor_id();
	s = scratch_map.lookup(&cpu);
	if (!s)
		return;
	s->ev.ts_ns = bpf_ktime_get_ns();
	s->ev.ifindex = ifindex;
	s->ev.hook = hook;
	s->ev.family = p.family;
	s->ev.tcp_flags = p.flags;
	__builtin_memcpy(s->ev.saddr, p.saddr, 16);
	__builtin_memcpy(s->ev.daddr, p.daddr, 16);
	s->ev.sport = p.sport;
	s->ev.dport = p.dport;
	s->ev.seq = p.seq;
	s->ev.ack = p.ack;
	s->ev.window = p.window;
	s->ev.payload_len = p.payload_len;
	s->ev.elided = elided;
	s->ev.tunnel = p.tunnel;
	s->ev.tunnel_id = p.tunnel_id;
	if (elided) {
		s->ev.piece_off = 0;
		s->ev.piece_len = 0;
		s->ev.lost = 0;
		if (submit(ctx, s, sizeof(struct mirror_event)) < 0)
			count(MC_SUBMIT_FAILED, 1);
		else
			count(MC_SUBMITTED, 1);
		return;
	}

	for (i = 0; i < MAX_PIECES; i++) {
		__u32 remaining = p.payload_len - off;
		__u32 n = 0;

		s->ev.piece_off = off;
		s->ev.lost = 0;
		if (off) {
			/* A later piece carries its own position (a SYN's number is one before its
			 * first byte) and no SYN, so user space joins pieces like any segments. */
			s->ev.seq = p.seq + off + ((p.flags & MIRROR_TCP_SYN) ? 1 : 0);
			s->ev.tcp_flags = p.flags & ~MIRROR_TCP_SYN;
		}
		if (remaining > 0) {
			/* n in [1, MIRROR_PIECE], computed so the verifier can see both bounds. */
			n = (remaining > MIRROR_PIECE ? MIRROR_PIECE : remaining) - 1;
			asm volatile("%0 &= 0x7fff" : "+r"(n));
			n += 1;
			if (load(ctx, p.payload_off + off, s->data, n, is_xdp) < 0) {
				/* Tell user space exactly which bytes are missing: a gap, not a stall. */
				count(MC_COPY_FAILED, 1);
				s->ev.lost = remaining;
				n = 0;
			} else if (i == MAX_PIECES - 1 && remaining > n) {
				s->ev.lost = remaining - n; /* beyond what one packet may copy */
			}
		}
		s->ev.piece_len = n;
		if (submit(ctx, s, sizeof(struct mirror_event) + n) < 0) {
			count(MC_SUBMIT_FAILED, 1);
			count(MC_LOST_BYTES, remaining);
			return;
		}
		count(MC_SUBMITTED, 1);
		count(MC_BYTES, n);
		if (s->ev.lost) {
			count(MC_LOST_BYTES, s->ev.lost);
			return;
		}
		off += n;
		if (off >= p.payload_len)
			return;
	}
}

int mirror_tc_ingress(struct __sk_buff *skb)
{
	handle(skb, skb->len, skb->ifindex, MIRROR_HOOK_TC_INGRESS, 0);
	return MIRROR_TC_NEXT;
}

int mirror_tc_egress(struct __sk_buff *skb)
{
	handle(skb, skb->len, skb->ifindex, MIRROR_HOOK_TC_EGRESS, 0);
	return MIRROR_TC_NEXT;
}

int mirror_xdp(struct xdp_md *xdp)
{
	__u32 len = xdp->data_end - xdp->data;
	handle(xdp, len, xdp->ingress_ifindex, MIRROR_HOOK_XDP, 1);
	return XDP_PASS;
}
