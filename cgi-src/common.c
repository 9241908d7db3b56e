/* common.c - see common.h. Worker identity, the JSON responses' helpers,
 * request logging, the listening socket (LISTEN_FDS or --listen) and
 * worker_main; the rest of the module is in http.c, buf.c, notify.c and
 * loop.c (internal.h says what they share). */
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ */
/* Worker identity, responses.                                         */

static char g_worker[72] = "worker@dev";
/* The worker never forks: its pid, read once (every JSON answer has it). */
static long g_pid;
static unsigned long g_delay_ms, g_slow_ms;
static int g_access_log = 1;

int access_log_on(void) { return g_access_log; }

unsigned long test_delay_ms(void) { return g_delay_ms; }

unsigned long test_slow_ms(void) { return g_slow_ms; }

const char *worker_name(void) { return g_worker; }

static void init_worker_name(const char *service)
{
    g_pid = (long)getpid();
    const char *w = getenv("CGIPOOL_WORKER");
    size_t n = w ? strlen(w) : 0;
    int ok = n > 0 && n < sizeof g_worker;
    for (size_t i = 0; ok && i < n; i++)
        ok = w[i] > 0x20 && w[i] < 0x7f;
    if (ok)
        memcpy(g_worker, w, n + 1);
    else
        snprintf(g_worker, sizeof g_worker, "%.60s@dev", service);
    if (w && !ok)
        fprintf(stderr, "%s: ignoring invalid CGIPOOL_WORKER\n", g_worker);
}

int path_matches(const struct request *req, const char *suffix)
{
    size_t n = strlen(suffix);
    return req->path.n >= n &&
           memcmp(req->path.p + req->path.n - n, suffix, n) == 0;
}

int method_is(const struct request *req, const char *m)
{
    if (slice_eq(req->method, m))
        return 1;
    return strcmp(m, "GET") == 0 && slice_eq(req->method, "HEAD");
}

void json_begin(struct response *res, int status)
{
    res->status = status;
    res->body.len = 0;
    res->body.overflow = 0;
    sb_puts(&res->body, "{\"worker\":");
    sb_json_str(&res->body, g_worker, strlen(g_worker));
    sb_printf(&res->body, ",\"pid\":%ld", g_pid);
}

void json_error(struct response *res, int status, const char *msg)
{
    json_begin(res, status);
    sb_printf(&res->body, ",\"status\":%d,\"error\":", status);
    sb_json_str(&res->body, msg, strlen(msg));
    sb_puts(&res->body, "}\n");
}

const char *http_reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 505: return "HTTP Version Not Supported";
    default: return "Internal Server Error";
    }
}

const char *error_text(int status)
{
    switch (status) {
    case 408: return "request timeout";
    case 413: return "body too large";
    case 414: return "request line too long";
    case 431: return "header block too large";
    case 501: return "transfer encoding not supported";
    case 505: return "HTTP version not supported";
    default: return "malformed request";
    }
}

/* ------------------------------------------------------------------ */
/* Time, logging.                                                      */

long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void write_stderr(const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

void log_request(const struct request *r, int status, double secs)
{
    char line[512];
    struct slice m = r->method.n ? r->method : (struct slice){"-", 1};
    struct slice p = r->path.n ? r->path : (struct slice){"-", 1};
    struct slice id = r->request_id.n ? r->request_id : (struct slice){"-", 1};
    int n = snprintf(line, sizeof line, "%s: %.*s %.*s %d %.3fms rid=%.*s\n",
                     g_worker, (int)min_sz(m.n, 16), m.p,
                     (int)min_sz(p.n, 200), p.p, status, secs * 1000.0,
                     (int)id.n, id.p);
    if (n > 0)
        write_stderr(line, min_sz((size_t)n, sizeof line - 1));
}
/* ------------------------------------------------------------------ */
/* Listening socket.                                                   */

static int activated_fd(void)
{
    const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
    if (!pid || !fds || strtol(pid, NULL, 10) != (long)getpid())
        return -1;
    long n = strtol(fds, NULL, 10);
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    if (n < 1)
        return -1;
    if (n > 1)
        fprintf(stderr, "%s: LISTEN_FDS=%ld, using fd 3 only\n", g_worker, n);
    return 3;
}

static int listen_unix(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    size_t n = strlen(path);
    if (n >= sizeof a.sun_path) {
        fprintf(stderr, "%s: socket path too long\n", g_worker);
        return -1;
    }
    memcpy(a.sun_path, path, n);
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
        listen(fd, 128) < 0) {
        fprintf(stderr, "%s: listen %s: %s\n", g_worker, path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

static int listen_addrinfo(const struct addrinfo *ai)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                    ai->ai_protocol);
    int one = 1;
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 128) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static int listen_tcp(const char *spec)
{
    char host[256];
    const char *colon = strrchr(spec, ':');
    if (!colon || (size_t)(colon - spec) >= sizeof host || !colon[1]) {
        fprintf(stderr, "%s: --listen wants PATH or HOST:PORT\n", g_worker);
        return -1;
    }
    size_t hl = (size_t)(colon - spec), skip = 0;
    if (hl >= 2 && spec[0] == '[' && spec[hl - 1] == ']')
        skip = 1; /* [v6addr]:port */
    memcpy(host, spec + skip, hl - 2 * skip);
    host[hl - 2 * skip] = '\0';
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(hl ? host : NULL, colon + 1, &hints, &res);
    if (rc) {
        fprintf(stderr, "%s: %s: %s\n", g_worker, spec, gai_strerror(rc));
        return -1;
    }
    int fd = -1;
    for (struct addrinfo *ai = res; ai && fd < 0; ai = ai->ai_next)
        fd = listen_addrinfo(ai);
    freeaddrinfo(res);
    if (fd < 0)
        fprintf(stderr, "%s: cannot listen on %s\n", g_worker, spec);
    return fd;
}

static int setup_listener(const char *spec)
{
    int fd = spec ? (strchr(spec, '/') ? listen_unix(spec) : listen_tcp(spec))
                  : activated_fd();
    if (fd < 0 && !spec)
        fprintf(stderr, "%s: no socket: need LISTEN_FDS or --listen\n",
                g_worker);
    if (fd < 0)
        return -1;
    int acc = 0;
    socklen_t al = sizeof acc;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &al) < 0 || !acc) {
        fprintf(stderr, "%s: fd %d is not a listening socket\n", g_worker, fd);
        return -1;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0 ||
        fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
        return -1;
    return fd;
}

/* ------------------------------------------------------------------ */
/* Startup.                                                            */

static int parse_ulong(const char *s, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v > max || s[0] == '-')
        return -1;
    *out = v;
    return 0;
}

static int usage(const char *prog)
{
    fprintf(stderr, "usage: %s [--listen PATH|HOST:PORT] [--max-requests N]\n"
            "Without --listen the socket comes from systemd (LISTEN_FDS).\n"
            "Environment: CGIPOOL_MAX_REQUESTS=N (the flag wins), "
            "CGIPOOL_ACCESS_LOG=0|1.\n",
            prog);
    return 2;
}

static int parse_args(int argc, char **argv, const char **listen_spec,
                      unsigned long *max_requests)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
            *listen_spec = argv[++i];
        } else if (strcmp(argv[i], "--max-requests") == 0 && i + 1 < argc) {
            if (parse_ulong(argv[++i], ULONG_MAX / 2, max_requests))
                return -1;
        } else {
            return -1;
        }
    }
    return 0;
}


static void init_delay(void)
{
    const char *d = getenv("CGIPOOL_TEST_DELAY_MS");
    if (d && *d && parse_ulong(d, 600000, &g_delay_ms))
        fprintf(stderr, "%s: bad CGIPOOL_TEST_DELAY_MS ignored\n", g_worker);
    const char *s = getenv("CGIPOOL_TEST_SLOW_MS");
    if (s && *s && parse_ulong(s, 600000, &g_slow_ms))
        fprintf(stderr, "%s: bad CGIPOOL_TEST_SLOW_MS ignored\n", g_worker);
}

/* The worker contract's environment (README "The worker contract"):
 * CGIPOOL_ACCESS_LOG=0|1 and CGIPOOL_MAX_REQUESTS=N (0 or empty: none). */
static int init_contract(unsigned long *max_requests)
{
    const char *a = getenv("CGIPOOL_ACCESS_LOG");
    if (a && strcmp(a, "0") == 0) {
        g_access_log = 0;
    } else if (a && strcmp(a, "1") != 0) {
        fprintf(stderr, "%s: CGIPOOL_ACCESS_LOG=%.20s: expected 0 or 1\n",
                g_worker, a);
        return -1;
    }
    const char *m = getenv("CGIPOOL_MAX_REQUESTS");
    if (m && *m && parse_ulong(m, ULONG_MAX / 2, max_requests)) {
        fprintf(stderr, "%s: CGIPOOL_MAX_REQUESTS=%.20s: expected a number\n",
                g_worker, m);
        return -1;
    }
    return 0;
}

int worker_main(int argc, char **argv, const struct service *svc)
{
    const char *spec = NULL;
    unsigned long max_requests = 0;
    init_worker_name(svc->name);
    if (init_contract(&max_requests))
        return 2;
    if (parse_args(argc, argv, &spec, &max_requests))
        return usage(argv[0]);
    setup_signals();
    init_delay();
    if (svc->init && svc->init() != 0)
        return 1;
    int lfd = setup_listener(spec);
    if (lfd < 0)
        return 1;
    notify_init();
    watchdog_init();
    notify("READY=1\nSTATUS=serving");
    fprintf(stderr, "%s: ready (pid %ld)\n", g_worker, g_pid);
    return run_loop(lfd, svc, max_requests);
}
