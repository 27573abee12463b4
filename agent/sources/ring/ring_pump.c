/* The native pump: a thread of its own that empties the kernel's rings into a bounded backlog
 * of decoded chunks, which Python takes when it can.
 *
 * Why a thread in C: a Python drain thread needs the GIL for every step between two C calls
 * (waking from poll, building Segments, the hand-off), so when the machine is busy it waits
 * for the GIL and then for a CPU, again and again, and the rings (16 MiB per CPU, ~32 ms at
 * 4 Gbit/s) overflow meanwhile. This thread never touches Python: once the scheduler runs it,
 * it drains. (Measured with the drain's own timings: the late drains spent 30-90 ms on the run
 * queue in their Python part while the C decode of 16 MiB took ~1 ms.)
 *
 * The loop is the Python drain's (drain.py): wait on the rings' epoll fd up to `interval`
 * after the last drain began (the kernel wakes it sooner when a ring passes its watermark);
 * pause while the backlog holds more than `budget` bytes (the kernel keeps the bytes
 * meanwhile and counts its own drops: the loss stays where it is counted exactly); then decode
 * every ring up to the producer position its first call saw, one chunk per decoder call.
 *
 * A chunk is one call's output (struct md_run headers, then payloads: ring_decode.c's
 * layout) in a buffer of md_out_size() bytes. A chunk less than half full is copied into one
 * of its own size, so the backlog's memory is at most about twice its payload. The budget
 * counts the memory the chunks hold (queued, or taken and not released yet).
 *
 * Released full-size buffers are kept for reuse while queued + taken + kept stays within the
 * budget, and all but MP_SPARE_IDLE are freed by a turn that finds no data. Freeing them at
 * once cost more than the decoding: glibc maps each 1 MiB buffer fresh, and the kernel faults
 * in and zeroes its 256 pages (measured at 4 Gbit/s: the thread's time was nearly all page
 * faults, md_perf_into ~1/40 of it).
 *
 * Threads: the pump thread produces; exactly one consumer thread calls md_pump_take() and
 * md_pump_release(); md_pump_stats() may be called from any thread. Everything shared is
 * under `lock`; the decoder and `work` (the decoder's running totals) belong to the pump
 * thread while it runs, and are published under the lock at the end of every turn.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>

#include "ring_decode.h"

#define MP_PERF 0
#define MP_RINGBUF 1
#define MP_MAX_RINGS 4096 /* more than any CPU count we run on: a sanity bound */
#define MP_SPARE_IDLE 4   /* full-size buffers kept for reuse after a turn with no data */

/* Set by md_pump_hold() (the memory guard, agent/mirror/memory_guard.py): while it is, every pump of
 * the process pauses as at its budget (the kernel keeps, and counts, what it cannot hold) and
 * gives its spare buffers back. Read at each turn and every interval while paused. */
static int mp_hold;

/* One ring, as pump.py passes it. perf: a = the perf_event_mmap_page, b = the data area;
 * ring buffer: a = the consumer page, b = the producer page, c = the (doubly mapped) data. */
struct mp_ring {
	uint64_t kind, a, b, c, size;
};

/* A taken chunk, as Python sees it (pump.py's _Chunk). */
struct mp_chunk_info {
	uint64_t buf, used, runs, payload, started_ns;
};

/* Counters (pump.py's _PumpStats). The hand-off counters mean what agent/mirror/handoff.py's do,
 * with bytes counted as payload; `held_bytes` is the memory the budget is checked against. */
struct mp_stats {
	struct md_stats dec;        /* the decoder's totals, as of the last turn */
	uint64_t items;             /* chunks published */
	uint64_t bytes;             /* payload bytes published */
	uint64_t taken_items, taken_bytes;
	uint64_t queued_items, peak_queued_bytes; /* payload published, not taken yet: peak */
	uint64_t held_bytes;        /* memory of the chunks queued or taken, not released */
	uint64_t pauses;            /* times a turn waited for the backlog to have room */
	uint64_t turns;             /* turns completed */
	uint64_t turn_started_ns;   /* CLOCK_MONOTONIC start of the latest completed turn */
	uint64_t beat_ns;           /* the latest turn's end, or the latest wait while paused */
	uint64_t gap_max_ns;        /* longest time between the starts of two turns */
	uint64_t ring_peak_bytes;   /* the most bytes a ring held when its drain began */
	uint64_t alloc_failed;      /* chunks that could not be allocated (the ring kept it) */
	uint64_t alive;             /* 1 while the thread runs */
};

struct chunk {
	struct chunk *next;
	uint64_t cap, used, payload;
	uint64_t started_ns; /* the start of the turn that made it */
	uint64_t prev_ns;    /* the start of the turn before: its records are newer than that */
	uint32_t runs;
	uint8_t buf[];
};

struct md_pump {
	struct md_decoder *d; /* not owned: native.py's decoder, lent while the thread runs */
	struct mp_ring *rings;
	uint32_t nrings;
	int epfd; /* < 0: no epoll, wake on the timer only (tests) */
	uint64_t interval_ns, budget, out_size;
	pthread_t thread;
	int joined;
	pthread_mutex_t lock;
	pthread_cond_t ready; /* consumer waits: a chunk, a new turn, or the thread's end */
	pthread_cond_t room;  /* pump waits: backlog under budget, or stop */
	int stop;
	struct chunk *head, *tail; /* published, in order */
	struct chunk *taken;       /* handed to the consumer, until md_pump_release() */
	struct chunk *spare;
	uint32_t nspare;
	uint64_t queued_bytes;  /* payload queued (for peak_queued_bytes) */
	uint64_t seen_turns;    /* turns when the consumer last took */
	struct md_stats work;   /* pump thread only: the decoder's totals, */
	uint64_t peak, alloc_failed; /* and these, published with them by end_turn() */
	struct mp_stats pub;
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Waits on `cond` until CLOCK_MONOTONIC `deadline_ns` (the conds are made with that clock). */
static void wait_until(pthread_cond_t *cond, pthread_mutex_t *lock, uint64_t deadline_ns)
{
	struct timespec ts = {.tv_sec = (time_t)(deadline_ns / 1000000000u),
			      .tv_nsec = (long)(deadline_ns % 1000000000u)};
	pthread_cond_timedwait(cond, lock, &ts);
}

/* Chunks: the memory the budget counts, header included. */
static uint64_t chunk_mem(const struct chunk *c)
{
	return sizeof(*c) + c->cap;
}

static struct chunk *chunk_get(struct md_pump *p)
{
	struct chunk *c;

	pthread_mutex_lock(&p->lock);
	c = p->spare;
	if (c) {
		p->spare = c->next;
		p->nspare--;
	}
	pthread_mutex_unlock(&p->lock);
	if (!c) {
		c = malloc(sizeof(*c) + p->out_size);
		if (!c)
			return NULL;
		c->cap = p->out_size;
	}
	c->next = NULL;
	return c;
}

/* Under the lock: keep a full-size buffer for reuse (within the budget), or free it. */
static void chunk_put_locked(struct md_pump *p, struct chunk *c)
{
	uint64_t kept = (uint64_t)(p->nspare + 1) * (sizeof(*c) + p->out_size);

	if (c->cap == p->out_size && p->pub.held_bytes + kept <= p->budget) {
		c->next = p->spare;
		p->spare = c;
		p->nspare++;
	} else {
		free(c);
	}
}

/* A copy of a chunk less than half full, sized to what it holds; `c` itself if not worth it
 * (or memory is short: then the full-size buffer goes on, counted at its size). */
static struct chunk *shrink(struct md_pump *p, struct chunk *c)
{
	struct chunk *s;

	if (c->used > c->cap / 2)
		return c;
	s = malloc(sizeof(*s) + c->used);
	if (!s)
		return c;
	memcpy(s, c, sizeof(*s));
	memcpy(s->buf, c->buf, c->used);
	s->cap = c->used;
	pthread_mutex_lock(&p->lock);
	chunk_put_locked(p, c);
	pthread_mutex_unlock(&p->lock);
	return s;
}

/* Hands one call's output to the consumer (or recycles an empty one). */
static void publish(struct md_pump *p, struct chunk *c, uint64_t used, uint32_t runs,
		    uint64_t started, uint64_t prev)
{
	if (!runs) {
		pthread_mutex_lock(&p->lock);
		chunk_put_locked(p, c);
		pthread_mutex_unlock(&p->lock);
		return;
	}
	c->used = used;
	c->runs = runs;
	c->payload = used - (uint64_t)runs * MD_RUN_SIZE;
	c->started_ns = started;
	c->prev_ns = prev;
	c = shrink(p, c);
	pthread_mutex_lock(&p->lock);
	if (p->tail)
		p->tail->next = c;
	else
		p->head = c;
	p->tail = c;
	p->pub.items++;
	p->pub.bytes += c->payload;
	p->pub.queued_items++;
	p->pub.held_bytes += chunk_mem(c);
	p->queued_bytes += c->payload;
	if (p->queued_bytes > p->pub.peak_queued_bytes)
		p->pub.peak_queued_bytes = p->queued_bytes;
	pthread_mutex_unlock(&p->lock);
}

/* Decodes one ring up to the producer position its first call saw, a chunk per call. */
static void drain_ring(struct md_pump *p, const struct mp_ring *r, uint64_t started,
		       uint64_t prev)
{
	uint64_t until = UINT64_MAX;
	struct md_call call;
	int first = 1;

	do {
		struct chunk *c = chunk_get(p);
		int64_t used;

		if (!c) { /* the ring keeps its bytes (and counts its drops); next turn retries */
			p->alloc_failed++;
			return;
		}
		if (r->kind == MP_PERF)
			used = md_perf_into(p->d, c->buf, (struct perf_event_mmap_page *)r->a,
					    (const uint8_t *)r->b, r->size, until, &call, &p->work);
		else
			used = md_ringbuf_into(p->d, c->buf, (uint64_t *)r->a, (const uint64_t *)r->b,
					       (const uint8_t *)r->c, r->size, until, &call,
					       &p->work);
		if (first) {
			until = call.head;
			first = 0;
			if (call.pending > p->peak)
				p->peak = call.pending;
		}
		publish(p, c, (uint64_t)used, call.runs, started, prev);
	} while (call.more);
}

/* Sleeps until `due`, or until a ring passes its watermark (epoll), or stop (no epoll). */
static void wait_turn(struct md_pump *p, uint64_t due)
{
	uint64_t now = now_ns();

	if (now >= due)
		return;
	if (p->epfd >= 0) {
		struct epoll_event ev[8];
		int ms = (int)((due - now + 999999) / 1000000);
		epoll_wait(p->epfd, ev, 8, ms); /* EINTR or an error: just drain a turn early */
		return;
	}
	pthread_mutex_lock(&p->lock);
	if (!p->stop)
		wait_until(&p->room, &p->lock, due);
	pthread_mutex_unlock(&p->lock);
}

/* Under the lock: the spare buffers beyond `keep` go back (after a turn that found no data:
 * all but a few; while held: all). */
static void trim_spares_locked(struct md_pump *p, uint32_t keep)
{
	while (p->nspare > keep) {
		struct chunk *c = p->spare;
		p->spare = c->next;
		p->nspare--;
		free(c);
	}
}

static int held(void)
{
	return __atomic_load_n(&mp_hold, __ATOMIC_RELAXED);
}

/* Waits while the backlog is over budget or the pumps are held (beating every interval); 0
 * if stopping. */
static int wait_room(struct md_pump *p)
{
	int pausing = 0, go;

	pthread_mutex_lock(&p->lock);
	while (!p->stop && (p->pub.held_bytes > p->budget || held())) {
		if (!pausing)
			p->pub.pauses++;
		pausing = 1;
		if (held())
			trim_spares_locked(p, 0);
		wait_until(&p->room, &p->lock, now_ns() + p->interval_ns);
		p->pub.beat_ns = now_ns();
	}
	go = !p->stop;
	pthread_mutex_unlock(&p->lock);
	return go;
}

/* Under the lock: what only the pump thread writes, made visible. */
static void publish_work_locked(struct md_pump *p)
{
	p->pub.dec = p->work;
	p->pub.ring_peak_bytes = p->peak;
	p->pub.alloc_failed = p->alloc_failed;
}

static void end_turn(struct md_pump *p, uint64_t started, uint64_t last, uint64_t items)
{
	pthread_mutex_lock(&p->lock);
	if (p->pub.items == items)
		trim_spares_locked(p, MP_SPARE_IDLE);
	publish_work_locked(p);
	p->pub.turns++;
	p->pub.turn_started_ns = started;
	p->pub.beat_ns = now_ns();
	if (started - last > p->pub.gap_max_ns)
		p->pub.gap_max_ns = started - last;
	pthread_cond_signal(&p->ready); /* one consumer: a turn's chunks go out together */
	pthread_mutex_unlock(&p->lock);
}

static void *pump_main(void *arg)
{
	struct md_pump *p = arg;
	uint64_t last = now_ns();

	pthread_setname_np(pthread_self(), "ring-drain"); /* as top -H and ps -L show it */
	for (;;) {
		wait_turn(p, last + p->interval_ns);
		if (!wait_room(p))
			break;
		uint64_t started = now_ns(), items = p->pub.items; /* only this thread writes it */
		for (uint32_t i = 0; i < p->nrings; i++)
			drain_ring(p, &p->rings[i], started, last);
		end_turn(p, started, last, items);
		last = started;
	}
	pthread_mutex_lock(&p->lock);
	publish_work_locked(p);
	p->pub.alive = 0;
	pthread_cond_broadcast(&p->ready);
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

static int valid_rings(const struct mp_ring *rings, uint32_t n)
{
	if (!n || n > MP_MAX_RINGS)
		return 0;
	for (uint32_t i = 0; i < n; i++) {
		const struct mp_ring *r = &rings[i];
		if ((r->kind != MP_PERF && r->kind != MP_RINGBUF) || !r->size ||
		    (r->size & (r->size - 1)) || !r->a || !r->b || (r->kind == MP_RINGBUF && !r->c))
			return 0;
	}
	return 1;
}

static int init_sync(struct md_pump *p)
{
	pthread_condattr_t ca;

	if (pthread_condattr_init(&ca))
		return -1;
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	int bad = pthread_mutex_init(&p->lock, NULL) || pthread_cond_init(&p->ready, &ca) ||
		  pthread_cond_init(&p->room, &ca);
	pthread_condattr_destroy(&ca);
	return bad ? -1 : 0;
}

/* Starts a pump over `nrings` rings with decoder `d` (lent until md_pump_stop()), whose
 * running totals start at `init`. `epfd`: an epoll fd the rings' fds are registered in, or
 * -1. NULL (errno set) if the arguments are unusable, memory is short or no thread starts. */
struct md_pump *md_pump_start(struct md_decoder *d, const struct mp_ring *rings,
			      uint32_t nrings, int epfd, uint64_t interval_ns, uint64_t budget,
			      const struct md_stats *init)
{
	struct md_pump *p;
	sigset_t all, old;

	if (!d || !valid_rings(rings, nrings) || !interval_ns) {
		errno = EINVAL;
		return NULL;
	}
	p = calloc(1, sizeof(*p));
	if (!p)
		return NULL;
	p->rings = malloc((size_t)nrings * sizeof(*rings));
	if (!p->rings || init_sync(p)) {
		free(p->rings);
		free(p);
		errno = ENOMEM;
		return NULL;
	}
	memcpy(p->rings, rings, (size_t)nrings * sizeof(*rings));
	p->d = d;
	p->nrings = nrings;
	p->epfd = epfd;
	p->interval_ns = interval_ns;
	p->budget = budget;
	p->out_size = md_out_size(d);
	p->work = *init;
	p->pub.dec = *init;
	p->pub.alive = 1;
	p->pub.beat_ns = now_ns();
	/* Signals go to Python's threads, never this one (it could not run their handlers). */
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int err = pthread_create(&p->thread, NULL, pump_main, p);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (err) {
		pthread_mutex_destroy(&p->lock);
		pthread_cond_destroy(&p->ready);
		pthread_cond_destroy(&p->room);
		free(p->rings);
		free(p);
		errno = err;
		return NULL;
	}
	return p;
}

/* Under the lock: gives the taken chunks back (their memory leaves the budget). */
static void release_locked(struct md_pump *p)
{
	while (p->taken) {
		struct chunk *c = p->taken;
		p->taken = c->next;
		p->pub.held_bytes -= chunk_mem(c);
		chunk_put_locked(p, c);
	}
	pthread_cond_signal(&p->room);
}

/* Under the lock: is the oldest chunk from a completed turn? Only those are handed out: a
 * turn's runs then reach Python together (a direction's run cut by a take in mid-turn would
 * be two Segments for the reassembler to join, the later one held back by the reorderer). */
static int ready_locked(const struct md_pump *p)
{
	return p->head && p->head->started_ns <= p->pub.turn_started_ns;
}

/* The consumer: waits up to `timeout_ns` for a completed turn (or the thread's end), then
 * hands out up to `max` chunks of completed turns, in order (valid until md_pump_release()
 * or the next take). *turn_started: the start of the latest completed turn (0: none yet),
 * the time the consumer may release records up to (less its reorder window); if `max` left
 * chunks waiting, the start of the turn before theirs, since their records are newer. */
uint32_t md_pump_take(struct md_pump *p, uint64_t timeout_ns, struct mp_chunk_info *out,
		      uint32_t max, uint64_t *turn_started)
{
	uint64_t deadline = now_ns() + timeout_ns;
	uint32_t n = 0;
	struct chunk **link = &p->taken;

	pthread_mutex_lock(&p->lock);
	release_locked(p);
	while (!ready_locked(p) && p->seen_turns == p->pub.turns && p->pub.alive &&
	       now_ns() < deadline)
		wait_until(&p->ready, &p->lock, deadline);
	p->seen_turns = p->pub.turns;
	while (ready_locked(p) && n < max) {
		struct chunk *c = p->head;
		p->head = c->next;
		if (!p->head)
			p->tail = NULL;
		c->next = NULL;
		*link = c;
		link = &c->next;
		out[n++] = (struct mp_chunk_info){(uint64_t)(uintptr_t)c->buf, c->used, c->runs,
						  c->payload, c->started_ns};
		p->pub.taken_items++;
		p->pub.taken_bytes += c->payload;
		p->pub.queued_items--;
		p->queued_bytes -= c->payload;
	}
	*turn_started = ready_locked(p) ? p->head->prev_ns : p->pub.turn_started_ns;
	pthread_mutex_unlock(&p->lock);
	return n;
}

/* The consumer is done with what it took: those chunks are recycled. */
void md_pump_release(struct md_pump *p)
{
	pthread_mutex_lock(&p->lock);
	release_locked(p);
	pthread_mutex_unlock(&p->lock);
}

/* A consistent copy of the counters. */
void md_pump_stats(struct md_pump *p, struct mp_stats *out)
{
	pthread_mutex_lock(&p->lock);
	*out = p->pub;
	pthread_mutex_unlock(&p->lock);
}

/* Every pump of the process pauses (`on` non-zero) or goes on (0) from its next turn; see
 * mp_hold. */
void md_pump_hold(int on)
{
	__atomic_store_n(&mp_hold, on ? 1 : 0, __ATOMIC_RELAXED);
}

/* Stops the thread and joins it (within about one interval); the decoder is the caller's
 * again. What was published and not taken stays takeable. */
void md_pump_stop(struct md_pump *p)
{
	if (p->joined)
		return;
	pthread_mutex_lock(&p->lock);
	p->stop = 1;
	pthread_cond_broadcast(&p->room);
	pthread_mutex_unlock(&p->lock);
	pthread_join(p->thread, NULL);
	p->joined = 1;
}

static void free_list(struct chunk *c)
{
	while (c) {
		struct chunk *next = c->next;
		free(c);
		c = next;
	}
}

/* Stops the pump if it runs and frees everything it holds. */
void md_pump_free(struct md_pump *p)
{
	if (!p)
		return;
	md_pump_stop(p);
	free_list(p->head);
	free_list(p->taken);
	free_list(p->spare);
	pthread_mutex_destroy(&p->lock);
	pthread_cond_destroy(&p->ready);
	pthread_cond_destroy(&p->room);
	free(p->rings);
	free(p);
}
