/* What ring_decode.c (the decoder) and ring_pump.c (the thread that runs it) share, and
 * what agent/sources/ring/native.py and pump.py mirror with ctypes. */
#ifndef RING_DECODE_H
#define RING_DECODE_H

#include <linux/perf_event.h>
#include <stdint.h>

#define MD_RUN_SIZE 72 /* sizeof(struct md_run) in ring_decode.c: native.py's RUN */

/* Running totals, owned by the caller (native.py's _Stats mirrors it). */
struct md_stats {
	uint64_t events;       /* mirror_event records decoded */
	uint64_t coalesced;    /* records joined to an earlier record's run */
	uint64_t lost_samples; /* perf: samples the kernel could not write (LOST records) */
	uint64_t discarded;    /* ring buffer: records the producer discarded */
	uint64_t no_slot;      /* runs that could not be joined: no table slot in MD_PROBES */
	uint64_t malformed;    /* records too short for what they claim; ring bytes skipped */
	uint64_t runs;         /* runs handed out */
	uint64_t calls;        /* decode calls */
	uint64_t bounded;      /* calls that stopped at max_events or out_size */
};

/* What one call did. */
struct md_call {
	uint64_t head;     /* the producer position read (the `until` of a follow-up call) */
	uint64_t pending;  /* producer - consumer position when read: bytes waiting */
	uint64_t consumed; /* bytes released to the kernel */
	uint64_t out_used; /* bytes of runs in the output */
	uint32_t runs;
	uint32_t more; /* 1: stopped at a bound before the end; call again */
};

struct md_decoder;

uint64_t md_out_size(const struct md_decoder *d);
int64_t md_perf_into(struct md_decoder *d, uint8_t *out, struct perf_event_mmap_page *ctrl,
		     const uint8_t *data, uint64_t size, uint64_t until, struct md_call *call,
		     struct md_stats *st);
int64_t md_ringbuf_into(struct md_decoder *d, uint8_t *out, uint64_t *cons,
			const uint64_t *prod, const uint8_t *data, uint64_t size, uint64_t until,
			struct md_call *call, struct md_stats *st);

#endif
