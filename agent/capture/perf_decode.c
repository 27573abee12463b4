/* Native fast path of agent/capture/events.py: perf ring records -> coalesced runs.
 *
 * Same contract as EventDecoder (events.py), which stays the reference and the fallback:
 * a record whose payload continues the open run of its direction (same 4-tuple, sequence
 * number right after it, no SYN/FIN/RST, no loss, open window) joins that run; any other
 * record ends the runs of both directions of its connection and stands alone. Runs come out
 * in the order of their first record, each as a struct md_run followed by its payload.
 *
 * Two passes: the first walks the ring and assigns every record to a run, the second lays the
 * runs out in `out` and copies payload, so a run's bytes are contiguous however the
 * connections interleave. Output never exceeds input (a md_run is smaller than a perf header
 * plus a mirror_event), so an `out` as large as the ring always suffices.
 *
 * Built with `cc -O2 -shared -fPIC` by agent/capture/native.py; loaded with ctypes.
 */
#include <linux/types.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mirror_event.h" /* from bpf/: the one definition of the record */

#define PERF_RECORD_LOST 2
#define PERF_RECORD_SAMPLE 9
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define BOUNDARY (TCP_SYN | TCP_FIN | TCP_RST)
#define SLOTS 8192 /* open-run hash slots; more live connections per drain just do not join */

/* What one run looks like in `out`: agent/capture/native.py's RUN struct mirrors it. */
struct md_run {
	uint64_t ts_ns;
	uint32_t seq;
	uint32_t ack;
	uint32_t lost;
	uint32_t len; /* payload bytes that follow */
	uint16_t sport;
	uint16_t dport;
	uint16_t window;
	uint8_t family;
	uint8_t flags;
	uint8_t saddr[16];
	uint8_t daddr[16];
};

struct md_stats {
	uint64_t events;
	uint64_t coalesced;
	uint64_t lost_samples;
	uint64_t runs;
};

struct run {
	struct md_run hdr;
	uint32_t next;  /* sequence number of the byte after the run */
	uint32_t first; /* index of the first piece */
	uint32_t last;  /* index of the last piece */
	uint8_t open;
};

struct piece {
	const uint8_t *data;
	uint32_t len;
	uint32_t next; /* next piece of the same run, or UINT32_MAX */
};

static uint32_t key_hash(const struct mirror_event *e)
{
	/* FNV-1a over the addresses, ports and family: cheap and good enough for a table. */
	const uint8_t *p = e->saddr;
	uint32_t h = 2166136261u ^ e->family;
	for (int i = 0; i < 36; i++) /* saddr, daddr, sport, dport are adjacent */
		h = (h ^ p[i]) * 16777619u;
	return h;
}

static int same_key(const struct md_run *r, const struct mirror_event *e, int reverse)
{
	if (r->family != e->family)
		return 0;
	if (!reverse)
		return r->sport == e->sport && r->dport == e->dport &&
		       !memcmp(r->saddr, e->saddr, 16) && !memcmp(r->daddr, e->daddr, 16);
	return r->sport == e->dport && r->dport == e->sport &&
	       !memcmp(r->saddr, e->daddr, 16) && !memcmp(r->daddr, e->saddr, 16);
}

struct decoder {
	struct run *runs;
	struct piece *pieces;
	uint32_t nruns, npieces, cap;
	uint32_t slots[SLOTS]; /* run index + 1; 0: empty */
	int coalesce;
};

/* The slot for e's key (reverse: its connection's other direction), or -1 if none. */
static int find(struct decoder *d, const struct mirror_event *e, int reverse, uint32_t *slot)
{
	struct mirror_event k;
	const struct mirror_event *q = e;
	if (reverse) {
		memcpy(k.saddr, e->daddr, 16);
		memcpy(k.daddr, e->saddr, 16);
		k.sport = e->dport;
		k.dport = e->sport;
		k.family = e->family;
		q = &k;
	}
	uint32_t h = key_hash(q) & (SLOTS - 1);
	for (uint32_t i = 0; i < SLOTS; i++, h = (h + 1) & (SLOTS - 1)) {
		uint32_t v = d->slots[h];
		if (!v) {
			*slot = h;
			return -1;
		}
		if (same_key(&d->runs[v - 1].hdr, e, reverse)) {
			*slot = h;
			return (int)(v - 1);
		}
	}
	*slot = UINT32_MAX; /* table full */
	return -1;
}

static void add_piece(struct decoder *d, struct run *r, const uint8_t *data, uint32_t len)
{
	uint32_t i = d->npieces++;
	d->pieces[i].data = data;
	d->pieces[i].len = len;
	d->pieces[i].next = UINT32_MAX;
	if (r->hdr.len == 0 && r->first == UINT32_MAX) {
		r->first = r->last = i;
	} else {
		d->pieces[r->last].next = i;
		r->last = i;
	}
	r->hdr.len += len;
}

static struct run *new_run(struct decoder *d, const struct mirror_event *e, uint32_t seq,
			   uint8_t flags)
{
	struct run *r = &d->runs[d->nruns++];
	r->hdr.ts_ns = e->ts_ns;
	r->hdr.seq = seq;
	r->hdr.ack = e->ack;
	r->hdr.lost = e->lost;
	r->hdr.len = 0;
	r->hdr.sport = e->sport;
	r->hdr.dport = e->dport;
	r->hdr.window = e->window;
	r->hdr.family = e->family;
	r->hdr.flags = flags;
	memcpy(r->hdr.saddr, e->saddr, 16);
	memcpy(r->hdr.daddr, e->daddr, 16);
	r->first = r->last = UINT32_MAX;
	r->open = 0;
	return r;
}

static void one_event(struct decoder *d, const struct mirror_event *e, const uint8_t *payload,
		      struct md_stats *st)
{
	uint32_t seq = e->seq;
	uint8_t flags = e->tcp_flags;
	uint32_t plen = e->piece_len;
	uint32_t slot;
	int idx;

	st->events++;
	if (e->piece_off) { /* a later piece of a big packet: its own position, no SYN */
		seq += e->piece_off + ((flags & TCP_SYN) ? 1 : 0);
		flags &= ~TCP_SYN;
	}
	if ((uint64_t)e->piece_off + plen + e->lost < e->payload_len && !e->elided)
		flags &= ~(TCP_FIN | TCP_RST); /* FIN/RST belong after the packet's last byte */

	if (d->coalesce && plen && e->window && !e->lost && !(flags & BOUNDARY)) {
		idx = find(d, e, 0, &slot);
		if (idx >= 0 && d->runs[idx].open && d->runs[idx].next == seq) {
			struct run *r = &d->runs[idx];
			add_piece(d, r, payload, plen);
			r->next = seq + plen;
			r->hdr.ack = e->ack;
			r->hdr.window = e->window;
			st->coalesced++;
			return;
		}
		struct run *r = new_run(d, e, seq, flags);
		add_piece(d, r, payload, plen);
		r->next = seq + plen;
		if (slot != UINT32_MAX) { /* a full table: the run just cannot be joined */
			r->open = 1;
			d->slots[slot] = d->nruns;
		}
		return;
	}
	/* A boundary: later data of this connection, either direction, comes after it. */
	for (int rev = 0; rev < 2 && d->coalesce; rev++) {
		idx = find(d, e, rev, &slot);
		if (idx >= 0)
			d->runs[idx].open = 0;
	}
	struct run *r = new_run(d, e, seq, flags);
	if (plen)
		add_piece(d, r, payload, plen);
}

/* Lays the runs out in `out`; returns the bytes used. */
static uint64_t emit(struct decoder *d, uint8_t *out)
{
	uint64_t o = 0;
	for (uint32_t i = 0; i < d->nruns; i++) {
		struct run *r = &d->runs[i];
		memcpy(out + o, &r->hdr, sizeof(r->hdr));
		o += sizeof(r->hdr);
		for (uint32_t p = r->first; p != UINT32_MAX; p = d->pieces[p].next) {
			memcpy(out + o, d->pieces[p].data, d->pieces[p].len);
			o += d->pieces[p].len;
		}
		o = (o + 7) & ~(uint64_t)7;
	}
	return o;
}

/* Decodes the perf ring data area `base` (`size` bytes, a power of two) from *tail to head.
 *
 * Writes runs to `out` (at least `size` bytes), stores the new tail in *tail and adds to `st`.
 * `coalesce` 0 makes every record its own run. Returns the bytes written to `out`, or -1 when
 * out of memory (nothing consumed).
 */
int64_t md_decode_perf(const uint8_t *base, uint64_t size, uint64_t *tail, uint64_t head,
		       int coalesce, uint8_t *out, struct md_stats *st)
{
	const uint64_t mask = size - 1;
	uint64_t t = *tail;
	/* Every record is at least a perf header, a raw size and a mirror_event. */
	uint64_t max_events = (head - t) / (8 + 4 + sizeof(struct mirror_event)) + 1;
	struct decoder *d = calloc(1, sizeof(*d));
	uint8_t *wrapped = NULL;
	int wrapped_used = 0;
	int64_t used = -1;

	if (!d)
		return -1;
	d->coalesce = coalesce;
	d->runs = malloc(max_events * sizeof(*d->runs));
	d->pieces = malloc(max_events * sizeof(*d->pieces));
	wrapped = malloc(sizeof(struct mirror_event) + MIRROR_PIECE + 64);
	if (!d->runs || !d->pieces || !wrapped)
		goto out;

	while (t < head) {
		uint64_t pos = t & mask;
		const uint8_t *rec = base + pos;
		uint32_t type;
		uint16_t len;

		memcpy(&type, rec, 4); /* headers are 8-aligned: never split by the wrap */
		memcpy(&len, rec + 6, 2);
		if (len < 8)
			break; /* cannot happen with a sane kernel; never spin on it */
		if (pos + len > size) {
			/* The record that wraps the end: make it contiguous. A walk spans less than
			 * the ring, so there is one at most; `wrapped` lives until emit(). */
			uint64_t first = size - pos;
			if (len > sizeof(struct mirror_event) + MIRROR_PIECE + 64 || wrapped_used)
				break;
			wrapped_used = 1;
			memcpy(wrapped, rec, first);
			memcpy(wrapped + first, base, len - first);
			rec = wrapped;
		}
		if (type == PERF_RECORD_SAMPLE) {
			uint32_t raw;
			memcpy(&raw, rec + 8, 4);
			if (raw >= sizeof(struct mirror_event)) {
				const struct mirror_event *e = (const void *)(rec + 12);
				struct mirror_event copy;
				if ((uintptr_t)e & 7) { /* raw data sits 4 bytes off 8-alignment */
					memcpy(&copy, e, sizeof(copy));
					e = &copy;
				}
				if (sizeof(struct mirror_event) + e->piece_len <= raw)
					one_event(d, e, rec + 12 + sizeof(struct mirror_event), st);
			}
		} else if (type == PERF_RECORD_LOST) {
			uint64_t lost;
			memcpy(&lost, rec + 16, 8);
			st->lost_samples += lost;
		}
		t += len;
	}
	used = (int64_t)emit(d, out);
	st->runs += d->nruns;
	*tail = t;
out:
	free(wrapped);
	free(d->pieces);
	free(d->runs);
	free(d);
	return used;
}
