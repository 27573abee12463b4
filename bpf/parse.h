/* Header parsing over a copy of the packet's first bytes (struct hdr_buf): the same code
 * serves TC and XDP, and every access is checked against the bytes actually copied.
 * One frame is parsed in steps (Ethernet, IP, TCP) so that decap.h can put a tunnel between
 * an outer IP header and the inner frame, which is parsed with the same steps. */
#ifndef MIRROR_PARSE_H
#define MIRROR_PARSE_H

#define HDR_COPY 256 /* power of two: offsets are masked with HDR_COPY - 1 for the verifier */

#define ETH_P_IPV4 0x0800
#define ETH_P_IPV6 0x86DD
#define ETH_P_TEB 0x6558 /* transparent Ethernet bridging: an Ethernet frame follows */

struct hdr_buf {
	__u8 b[HDR_COPY];
};

struct parsed {
	__u8 family;
	__u8 flags;
	__u8 tunnel;     /* MIRROR_TUNNEL_* (decap.h), 0 outside tunnels */
	__u16 sport;
	__u16 dport;
	__u16 window;
	__u32 seq;
	__u32 ack;
	__u32 tunnel_id; /* the tunnel's VNI, key or session id */
	__u32 payload_off; /* from the start of the frame */
	__u32 payload_len;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* Where an IP header leads: what parse_ip() found, for the TCP or tunnel header after it. */
struct l3 {
	__u32 off;  /* the IP payload (L4 header), from the start of the bytes in hdr_buf */
	__u32 end;  /* the datagram's end, never past the frame's */
	__u8 proto; /* the IP protocol; IPv6: after extension headers (44: a fragment) */
	__u8 frag;  /* IPv4: a fragment other than the first; IPv6: a fragment header */
	__u8 more;  /* IPv4: more fragments follow (MF) */
};


/* Big-endian reads; the caller guarantees off + n <= HDR_COPY via the checks below. */
static __always_inline __u16 rd16(const struct hdr_buf *h, __u32 off)
{
	return ((__u16)h->b[off & (HDR_COPY - 1)] << 8) | h->b[(off + 1) & (HDR_COPY - 1)];
}

static __always_inline __u32 rd32(const struct hdr_buf *h, __u32 off)
{
	return ((__u32)rd16(h, off) << 16) | rd16(h, off + 2);
}

/* Ethernet and up to two 802.1Q/802.1ad tags (a bounded, unrolled walk) from byte 0 of the
 * `have` bytes in h: the EtherType, *off just past it; or -1 if cut short. */
static __always_inline int parse_eth(const struct hdr_buf *h, __u32 have, __u32 *off)
{
	__u32 o = 12;
	__u16 proto;
	int i;

	if (have < 14)
		return -1;
	proto = rd16(h, o);
#pragma unroll
	for (i = 0; i < 2; i++) {
		if (proto != 0x8100 && proto != 0x88A8)
			break;
		o += 4;
		if (o + 2 > have)
			return -1;
		proto = rd16(h, o);
	}
	*off = o + 2;
	return proto;
}

/* The IPv4 header at `off` (no options read but their length), addresses into p. */
static __always_inline int parse_ipv4(const struct hdr_buf *h, __u32 have, __u32 frame_len,
				      __u32 off, struct l3 *l, struct parsed *p)
{
	int i;

	if (off + 20 > have)
		return MC_TRUNCATED;
	__u8 vihl = h->b[off & (HDR_COPY - 1)];
	__u32 ihl = (vihl & 0x0F) * 4;
	if ((vihl >> 4) != 4 || ihl < 20)
		return MC_TRUNCATED;
	__u16 frag = rd16(h, off + 6);
	__u32 total = rd16(h, off + 2);
	l->proto = h->b[(off + 9) & (HDR_COPY - 1)];
	l->frag = (frag & 0x1FFF) != 0; /* only the first fragment has the L4 header */
	l->more = (frag & 0x2000) != 0;
	l->end = total ? off + total : frame_len; /* 0: a TSO/BIG TCP super-packet */
	p->family = 4;
#pragma unroll
	for (i = 0; i < 4; i++) {
		p->saddr[i] = h->b[(off + 12 + i) & (HDR_COPY - 1)];
		p->daddr[i] = h->b[(off + 16 + i) & (HDR_COPY - 1)];
	}
	l->off = off + ihl;
	return 0;
}

/* The IPv6 header at `off` and up to two hop-by-hop/routing/destination options headers
 * (bounded, unrolled), addresses into p. */
static __always_inline int parse_ipv6(const struct hdr_buf *h, __u32 have, __u32 frame_len,
				      __u32 off, struct l3 *l, struct parsed *p)
{
	int i;

	if (off + 40 > have)
		return MC_TRUNCATED;
	__u8 next = h->b[(off + 6) & (HDR_COPY - 1)];
	__u32 plen = rd16(h, off + 4);
	l->end = plen ? off + 40 + plen : frame_len;
	p->family = 6;
#pragma unroll
	for (i = 0; i < 16; i++) {
		p->saddr[i] = h->b[(off + 8 + i) & (HDR_COPY - 1)];
		p->daddr[i] = h->b[(off + 24 + i) & (HDR_COPY - 1)];
	}
	off += 40;
#pragma unroll
	for (i = 0; i < 2; i++) {
		if (next != 0 && next != 43 && next != 60)
			break;
		if (off + 2 > have)
			return MC_TRUNCATED;
		next = h->b[off & (HDR_COPY - 1)];
		off += (h->b[(off + 1) & (HDR_COPY - 1)] + 1) * 8;
	}
	l->proto = next;
	l->frag = next == 44;
	l->more = 0;
	l->off = off;
	return 0;
}

/* The IP header (EtherType `proto`) at `off` of a frame of `frame_len` bytes: addresses and
 * family into p, where it leads into l (its end clamped to the frame). 0 or a drop reason. */
static __always_inline int parse_ip(const struct hdr_buf *h, __u32 have, __u32 frame_len,
				    int proto, __u32 off, struct l3 *l, struct parsed *p)
{
	int reason;

	if (proto == ETH_P_IPV4)
		reason = parse_ipv4(h, have, frame_len, off, l, p);
	else if (proto == ETH_P_IPV6)
		reason = parse_ipv6(h, have, frame_len, off, l, p);
	else
		return MC_NOT_IP;
	if (reason)
		return reason;
	if (l->end > frame_len)
		l->end = frame_len;
	return 0;
}

/* What a non-TCP IP payload is counted as when it is not (or cannot be) decapsulated. */
static __always_inline int not_tcp(const struct l3 *l)
{
	return l->frag && l->proto == 44 ? MC_FRAGMENT : MC_NOT_TCP; /* 44: IPv6 fragment */
}

/* The TCP header at l->off: ports, numbers, flags into p, and where its payload lies (from
 * the start of the bytes in h). 0 or a drop reason. */
static __always_inline int parse_tcp(const struct hdr_buf *h, __u32 have, const struct l3 *l,
				     struct parsed *p)
{
	__u32 off = l->off;

	if (l->proto != 6)
		return not_tcp(l);
	if (l->frag)
		return MC_FRAGMENT;
	if (off + 20 > have)
		return MC_TRUNCATED;
	p->sport = rd16(h, off);
	p->dport = rd16(h, off + 2);
	p->seq = rd32(h, off + 4);
	p->ack = rd32(h, off + 8);
	__u32 doff = (h->b[(off + 12) & (HDR_COPY - 1)] >> 4) * 4;
	p->flags = h->b[(off + 13) & (HDR_COPY - 1)];
	p->window = rd16(h, off + 14);
	if (doff < 20)
		return MC_TRUNCATED;
	off += doff;
	if (off > l->end)
		return MC_TRUNCATED;
	p->payload_off = off;
	p->payload_len = l->end - off;
	return 0;
}

/* Ethernet (with tags) and IP of the frame in h: where the IP header leads, into l. */
static __always_inline int parse_l2_l3(const struct hdr_buf *h, __u32 have, __u32 frame_len,
				       struct l3 *l, struct parsed *p)
{
	__u32 off = 0;
	int proto = parse_eth(h, have, &off);

	if (proto < 0)
		return MC_TRUNCATED;
	return parse_ip(h, have, frame_len, proto, off, l, p);
}

#endif
