/* internal.h - what the C files of common.h's module share among
 * themselves (not for services): time, logging, status texts, the watchdog
 * and the event loop's entry points.
 *
 *   http.c    request parsing, URL/form decoding
 *   buf.c     output buffers, JSON escaping
 *   notify.c  sd_notify, the watchdog, the test delay
 *   loop.c    connections and the poll loop, signals
 *   common.c  worker identity, responses, logging, listening socket, startup
 */
#ifndef CGIPOOL_INTERNAL_H
#define CGIPOOL_INTERNAL_H

#include "common.h"

#include <stddef.h>

static inline size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

/* common.c */
long long now_ms(void);
double now_s(void);
void log_request(const struct request *r, int status, double secs);
/* CGIPOOL_ACCESS_LOG: 1 (or unset) logs every request, 0 only errors. */
int access_log_on(void);
const char *http_reason(int status);
const char *error_text(int status);
/* Test-only knobs, off unless set: every request takes
 * CGIPOOL_TEST_DELAY_MS; one whose query has the word "slow" (as in
 * `?q=x&slow`) CGIPOOL_TEST_SLOW_MS (the bench's mixed load). */
unsigned long test_delay_ms(void);
unsigned long test_slow_ms(void);

/* notify.c */
void notify_init(void);
void watchdog_init(void);
void watchdog_tick(void);
/* When the next WATCHDOG=1 is due (now_ms() clock), or 0 if off. */
long long watchdog_next(void);
/* Sleeps ms, in slices so the watchdog keeps ticking. */
void test_delay(unsigned long ms);
/* The worker contract's state report, `STATUS=cgipool requests=N idle` or
 * `... busy since=MS method=M uri=U [id=I]` (README "The worker contract").
 * A request is reported busy only once it has run REPORT_INTERVAL_MS (a
 * one-shot SIGALRM timer sends the line prepared at its start), and then
 * idle as soon as it ends; otherwise the request count goes out at most
 * once per REPORT_INTERVAL_MS (a newer count replaces one held back, which
 * report_flush() sends from the poll loop once the interval has passed). */
#define REPORT_INTERVAL_MS 1000
void report_init(void);
void report_busy(unsigned long served, const struct request *r);
void report_idle(unsigned long served);
void report_flush(void);
/* When a held-back report is due (now_ms() clock), or 0 if none. */
long long report_next(void);
/* Percent-encodes src[0..n) into dst (NUL-terminated, at most cap-1
 * bytes): bytes outside '!'..'~', and '%', as %XX; cut between UTF-8
 * characters. Returns the encoded length. */
size_t report_encode(char *dst, size_t cap, const char *src, size_t n);

/* loop.c */
void setup_signals(void);
/* Serves until SIGTERM or max_requests (0 = no limit); returns the exit
 * status. */
int run_loop(int lfd, const struct service *svc, unsigned long max_requests);

#endif
