/* The native ring path: perf rings and the BPF ring buffer -> coalesced runs.
 *
 * One decoder for both transports. It walks a ring from the consumer position to the
 * producer position, counts what is not a sample (perf LOST records, ring buffer records the
 * producer discarded), joins each direction's in-order payload into runs, lays the runs out
 * in its output buffer and then releases the walked bytes to the kernel itself.
 *
 * Same contract as EventDecoder (events.py), which stays the reference and the fallback:
 * a record whose payload continues the open run of its direction (same 4-tuple, sequence
 * number right after it, no SYN/FIN/RST, no loss, open window) joins that run; any other
 * record ends the runs of both directions of its connection and stands alone. Runs come out
 * in the order of their first record: the output holds the runs' struct md_run headers, one
 * after the other, then their payloads in the same order (so user space unpacks the headers
 * in one sweep).
 *
 * Memory ordering, as the kernel documents it for both rings: the producer position is read
 * with an acquire load (the records before it are then visible), and the consumer position
 * is written with a release store after the last read of the records it frees (so the kernel
 * cannot overwrite bytes still being copied). A ring buffer record's length word is read with
 * an acquire load too: its busy bit is cleared by the producer's release when the record is
 * complete.
 *
 * Bounded state: everything is allocated once by md_new() (sizes chosen by the caller,
 * agent/sources/ring/native.py, which states the arithmetic) and reused by every call. A call
 * decodes at most `max_events` records and never writes more than `out_size` bytes; when it
 * stops at either bound it says so (md_call.more) and the caller calls again. The open-run
 * table is probed at most MD_PROBES slots: a key that finds no slot there does not coalesce
 * (counted in no_slot) and the table never degrades to a scan.
 *
 * Built with `cc -O2 -shared -fPIC` by agent/sources/ring/native.py; loaded with ctypes (which
 * releases the GIL for the call).
 */
#include <linux/bpf.h>
#include <linux/perf_event.h>
#include <linux/types.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "mirror_event.h" /* from bpf/: the one definition of the record */
#include "ring_decode.h"   /* md_stats, md_call and what ring_pump.c calls */

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define BOUNDARY (TCP_SYN | TCP_FIN | TCP_RST)
#define MD_PROBES 16       /* open-run table: slots probed per lookup, at most */
#define MD_MAX_RECORD 65536 /* perf_event_header.size is a u16: no record is larger */
#define NONE UINT32_MAX

_Static_assert(offsetof(struct perf_event_mmap_page, data_head) == 1024, "data_head");
_Static_assert(offsetof(struct perf_event_mmap_page, data_tail) == 1032, "data_tail");
_Static_assert(BPF_RINGBUF_HDR_SZ == 8, "ring buffer record header");

/* What one run looks like in the output: agent/sources/ring/native.py's RUN struct mirrors it. */
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
	uint32_t tunnel_id; /* mirror_event's tunnel identity: part of the run's key */
	uint8_t tunnel;
	uint8_t pad[3];
};
_Static_assert(sizeof(struct md_run) == MD_RUN_SIZE, "struct md_run: native.py's RUN");

struct run {
	struct md_run hdr;
	uint32_t next;  /* sequence number of the byte after the run */
	uint32_t first; /* index of the first piece, or NONE */
	uint32_t last;  /* index of the last piece */
	uint32_t slot;  /* its table slot, or NONE (to clear the table after a call) */
	uint8_t open;
};

struct piece {
	const uint8_t *data;
	uint32_t len;
	uint32_t next; /* next piece of the same run, or NONE */
};

struct md_decoder {
	uint32_t max_events; /* per call; runs and pieces hold that many */
	uint32_t mask;       /* table slots - 1 (a power of two) */
	uint64_t out_size;
	int coalesce;
	/* Per call: */
	uint32_t nevents, nruns, npieces;
	uint64_t out_need; /* the most bytes the runs so far can take in the output */
	int wrapped_used;
	/* Allocated once: */
	struct run *runs;
	struct piece *pieces;
	uint32_t *slots;  /* run index + 1; 0: empty */
	uint8_t *wrapped; /* perf: the one record of a call that wraps the ring's end */
	uint8_t *out;
};

void md_free(struct md_decoder *d)
{
	if (!d)
		return;
	free(d->runs);
	free(d->pieces);
	free(d->slots);
	free(d->wrapped);
	free(d->out);
	free(d);
}

/* A decoder for calls of up to `max_events` records and `out_size` bytes of output, with an
 * open-run table of `slots` (a power of two). `coalesce` 0 makes every record its own run.
 * NULL if the sizes are unusable or memory is short. */
struct md_decoder *md_new(uint32_t max_events, uint32_t slots, uint64_t out_size, int coalesce)
{
	struct md_decoder *d;

	/* The output must take any one record's run: a md_run and a u16-sized piece. */
	if (!max_events || max_events >= NONE || !slots || (slots & (slots - 1)) ||
	    out_size < sizeof(struct md_run) + MD_MAX_RECORD)
		return NULL;
	d = calloc(1, sizeof(*d));
	if (!d)
		return NULL;
	d->max_events = max_events;
	d->mask = slots - 1;
	d->out_size = out_size;
	d->coalesce = coalesce;
	d->runs = malloc((size_t)max_events * sizeof(*d->runs));
	d->pieces = malloc((size_t)max_events * sizeof(*d->pieces));
	d->slots = calloc(slots, sizeof(*d->slots));
	d->wrapped = malloc(MD_MAX_RECORD);
	d->out = malloc(out_size);
	if (!d->runs || !d->pieces || !d->slots || !d->wrapped || !d->out) {
		md_free(d);
		return NULL;
	}
	return d;
}

/* The output buffer: a call's runs are there until the next call. */
const uint8_t *md_out(const struct md_decoder *d)
{
	return d->out;
}

/* Bytes of output one call may write. */
uint64_t md_out_size(const struct md_decoder *d)
{
	return d->out_size;
}

#ifndef MD_SOURCE_DIGEST
#define MD_SOURCE_DIGEST "unknown" /* setup.py defines it: the sources' hash */
#endif

/* The hash of the sources this library was built from (setup.py computes it; native.py
 * recomputes it from the installed sources and refuses a library built from others). */
const char *md_source_digest(void)
{
	return MD_SOURCE_DIGEST;
}

/* Bytes this decoder holds, for the caller to check its stated bound. */
uint64_t md_footprint(const struct md_decoder *d)
{
	return sizeof(*d) + (uint64_t)d->max_events * (sizeof(struct run) + sizeof(struct piece)) +
	       (uint64_t)(d->mask + 1) * sizeof(uint32_t) + MD_MAX_RECORD + d->out_size;
}

static uint32_t key_hash(const struct mirror_event *e)
{
	/* FNV-1a over the addresses, ports and family: cheap and good enough for a table. */
	const uint8_t *p = e->saddr;
	uint32_t h = 2166136261u ^ e->family;
	for (int i = 0; i < 36; i++) /* saddr, daddr, sport, dport are adjacent */
		h = (h ^ p[i]) * 16777619u;
	return h ^ (h >> 15);
}

static int same_key(const struct md_run *r, const struct mirror_event *k)
{
	return r->family == k->family && r->sport == k->sport && r->dport == k->dport &&
	       r->tunnel == k->tunnel && r->tunnel_id == k->tunnel_id &&
	       !memcmp(r->saddr, k->saddr, 16) && !memcmp(r->daddr, k->daddr, 16);
}

/* The run holding k's key (-1: none) and in *slot the key's slot, or NONE if the key has none
 * and none is free within MD_PROBES. A key is only ever stored within MD_PROBES of its hash,
 * so a key that is there is always found. */
static int find(struct md_decoder *d, const struct mirror_event *k, uint32_t *slot)
{
	uint32_t h = key_hash(k) & d->mask;
	uint32_t probes = d->mask + 1 < MD_PROBES ? d->mask + 1 : MD_PROBES;

	for (uint32_t i = 0; i < probes; i++, h = (h + 1) & d->mask) {
		uint32_t v = d->slots[h];
		if (!v) {
			*slot = h;
			return -1;
		}
		if (same_key(&d->runs[v - 1].hdr, k)) {
			*slot = h;
			return (int)(v - 1);
		}
	}
	*slot = NONE;
	return -1;
}

static void add_piece(struct md_decoder *d, struct run *r, const uint8_t *data, uint32_t len)
{
	uint32_t i = d->npieces++;

	d->pieces[i].data = data;
	d->pieces[i].len = len;
	d->pieces[i].next = NONE;
	if (r->first == NONE)
		r->first = i;
	else
		d->pieces[r->last].next = i;
	r->last = i;
	r->hdr.len += len;
	d->out_need += len;
}

static struct run *new_run(struct md_decoder *d, const struct mirror_event *e, uint32_t seq,
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
	r->hdr.tunnel_id = e->tunnel_id;
	r->hdr.tunnel = e->tunnel;
	memset(r->hdr.pad, 0, sizeof(r->hdr.pad));
	r->first = r->last = NONE;
	r->slot = NONE;
	r->open = 0;
	d->out_need += sizeof(struct md_run);
	return r;
}

/* Can one more record with `plen` payload bytes be taken in this call? */
static int room(const struct md_decoder *d, uint32_t plen)
{
	return d->nevents < d->max_events &&
	       d->out_need + sizeof(struct md_run) + plen <= d->out_size;
}

/* One mirror_event and its piece at `p` (`size` bytes, any alignment). */
static void one_event(struct md_decoder *d, const uint8_t *p, uint32_t size, struct md_stats *st)
{
	struct mirror_event e;
	uint32_t seq, plen, slot;
	uint8_t flags;
	int idx;

	memcpy(&e, p, sizeof(e));
	seq = e.seq;
	flags = e.tcp_flags;
	plen = e.piece_len;
	if (sizeof(e) + plen > size) { /* the piece would run past the record */
		st->malformed++;
		return;
	}
	d->nevents++;
	st->events++;
	p += sizeof(e);
	if ((uint64_t)e.piece_off + plen + e.lost < e.payload_len && !e.elided)
		flags &= ~(TCP_FIN | TCP_RST); /* FIN/RST belong after the packet's last byte */

	if (d->coalesce && plen && e.window && !e.lost && !(flags & BOUNDARY)) {
		idx = find(d, &e, &slot);
		if (idx >= 0 && d->runs[idx].open && d->runs[idx].next == seq) {
			struct run *r = &d->runs[idx];
			add_piece(d, r, p, plen);
			r->next = seq + plen;
			r->hdr.ack = e.ack;
			r->hdr.window = e.window;
			st->coalesced++;
			return;
		}
		struct run *r = new_run(d, &e, seq, flags);
		add_piece(d, r, p, plen);
		r->next = seq + plen;
		if (slot == NONE) { /* no slot within MD_PROBES: this run just cannot be joined */
			st->no_slot++;
			return;
		}
		r->open = 1;
		r->slot = slot;
		d->slots[slot] = d->nruns;
		return;
	}
	/* A boundary: later data of this connection, either direction, comes after it. */
	if (d->coalesce) {
		idx = find(d, &e, &slot);
		if (idx >= 0)
			d->runs[idx].open = 0;
		struct mirror_event k = e; /* the other direction's key */
		memcpy(k.saddr, e.daddr, 16);
		memcpy(k.daddr, e.saddr, 16);
		k.sport = e.dport;
		k.dport = e.sport;
		idx = find(d, &k, &slot);
		if (idx >= 0)
			d->runs[idx].open = 0;
	}
	struct run *r = new_run(d, &e, seq, flags);
	if (plen)
		add_piece(d, r, p, plen);
}

static void begin(struct md_decoder *d, struct md_call *call, struct md_stats *st)
{
	d->nevents = d->nruns = d->npieces = 0;
	d->out_need = 0;
	d->wrapped_used = 0;
	memset(call, 0, sizeof(*call));
	st->calls++;
}

/* Lays the runs out in the output (the headers, then the payloads), empties the table;
 * returns the bytes used. */
static uint64_t finish(struct md_decoder *d, uint8_t *out, struct md_call *call,
		       struct md_stats *st)
{
	uint64_t o = (uint64_t)d->nruns * sizeof(struct md_run);

	for (uint32_t i = 0; i < d->nruns; i++) {
		struct run *r = &d->runs[i];
		memcpy(out + (uint64_t)i * sizeof(struct md_run), &r->hdr, sizeof(r->hdr));
		for (uint32_t p = r->first; p != NONE; p = d->pieces[p].next) {
			memcpy(out + o, d->pieces[p].data, d->pieces[p].len);
			o += d->pieces[p].len;
		}
		if (r->slot != NONE)
			d->slots[r->slot] = 0;
	}
	st->runs += d->nruns;
	st->bounded += call->more;
	call->runs = d->nruns;
	call->out_used = o;
	return o;
}

/* Bytes from `pos` to the producer position `prod`, at most to `until` (a position from an
 * earlier call, so a caller's loop ends even while the producer keeps writing). */
static uint64_t clamp(uint64_t pos, uint64_t prod, uint64_t until)
{
	return prod - pos > until - pos ? until : prod;
}

/* Decodes a perf ring: `ctrl` its struct perf_event_mmap_page, `data` its data area of `size`
 * bytes (a power of two). Reads from data_tail to data_head (at most to `until`), then
 * stores the new data_tail. Writes the runs to `out` (md_out_size() bytes); returns the
 * bytes used, also in call->out_used. */
int64_t md_perf_into(struct md_decoder *d, uint8_t *out, struct perf_event_mmap_page *ctrl,
		     const uint8_t *data, uint64_t size, uint64_t until, struct md_call *call,
		     struct md_stats *st)
{
	const uint64_t mask = size - 1;
	uint64_t head = __atomic_load_n(&ctrl->data_head, __ATOMIC_ACQUIRE);
	uint64_t tail = __atomic_load_n(&ctrl->data_tail, __ATOMIC_RELAXED); /* ours alone */
	const uint64_t start = tail;

	begin(d, call, st);
	call->head = head;
	call->pending = head - tail;
	head = clamp(tail, head, until);
	if (head - tail > size) { /* cannot happen with a sane kernel: skip it all */
		st->malformed++;
		tail = head;
	}
	while (tail != head) {
		uint64_t pos = tail & mask;
		const uint8_t *rec = data + pos;
		struct perf_event_header h;

		memcpy(&h, rec, sizeof(h)); /* headers are 8-aligned: never split by the wrap */
		if (h.size < sizeof(h) || h.size > head - tail) {
			/* Cannot happen with a sane kernel. Without a size there is no next record:
			 * skip to the head rather than stop here for good. */
			st->malformed++;
			tail = head;
			break;
		}
		if (h.type == PERF_RECORD_SAMPLE) {
			uint32_t raw = 0;
			if (pos + h.size > size) {
				/* The record that wraps the end: make it contiguous. A call walks less
				 * than the ring, so there is one at most; it lives until finish(). */
				uint64_t first = size - pos;
				if (d->wrapped_used) {
					call->more = 1;
					break;
				}
				memcpy(d->wrapped, rec, first);
				memcpy(d->wrapped + first, data, h.size - first);
				rec = d->wrapped;
			}
			if (h.size >= 12)
				memcpy(&raw, rec + 8, 4);
			if (h.size < 12 || raw > h.size - 12U || raw < sizeof(struct mirror_event)) {
				st->malformed++;
			} else {
				uint16_t plen;
				memcpy(&plen, rec + 12 + offsetof(struct mirror_event, piece_len), 2);
				if (!room(d, plen)) {
					call->more = 1;
					break;
				}
				if (rec == d->wrapped)
					d->wrapped_used = 1;
				one_event(d, rec + 12, raw, st);
			}
		} else if (h.type == PERF_RECORD_LOST) {
			uint64_t lost = 0;
			/* u64 id, u64 lost; a LOST record is 8-aligned, 24 bytes: read it in place
			 * or across the wrap. */
			if (h.size >= 24) {
				uint8_t tmp[24];
				uint64_t first = size - pos < 24 ? size - pos : 24;
				memcpy(tmp, rec, first);
				memcpy(tmp + first, data, 24 - first);
				memcpy(&lost, tmp + 16, 8);
			}
			st->lost_samples += lost;
		}
		tail += h.size;
	}
	uint64_t used = finish(d, out, call, st);
	call->consumed = tail - start;
	/* Every read of the freed records (finish() copied the last) happens before this. */
	__atomic_store_n(&ctrl->data_tail, tail, __ATOMIC_RELEASE);
	return (int64_t)used;
}

/* md_perf_into() with the decoder's own output (md_out()). */
int64_t md_perf(struct md_decoder *d, struct perf_event_mmap_page *ctrl, const uint8_t *data,
		uint64_t size, uint64_t until, struct md_call *call, struct md_stats *st)
{
	return md_perf_into(d, d->out, ctrl, data, size, until, call, st);
}

/* Decodes a BPF ring buffer: `cons` its consumer page (consumer_pos first), `prod` its
 * producer page (producer_pos first), `data` its data area of `size` bytes (a power of two),
 * mapped twice in a row so no record wraps. Reads from consumer_pos to producer_pos (at most
 * to `until`), stopping at a record still being written, then stores the new consumer_pos.
 * Output as md_perf_into(). */
int64_t md_ringbuf_into(struct md_decoder *d, uint8_t *out, uint64_t *cons,
			const uint64_t *prod, const uint8_t *data, uint64_t size, uint64_t until,
			struct md_call *call, struct md_stats *st)
{
	const uint64_t mask = size - 1;
	uint64_t end = __atomic_load_n(prod, __ATOMIC_ACQUIRE);
	uint64_t pos = __atomic_load_n(cons, __ATOMIC_RELAXED); /* ours alone */
	const uint64_t start = pos;

	begin(d, call, st);
	call->head = end;
	call->pending = end - pos;
	end = clamp(pos, end, until);
	while (pos != end) {
		const uint8_t *rec = data + (pos & mask);
		uint32_t hdr = __atomic_load_n((const uint32_t *)rec, __ATOMIC_ACQUIRE);
		uint32_t len = hdr & ~(uint32_t)(BPF_RINGBUF_BUSY_BIT | BPF_RINGBUF_DISCARD_BIT);
		uint64_t step = ((uint64_t)len + BPF_RINGBUF_HDR_SZ + 7) & ~(uint64_t)7;

		if (hdr & BPF_RINGBUF_BUSY_BIT)
			break; /* still being written; the records after it wait for it */
		if (step > end - pos) { /* cannot happen with a sane kernel: skip it all */
			st->malformed++;
			pos = end;
			break;
		}
		if (hdr & BPF_RINGBUF_DISCARD_BIT) {
			st->discarded++;
		} else if (len < sizeof(struct mirror_event)) {
			st->malformed++;
		} else {
			const uint8_t *p = rec + BPF_RINGBUF_HDR_SZ;
			uint16_t plen;
			memcpy(&plen, p + offsetof(struct mirror_event, piece_len), 2);
			if (!room(d, plen)) {
				call->more = 1;
				break;
			}
			one_event(d, p, len, st);
		}
		pos += step;
	}
	uint64_t used = finish(d, out, call, st);
	call->consumed = pos - start;
	__atomic_store_n(cons, pos, __ATOMIC_RELEASE);
	return (int64_t)used;
}

/* md_ringbuf_into() with the decoder's own output (md_out()). */
int64_t md_ringbuf(struct md_decoder *d, uint64_t *cons, const uint64_t *prod,
		   const uint8_t *data, uint64_t size, uint64_t until, struct md_call *call,
		   struct md_stats *st)
{
	return md_ringbuf_into(d, d->out, cons, prod, data, size, until, call, st);
}
