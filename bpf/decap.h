/* Decapsulation (--decap): the tunnel header right after an outer IP header, read from the
 * same copy as the outer headers (struct hdr_buf) with a bounds check before every read.
 * It says where the inner frame starts; mirror.bpf.c copies the inner frame's first bytes
 * and parses them with parse.h's steps (Ethernet with its own VLAN tags, IP, TCP). One level:
 * what is inside a tunnel is never decapsulated again (the verifier wants bounded work).
 *
 * Which tunnels are opened is fixed at compile time (agent/sources/ebpf/decap.py):
 *   MIRROR_DECAP              any of them
 *   MIRROR_DECAP_VXLAN(port)  true for VXLAN's UDP ports     (RFC 7348; Ethernet inside)
 *   MIRROR_DECAP_GENEVE(port) true for Geneve's UDP ports    (RFC 8926; Ethernet or IP)
 *   MIRROR_DECAP_GRE          GRE version 0 with IP or Ethernet (0x6558) inside (RFC 2784/2890)
 *   MIRROR_DECAP_ERSPAN       ERSPAN types I, II, III in GRE (Ethernet inside)
 *   MIRROR_DECAP_IPIP         IPv4/IPv6 in IPv4/IPv6 (protocols 4 and 41)
 * The identity (struct parsed.tunnel, tunnel_id) follows agent/decode/tunnels.py: VNI, GRE
 * key (only with one), ERSPAN session; an ERSPAN session's own GRE key is not kept. */
#ifndef MIRROR_DECAP_H
#define MIRROR_DECAP_H

#define GRE_CSUM 0x8000
#define GRE_ROUTING 0x4000
#define GRE_KEY 0x2000
#define GRE_SEQ 0x1000
#define ETH_P_ERSPAN 0x88BE  /* type II (GRE with a sequence number) or I (without) */
#define ETH_P_ERSPAN3 0x22EB
#define IPPROTO_UDP_ 17
#define IPPROTO_GRE_ 47
#define IPPROTO_IPIP_ 4
#define IPPROTO_IPV6_ 41

/* Where a tunnel's payload starts, and what it is. */
struct inner {
	__u32 off; /* from the start of the frame */
	int type;  /* ETH_P_TEB: an Ethernet frame; ETH_P_IPV4 / ETH_P_IPV6: an IP packet */
};

/* Is `proto` (an outer IP protocol) a tunnel this build opens? */
static __always_inline int tunnel_proto(__u8 proto)
{
#if defined(MIRROR_DECAP_VXLAN) || defined(MIRROR_DECAP_GENEVE)
	if (proto == IPPROTO_UDP_)
		return 1;
#endif
#if defined(MIRROR_DECAP_GRE) || defined(MIRROR_DECAP_ERSPAN)
	if (proto == IPPROTO_GRE_)
		return 1;
#endif
#ifdef MIRROR_DECAP_IPIP
	if (proto == IPPROTO_IPIP_ || proto == IPPROTO_IPV6_)
		return 1;
#endif
	return 0;
}

/* The UDP tunnel a port belongs to (MIRROR_TUNNEL_*), or 0. */
static __always_inline int udp_tunnel(__u16 port)
{
#ifdef MIRROR_DECAP_VXLAN
	if (MIRROR_DECAP_VXLAN(port))
		return MIRROR_TUNNEL_VXLAN;
#endif
#ifdef MIRROR_DECAP_GENEVE
	if (MIRROR_DECAP_GENEVE(port))
		return MIRROR_TUNNEL_GENEVE;
#endif
	return 0;
}

/* VXLAN or Geneve by UDP port (the destination first, then the source: a sender may use
 * either), its header after the UDP header at l->off. */
static __always_inline int decap_udp(const struct hdr_buf *h, __u32 have, struct l3 *l,
				     struct inner *in, struct parsed *p)
{
	__u32 off = l->off;
	int kind;

	if (off + 8 > have)
		return MC_TRUNCATED; /* not even a UDP header: not known to be a tunnel */
	kind = udp_tunnel(rd16(h, off + 2));
	if (!kind)
		kind = udp_tunnel(rd16(h, off));
	if (!kind)
		return MC_NOT_TCP;
	__u32 ulen = rd16(h, off + 4);
	if (ulen && ulen < 8)
		return MC_BAD_TUNNEL;
	if (ulen && off + ulen < l->end)
		l->end = off + ulen; /* the tunnel ends with the UDP datagram (0: with the IP one) */
	off += 8;
	if (off + 8 > have) /* both headers are 8 bytes before any option */
		return MC_BAD_TUNNEL;
	__u8 b0 = h->b[off & (HDR_COPY - 1)];
	p->tunnel = kind;
	p->tunnel_id = rd32(h, off + 4) >> 8; /* both: the 24-bit VNI, then a reserved byte */
	if (kind == MIRROR_TUNNEL_VXLAN) {
		if (!(b0 & 0x08)) /* the I flag: without it there is no valid VNI */
			return MC_BAD_TUNNEL;
		in->off = off + 8;
		in->type = ETH_P_TEB;
		return 0;
	}
	if (b0 >> 6) /* Geneve version 0 only */
		return MC_BAD_TUNNEL;
	in->type = rd16(h, off + 2);
	in->off = off + 8 + (b0 & 0x3F) * 4; /* past the options, which are not read */
	return 0;
}

/* An ERSPAN header at `off` (after its GRE header; `seq`: that had a sequence number). */
static __always_inline int decap_erspan(const struct hdr_buf *h, __u32 have, __u32 off,
					__u16 proto, int seq, struct inner *in, struct parsed *p)
{
	in->type = ETH_P_TEB;
	if (proto == ETH_P_ERSPAN && !seq) { /* type I: no header of its own, no session */
		in->off = off;
		return 0;
	}
	if (proto == ETH_P_ERSPAN) { /* type II: version 1, ..., the session id; 8 bytes */
		if (off + 8 > have)
			return MC_BAD_TUNNEL;
		if ((h->b[off & (HDR_COPY - 1)] >> 4) != 1)
			return MC_BAD_TUNNEL;
		in->off = off + 8;
	} else { /* type III: version 2; 12 bytes, 20 with the platform subheader (O bit) */
		if (off + 12 > have)
			return MC_BAD_TUNNEL;
		if ((h->b[off & (HDR_COPY - 1)] >> 4) != 2)
			return MC_BAD_TUNNEL;
		__u16 word = rd16(h, off + 10);
		if ((word >> 10) & 0x1F) /* the frame type: only 0, Ethernet */
			return MC_NOT_IP;
		in->off = off + ((word & 1) ? 20 : 12);
	}
	p->tunnel = MIRROR_TUNNEL_ERSPAN;
	p->tunnel_id = rd16(h, off + 2) & 0x3FF;
	return 0;
}

/* A GRE version 0 header at l->off: checksum, key and sequence number as its flags say. */
static __always_inline int decap_gre(const struct hdr_buf *h, __u32 have, struct l3 *l,
				     struct inner *in, struct parsed *p)
{
	__u32 off = l->off, size = 4;

	if (off + 4 > have)
		return MC_BAD_TUNNEL;
	__u16 flags = rd16(h, off);
	__u16 proto = rd16(h, off + 2);
	if (flags & 7) /* version 1 is PPTP's (PPP inside): not opened */
		return MC_NOT_TCP;
	if (flags & GRE_ROUTING) /* RFC 1701 source routing: variable, obsolete */
		return MC_BAD_TUNNEL;
	if (flags & GRE_CSUM)
		size += 4;
	if (flags & GRE_KEY) {
		if (off + size + 4 > have)
			return MC_BAD_TUNNEL;
		p->tunnel = MIRROR_TUNNEL_GRE;
		p->tunnel_id = rd32(h, off + size);
		size += 4;
	}
	if (flags & GRE_SEQ)
		size += 4;
	off += size;
	if (proto == ETH_P_ERSPAN || proto == ETH_P_ERSPAN3) {
#ifdef MIRROR_DECAP_ERSPAN
		return decap_erspan(h, have, off, proto, flags & GRE_SEQ, in, p);
#else
		return MC_NOT_TCP;
#endif
	}
#ifdef MIRROR_DECAP_GRE
	if (proto != ETH_P_IPV4 && proto != ETH_P_IPV6 && proto != ETH_P_TEB)
		return MC_NOT_IP;
	in->off = off;
	in->type = proto;
	return 0;
#else
	return MC_NOT_TCP;
#endif
}

/* The tunnel header after the outer IP header l: 0 with the inner frame in `in` (and
 * l->end narrowed to the tunnel's end), else the drop reason. */
static __always_inline int decap(const struct hdr_buf *h, __u32 have, struct l3 *l,
				 struct inner *in, struct parsed *p)
{
	if (!tunnel_proto(l->proto))
		return not_tcp(l);
	if (l->frag || l->more) /* an outer fragment: the tunnel would be cut */
		return MC_FRAGMENT;
	if (l->proto == IPPROTO_UDP_)
		return decap_udp(h, have, l, in, p);
	if (l->proto == IPPROTO_GRE_)
		return decap_gre(h, have, l, in, p);
	in->off = l->off; /* IP in IP: the inner packet right after the outer header */
	in->type = l->proto == IPPROTO_IPIP_ ? ETH_P_IPV4 : ETH_P_IPV6;
	return 0;
}

#endif
