/* Header parsing over a copy of the packet's first bytes (struct hdr_buf): the same code
 * serves TC and XDP, and every access is checked against the bytes actually copied. */
#ifndef MIRROR_PARSE_H
#define MIRROR_PARSE_H

#define HDR_COPY 256 /* power of two: offsets are masked with HDR_COPY - 1 for the verifier */

struct hdr_buf {
	__u8 b[HDR_COPY];
};

struct parsed {
	__u8 family;
	__u8 flags;
	__u16 sport;
	__u16 dport;
	__u16 window;
	__u32 seq;
	__u32 ack;
	__u32 payload_off; /* from the start of the frame */
	__u32 payload_len;
	__u8 saddr[16];
	__u8 daddr[16];
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

/* h holds `have` bytes of a frame of `frame_len` bytes. Returns 0, or the drop reason (an
 * MC_* counter of mirror_event.h) when the frame is not TCP over IP or cannot be parsed. */
static __always_inline int parse_frame(const struct hdr_buf *h, __u32 have, __u32 frame_len,
				       struct parsed *p)
{
	__u32 off = 12;
	__u16 proto;
	int i;

	if (have < 14)
		return MC_TRUNCATED;
	proto = rd16(h, off);
#pragma unroll
	for (i = 0; i < 2; i++) { /* 802.1Q / 802.1ad tags */
		if (proto != 0x8100 && proto != 0x88A8)
			break;
		off += 4;
		if (off + 2 > have)
			return MC_TRUNCATED;
		proto = rd16(h, off);
	}
	off += 2;

	__u32 ip_end;
	if (proto == 0x0800) {
		if (off + 20 > have)
			return MC_TRUNCATED;
		__u8 vihl = h->b[off & (HDR_COPY - 1)];
		__u32 ihl = (vihl & 0x0F) * 4;
		if ((vihl >> 4) != 4 || ihl < 20)
			return MC_TRUNCATED;
		if (h->b[(off + 9) & (HDR_COPY - 1)] != 6)
			return MC_NOT_TCP;
		if (rd16(h, off + 6) & 0x1FFF)
			return MC_FRAGMENT; /* only the first fragment has the TCP header */
		__u32 total = rd16(h, off + 2);
		ip_end = total ? off + total : frame_len; /* 0: a TSO/BIG TCP super-packet */
		p->family = 4;
#pragma unroll
		for (i = 0; i < 4; i++) {
			p->saddr[i] = h->b[(off + 12 + i) & (HDR_COPY - 1)];
			p->daddr[i] = h->b[(off + 16 + i) & (HDR_COPY - 1)];
		}
		off += ihl;
	} else if (proto == 0x86DD) {
		if (off + 40 > have)
			return MC_TRUNCATED;
		__u8 next = h->b[(off + 6) & (HDR_COPY - 1)];
		__u32 plen = rd16(h, off + 4);
		ip_end = plen ? off + 40 + plen : frame_len;
		p->family = 6;
#pragma unroll
		for (i = 0; i < 16; i++) {
			p->saddr[i] = h->b[(off + 8 + i) & (HDR_COPY - 1)];
			p->daddr[i] = h->b[(off + 24 + i) & (HDR_COPY - 1)];
		}
		off += 40;
#pragma unroll
		for (i = 0; i < 2; i++) { /* hop-by-hop, routing, destination options */
			if (next != 0 && next != 43 && next != 60)
				break;
			if (off + 2 > have)
				return MC_TRUNCATED;
			next = h->b[off & (HDR_COPY - 1)];
			off += (h->b[(off + 1) & (HDR_COPY - 1)] + 1) * 8;
		}
		if (next == 44)
			return MC_FRAGMENT;
		if (next != 6)
			return MC_NOT_TCP;
	} else {
		return MC_NOT_IP;
	}

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
	if (ip_end > frame_len)
		ip_end = frame_len;
	if (off > ip_end)
		return MC_TRUNCATED;
	p->payload_off = off;
	p->payload_len = ip_end - off;
	return 0;
}

#endif
