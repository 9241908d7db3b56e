/* notify.c - sd_notify(3) over $NOTIFY_SOCKET without libsystemd
 * (READY=1, STOPPING=1, WATCHDOG=1 at half of WATCHDOG_USEC), the worker's
 * rate-limited state report (STATUS=cgipool ...), and the test delay, which
 * sleeps in slices so the watchdog keeps ticking. */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>


static int g_notify_fd = -1;
static struct sockaddr_un g_notify_addr;
static socklen_t g_notify_len;
static long long g_watchdog_ms, g_watchdog_next;

void notify_init(void)
{
    const char *s = getenv("NOTIFY_SOCKET");
    if (!s || (s[0] != '/' && s[0] != '@'))
        return;
    size_t n = strlen(s);
    if (n < 2 || n >= sizeof g_notify_addr.sun_path) {
        fprintf(stderr, "%s: NOTIFY_SOCKET too long, ignored\n", worker_name());
        return;
    }
    g_notify_addr.sun_family = AF_UNIX;
    memcpy(g_notify_addr.sun_path, s, n);
    if (s[0] == '@')
        g_notify_addr.sun_path[0] = '\0';
    g_notify_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n +
                               (s[0] == '/'));
    g_notify_fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (g_notify_fd < 0)
        perror("notify socket");
}

void notify(const char *msg)
{
    if (g_notify_fd < 0)
        return;
    ssize_t r;
    do {
        r = sendto(g_notify_fd, msg, strlen(msg), MSG_NOSIGNAL | MSG_DONTWAIT,
                   (struct sockaddr *)&g_notify_addr, g_notify_len);
    } while (r < 0 && errno == EINTR);
    /* Never block the worker on a full receiver queue: drop instead. */
    if (r < 0 && errno != EAGAIN)
        fprintf(stderr, "%s: sd_notify: %s\n", worker_name(), strerror(errno));
}

void watchdog_init(void)
{
    const char *us = getenv("WATCHDOG_USEC"), *pid = getenv("WATCHDOG_PID");
    if (!us || (pid && strtol(pid, NULL, 10) != (long)getpid()))
        return;
    unsigned long long v = strtoull(us, NULL, 10);
    if (v == 0)
        return;
    g_watchdog_ms = (long long)(v / 2000);
    if (g_watchdog_ms < 1)
        g_watchdog_ms = 1;
    g_watchdog_next = now_ms();
}

void watchdog_tick(void)
{
    if (g_watchdog_ms == 0 || now_ms() < g_watchdog_next)
        return;
    notify("WATCHDOG=1");
    g_watchdog_next = now_ms() + g_watchdog_ms;
}

long long watchdog_next(void) { return g_watchdog_ms ? g_watchdog_next : 0; }

void test_delay(unsigned long ms)
{
    long long end = now_ms() + (long long)ms;
    for (long long left; (left = end - now_ms()) > 0;) {
        if (g_watchdog_ms && left > g_watchdog_ms)
            left = g_watchdog_ms;
        struct timespec ts = {left / 1000, (left % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        watchdog_tick();
    }
}

/* "STATUS=" + the longest line: uri 1024, id 128, method 32, numbers. */
static char g_report[1400];
static int g_report_pending;
static long long g_report_last = -REPORT_INTERVAL_MS;
/* The request in flight, for the timer's handler, which formats and sends
 * its busy line: nothing is formatted for the requests (almost all) that
 * end within REPORT_INTERVAL_MS. g_busy_armed is set last and cleared
 * first, so the handler never sees a request half recorded. */
static const struct request *g_busy_req;
static unsigned long g_busy_served;
static long long g_busy_since;
static volatile sig_atomic_t g_busy_armed, g_busy_sent;

/* Appends s[0..n) at *o (bounded by cap); async-signal-safe. */
static void put(char *dst, size_t cap, size_t *o, const char *s, size_t n)
{
    for (size_t i = 0; i < n && *o + 1 < cap; i++)
        dst[(*o)++] = s[i];
}

static void put_num(char *dst, size_t cap, size_t *o, unsigned long long v)
{
    char d[24];
    size_t n = 0;
    do {
        d[sizeof d - 1 - n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v && n < sizeof d);
    put(dst, cap, o, d + sizeof d - n, n);
}

static void put_encoded(char *dst, size_t cap, size_t *o, const char *key,
                        struct slice v, size_t vcap, const char *empty)
{
    char enc[3 * 1024 + 1];
    if (vcap > sizeof enc)
        vcap = sizeof enc;
    size_t n = report_encode(enc, vcap, v.p, v.n);
    put(dst, cap, o, key, strlen(key));
    if (n)
        put(dst, cap, o, enc, n);
    else
        put(dst, cap, o, empty, strlen(empty));
}

/* "STATUS=cgipool requests=N busy since=MS method=M uri=U [id=I]". */
static size_t format_busy(char *dst, size_t cap)
{
    const struct request *r = g_busy_req;
    size_t o = 0;
    struct slice method = r->method;
    if (method.n > 32)
        method.n = 32;
    put(dst, cap, &o, "STATUS=cgipool requests=", 24);
    put_num(dst, cap, &o, g_busy_served);
    put(dst, cap, &o, " busy since=", 12);
    put_num(dst, cap, &o, (unsigned long long)g_busy_since);
    put_encoded(dst, cap, &o, " method=", method, 3 * 32 + 1, "-");
    put_encoded(dst, cap, &o, " uri=", r->target, 1024 + 1, "/");
    char id[128 + 1];
    size_t idn = report_encode(id, sizeof id, r->request_id.p, r->request_id.n);
    if (idn) {
        put(dst, cap, &o, " id=", 4);
        put(dst, cap, &o, id, idn);
    }
    dst[o] = '\0';
    return o;
}

static void on_report_timer(int sig)
{
    (void)sig;
    if (!g_busy_armed || g_notify_fd < 0)
        return;
    int saved = errno;
    char line[1400];
    size_t n = format_busy(line, sizeof line);
    /* sendto is async-signal-safe; never blocks (MSG_DONTWAIT). */
    if (sendto(g_notify_fd, line, n, MSG_NOSIGNAL | MSG_DONTWAIT,
               (struct sockaddr *)&g_notify_addr, g_notify_len) >= 0)
        g_busy_sent = 1;
    errno = saved;
}

void report_init(void)
{
    if (g_notify_fd < 0)
        return;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_report_timer;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
}

static void arm_timer(long ms)
{
    struct itimerval t;
    memset(&t, 0, sizeof t);
    t.it_value.tv_sec = ms / 1000;
    t.it_value.tv_usec = (ms % 1000) * 1000;
    setitimer(ITIMER_REAL, &t, NULL);
}

size_t report_encode(char *dst, size_t cap, const char *src, size_t n)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)src[i];
        size_t clen = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        if (clen > n - i)
            clen = n - i;
        size_t need = 0;
        for (size_t k = 0; k < clen; k++) {
            unsigned char b = (unsigned char)src[i + k];
            need += (b > ' ' && b <= '~' && b != '%') ? 1 : 3;
        }
        if (o + need + 1 > cap)
            break;
        for (size_t k = 0; k < clen; k++) {
            unsigned char b = (unsigned char)src[i + k];
            if (b > ' ' && b <= '~' && b != '%') {
                dst[o++] = (char)b;
            } else {
                dst[o++] = '%';
                dst[o++] = hex[b >> 4];
                dst[o++] = hex[b & 15];
            }
        }
        i += clen;
    }
    if (cap)
        dst[o < cap ? o : cap - 1] = '\0';
    return o;
}

void report_flush(void)
{
    if (!g_report_pending || g_notify_fd < 0)
        return;
    long long now = now_ms();
    if (now - g_report_last < REPORT_INTERVAL_MS)
        return;
    notify(g_report);
    g_report_last = now;
    g_report_pending = 0;
}

long long report_next(void)
{
    return g_report_pending && g_notify_fd >= 0
               ? g_report_last + REPORT_INTERVAL_MS
               : 0;
}

void report_idle(unsigned long served)
{
    if (g_notify_fd < 0)
        return;
    /* The timer stays armed: the next request re-arms it, and if none
     * comes it fires once, into a handler with nothing to do. */
    g_busy_armed = 0;
    atomic_signal_fence(memory_order_seq_cst);
    snprintf(g_report, sizeof g_report, "STATUS=cgipool requests=%lu idle",
             served);
    g_report_pending = 1;
    if (g_busy_sent) {
        /* The request was shown as current: say at once that it ended. */
        g_busy_sent = 0;
        g_report_last = -REPORT_INTERVAL_MS;
    }
    report_flush();
}

void report_busy(unsigned long served, const struct request *r)
{
    if (g_notify_fd < 0)
        return;
    g_busy_armed = 0;
    atomic_signal_fence(memory_order_seq_cst);
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    g_busy_since = (long long)wall.tv_sec * 1000 + wall.tv_nsec / 1000000;
    g_busy_served = served;
    g_busy_req = r;
    g_busy_sent = 0;
    atomic_signal_fence(memory_order_seq_cst);
    g_busy_armed = 1;
    arm_timer(REPORT_INTERVAL_MS);
}
