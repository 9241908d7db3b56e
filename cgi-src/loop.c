/* loop.c - the worker's event loop: one poll() over the listening socket
 * and up to 64 keep-alive connections, requests parsed as their bytes
 * arrive (a head has 5 s, then 408; idle connections 10 s), served one at a
 * time, responses sent with a 5 s bound; after SIGTERM/SIGINT (blocked
 * outside ppoll) the worker accepts nothing more, answers what comes on the
 * connections it owns with "Connection: close" and ends when their peers
 * have closed them (see drain()).
 *
 * A new connection is accepted only when the worker is free: in a round
 * that served nothing and with no request buffered on a connection it
 * owns. Then it accepts one and serves its request at once if it is
 * already there. So several workers can share one listening socket
 * (systemd's Sockets=): a connection waits in the kernel's queue for any
 * free worker, never behind a request in a busy one; an accept another
 * worker won (EAGAIN) is silent, and the next ppoll blocks again.
 *
 * A kept connection is given back when the queue has a connection waiting:
 * the response that ends a request answers "Connection: close" if the
 * listening socket is readable at that moment (see queue_waiting()), so a
 * worker whose kept connections always hold a request still becomes free
 * and takes from the queue; without a queue, connections stay kept. */
#include "internal.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* Connections and the event loop.                                     */

#define MAX_CONNS 64
#define IDLE_TIMEOUT_MS 10000
#define READ_TIMEOUT_MS 5000
#define WRITE_TIMEOUT_MS 5000
#define MAX_REQS_PER_CONN 1000
#define INITIAL_BUF 4096
#define BODY_CAP (256u * 1024u)

struct conn {
    int fd;
    char *buf;
    size_t len, cap;
    unsigned nreq;
    int eof;
    int ready;    /* buffered bytes may hold a complete request */
    long long idle_since, req_since;
};

static struct conn g_conns[MAX_CONNS];
static int g_nconns;
static volatile sig_atomic_t g_stop;
static unsigned long g_max_requests, g_served;
static int g_lfd = -1;
static const struct service *g_svc;
static char g_body_mem[BODY_CAP];
static char g_out_mem[BODY_CAP + 1024];

/* SIGTERM/SIGINT are blocked outside ppoll(); see if one is waiting. */
static int stop_pending(void)
{
    sigset_t set;
    if (g_stop)
        return 1;
    if (sigpending(&set) < 0)
        return 0;
    return sigismember(&set, SIGTERM) == 1 || sigismember(&set, SIGINT) == 1;
}

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static void conn_close(struct conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    free(c->buf);
    c->fd = -1;
    c->buf = NULL;
    c->len = c->cap = 0;
}

static int send_all(int fd, const char *p, size_t n)
{
    long long deadline = now_ms() + WRITE_TIMEOUT_MS;
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
            return -1;
        long long left = deadline - now_ms();
        struct pollfd pfd = {fd, POLLOUT, 0};
        if (left <= 0 || (poll(&pfd, 1, (int)left) < 0 && errno != EINTR))
            return -1;
    }
    return 0;
}

/* Serialize and send; returns 0 if the connection may be kept. */
static int send_response(struct conn *c, const struct request *req,
                         struct response *res, int keep)
{
    if (res->body.overflow)
        json_error(res, 500, "response too large");
    struct sbuf out = {g_out_mem, 0, sizeof g_out_mem, 0};
    sb_printf(&out, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
              "Content-Length: %zu\r\nX-Cgipool-Worker: %s\r\n",
              res->status, http_reason(res->status), res->body.len, worker_name());
    if (req->request_id.n)
        sb_printf(&out, "X-Request-ID: %.*s\r\n", (int)req->request_id.n,
                  req->request_id.p);
    if (res->allow)
        sb_printf(&out, "Allow: %s\r\n", res->allow);
    sb_printf(&out, "Connection: %s\r\n\r\n", keep ? "keep-alive" : "close");
    if (!slice_eq(req->method, "HEAD"))
        sb_put(&out, res->body.p, res->body.len);
    if (out.overflow)
        return -1;
    return send_all(c->fd, out.p, out.len) == 0 && keep ? 0 : -1;
}

static void init_response(struct response *res)
{
    res->status = 500;
    res->allow = NULL;
    res->body = (struct sbuf){g_body_mem, 0, sizeof g_body_mem, 0};
}

/* Test-only knob, off unless set: /healthz answers 503 while the file
 * $CGIPOOL_TEST_HEALTH_DIR/<worker> exists (probe tests of cgipool watch). */
static int test_unhealthy(void)
{
    const char *dir = getenv("CGIPOOL_TEST_HEALTH_DIR");
    if (!dir || !*dir)
        return 0;
    char path[256];
    int n = snprintf(path, sizeof path, "%s/%s", dir, worker_name());
    return n > 0 && (size_t)n < sizeof path && access(path, F_OK) == 0;
}

/* Whether the query has `word` as one of its &-separated parts. */
static int query_has(const struct request *req, const char *word)
{
    if (req->query.n == 0)
        return 0;
    size_t n = strlen(word);
    const char *p = req->query.p, *end = p + req->query.n;
    for (;;) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *e = amp ? amp : end;
        if ((size_t)(e - p) == n && memcmp(p, word, n) == 0)
            return 1;
        if (!amp)
            return 0;
        p = amp + 1;
    }
}

static void dispatch(const struct request *req, struct response *res)
{
    if (test_delay_ms())
        test_delay(test_delay_ms());
    if (test_slow_ms() && query_has(req, "slow"))
        test_delay(test_slow_ms());
    if (!path_matches(req, "/healthz")) {
        g_svc->handle(req, res);
    } else if (!method_is(req, "GET")) {
        json_error(res, 405, "method not allowed");
        res->allow = "GET, HEAD";
    } else if (test_unhealthy()) {
        json_error(res, 503, "unhealthy (test knob)");
    } else {
        json_begin(res, 200);
        sb_puts(&res->body, ",\"status\":\"ok\"}\n");
    }
}

/* Whether a connection waits in the listening socket's queue. nginx opens
 * a connection beyond the ones it keeps only when all of those are busy; if
 * this worker kept serving its own, that one could wait for seconds at
 * saturation (the pool's other workers just as busy). Answering the current
 * request with "Connection: close" instead is race-free: nginx sends no
 * further request on a connection whose response said close. */
static int queue_waiting(void)
{
    struct pollfd pfd = {g_lfd, POLLIN, 0};
    return g_lfd >= 0 && poll(&pfd, 1, 0) > 0 && (pfd.revents & POLLIN);
}

/* Serve one complete request; returns 0 to keep the connection. */
static int serve(struct conn *c, const struct request *req)
{
    double t0 = now_s();
    struct response res;
    init_response(&res);
    report_busy(g_served, req);
    dispatch(req, &res);
    g_served++;
    report_idle(g_served);
    c->nreq++;
    int keep = req->keep_alive && !c->eof && !stop_pending() &&
               c->nreq < MAX_REQS_PER_CONN &&
               (g_max_requests == 0 || g_served < g_max_requests) &&
               !queue_waiting();
    int rc = send_response(c, req, &res, keep);
    if (access_log_on() || res.status >= 500)
        log_request(req, res.status, now_s() - t0);
    return rc;
}

static void reject(struct conn *c, int status)
{
    struct request req;
    memset(&req, 0, sizeof req);
    struct response res;
    init_response(&res);
    json_error(&res, status, error_text(status));
    send_response(c, &req, &res, 0);
    log_request(&req, status, 0.0);
}

static void consume(struct conn *c, size_t n)
{
    memmove(c->buf, c->buf + n, c->len - n);
    c->len -= n;
    c->ready = c->len > 0;
    c->idle_since = c->req_since = now_ms();
    if (c->len == 0 && c->cap > INITIAL_BUF) {
        free(c->buf);
        c->buf = NULL;
        c->cap = 0;
    }
}

/* Try to parse and serve one buffered request.  Returns 1 if a request
 * was served and the connection stays, 0 if more input is needed, -1 if
 * the connection must be closed. */
static int try_request(struct conn *c)
{
    c->ready = 0;
    if (c->len == 0)
        return c->eof ? -1 : 0;
    int hdr_done = memmem(c->buf, min_sz(c->len, HTTP_MAX_LINE + HTTP_MAX_HEADERS),
                          "\r\n\r\n", 4) != NULL;
    if (!hdr_done && c->len < HTTP_MAX_LINE && !c->eof)
        return 0;
    struct request req;
    long n = http_parse(c->buf, c->len, &req);
    if (n < 0) {
        reject(c, (int)-n);
        return -1;
    }
    if (n == 0) {
        if (c->eof && c->len > 0)
            reject(c, 400);
        return c->eof ? -1 : 0;
    }
    int rc = serve(c, &req);
    consume(c, (size_t)n);
    return rc == 0 ? 1 : -1;
}

static int grow(struct conn *c)
{
    if (c->len < c->cap)
        return 0;
    if (c->cap >= HTTP_MAX_REQUEST)
        return -1;
    size_t ncap = c->cap ? c->cap * 2 : INITIAL_BUF;
    if (ncap > HTTP_MAX_REQUEST)
        ncap = HTTP_MAX_REQUEST;
    char *nb = realloc(c->buf, ncap);
    if (!nb)
        return -1;
    c->buf = nb;
    c->cap = ncap;
    return 0;
}

/* Read what is available.  Returns -1 on a hard error. */
static int read_some(struct conn *c)
{
    if (grow(c))
        return -1;
    ssize_t r;
    do {
        r = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
    if (r == 0) {
        c->eof = 1;
        return 0;
    }
    if (c->len == 0)
        c->req_since = now_ms();
    c->len += (size_t)r;
    return 0;
}

/* Handle readiness on one connection; returns -1 to close it. */
static int conn_event(struct conn *c, short revents)
{
    if (revents & (POLLIN | POLLHUP | POLLERR)) {
        if (read_some(c))
            return -1;
    }
    int rc = try_request(c);
    return rc < 0 ? -1 : 0;
}

/* Accepts one connection (if another worker sharing the socket did not
 * take it first) and serves its request if it already arrived; returns 1
 * when the connection was closed again (the caller compacts). */
static int accept_one(int lfd)
{
    if (g_nconns >= MAX_CONNS)
        return 0;
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
            errno != ECONNABORTED)
            fprintf(stderr, "%s: accept: %s\n", worker_name(), strerror(errno));
        return 0;
    }
    struct conn *c = &g_conns[g_nconns++];
    memset(c, 0, sizeof *c);
    c->fd = fd;
    c->idle_since = c->req_since = now_ms();
    if (conn_event(c, POLLIN)) {
        conn_close(c);
        return 1;
    }
    return 0;
}

/* Whether a request may already be buffered on an owned connection. */
static int any_ready(void)
{
    for (int i = 0; i < g_nconns; i++)
        if (g_conns[i].ready)
            return 1;
    return 0;
}

static void compact(void)
{
    int j = 0;
    for (int i = 0; i < g_nconns; i++)
        if (g_conns[i].fd >= 0)
            g_conns[j++] = g_conns[i];
    g_nconns = j;
}

static int conn_expired(struct conn *c, long long now)
{
    if (c->len > 0 && now - c->req_since >= READ_TIMEOUT_MS) {
        reject(c, 408);
        return 1;
    }
    return c->len == 0 && now - c->idle_since >= IDLE_TIMEOUT_MS;
}

static void expire(void)
{
    long long now = now_ms();
    for (int i = 0; i < g_nconns; i++)
        if (conn_expired(&g_conns[i], now))
            conn_close(&g_conns[i]);
    compact();
}

static int poll_timeout(void)
{
    long long now = now_ms(), next = now + 1000;
    for (int i = 0; i < g_nconns; i++) {
        const struct conn *c = &g_conns[i];
        long long d = c->len ? c->req_since + READ_TIMEOUT_MS
                             : c->idle_since + IDLE_TIMEOUT_MS;
        if (c->ready)
            d = now;
        if (d < next)
            next = d;
    }
    long long wd = watchdog_next();
    if (wd && wd < next)
        next = wd;
    long long rep = report_next();
    if (rep && rep < next)
        next = rep;
    return next <= now ? 0 : (int)(next - now);
}

/* A SIGTERM that came while serving stays pending until the next ppoll,
 * which does not deliver it when a descriptor is ready at once: ask the
 * kernel, so a stopping worker never accepts again. */
static int done(void)
{
    return stop_pending() || (g_max_requests && g_served >= g_max_requests);
}

static void loop_once(int lfd, const sigset_t *unblocked)
{
    struct pollfd pfds[MAX_CONNS + 1];
    int n = g_nconns;
    for (int i = 0; i < n; i++)
        pfds[i] = (struct pollfd){g_conns[i].fd, POLLIN, 0};
    pfds[n] = (struct pollfd){lfd, g_nconns < MAX_CONNS ? POLLIN : 0, 0};
    int ms = poll_timeout();
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    if (ppoll(pfds, (nfds_t)n + 1, &ts, unblocked) < 0 && errno != EINTR) {
        perror("ppoll");
        g_stop = 1;
        return;
    }
    watchdog_tick();
    report_flush();
    unsigned long before = g_served;
    for (int i = 0; i < n; i++)
        if ((pfds[i].revents || g_conns[i].ready) && !done() &&
            conn_event(&g_conns[i], pfds[i].revents))
            conn_close(&g_conns[i]);
    compact();
    /* Free only if this round served nothing: what arrived on owned
     * connections meanwhile comes first (the next ppoll sees it). */
    if (pfds[n].revents & POLLIN && !done() && g_served == before &&
        !any_ready() && accept_one(lfd))
        compact();
    expire();
}

/* After SIGTERM / max requests: accept nothing more, answer every request
 * on a connection this worker owns with "Connection: close", and leave the
 * idle ones to their peer. nginx drops an idle kept connection after its
 * keepalive_timeout (5 s, below IDLE_TIMEOUT_MS); a worker that closed one
 * itself could meet a request nginx had just sent on it, which nginx may not
 * retry (a POST fails). Ends when no connection is left; the read and idle
 * timeouts bound it. */
static void drain(const sigset_t *unblocked)
{
    while (g_nconns > 0) {
        struct pollfd pfds[MAX_CONNS];
        int n = g_nconns;
        for (int i = 0; i < n; i++)
            pfds[i] = (struct pollfd){g_conns[i].fd, POLLIN, 0};
        int ms = poll_timeout();
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        if (ppoll(pfds, (nfds_t)n, &ts, unblocked) < 0 && errno != EINTR) {
            perror("ppoll");
            break;
        }
        watchdog_tick();
        report_flush();
        for (int i = 0; i < n; i++)
            if ((pfds[i].revents || g_conns[i].ready) &&
                conn_event(&g_conns[i], pfds[i].revents))
                conn_close(&g_conns[i]);
        compact();
        expire();
    }
    for (int i = 0; i < g_nconns; i++)
        conn_close(&g_conns[i]);
    g_nconns = 0;
}

int run_loop(int lfd, const struct service *svc, unsigned long max_requests)
{
    g_svc = svc;
    g_max_requests = max_requests;
    g_lfd = lfd;
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &old);
    report_init();
    report_idle(0);
    while (!done())
        loop_once(lfd, &old);
    notify("STOPPING=1\nSTATUS=draining");
    drain(&old);
    fprintf(stderr, "%s: exiting after %lu requests\n", worker_name(), g_served);
    return 0;
}


void setup_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
}
