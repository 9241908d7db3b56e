/* common.c - see common.h. */
#include "common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define NOT_FOUND ((size_t)-1)

/* ------------------------------------------------------------------ */
/* Small character helpers (locale independent).                       */

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int is_alpha(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static unsigned char to_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static int hex_val(unsigned char c)
{
    if (is_digit(c))
        return c - '0';
    c = to_lower(c);
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

static int is_tchar(unsigned char c)
{
    static const char extra[] = "!#$%&'*+-.^_`|~";
    if (is_digit(c) || is_alpha(c))
        return 1;
    return c != 0 && memchr(extra, c, sizeof extra - 1) != NULL;
}

/* Header field value byte: HTAB, visible ASCII, SP, obs-text. */
static int is_vchar_ws(unsigned char c)
{
    return c == '\t' || (c >= 0x20 && c != 0x7f);
}

static int ieq(struct slice s, const char *lit)
{
    size_t n = strlen(lit);
    if (s.n != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (to_lower((unsigned char)s.p[i]) != to_lower((unsigned char)lit[i]))
            return 0;
    return 1;
}

int slice_eq(struct slice s, const char *lit)
{
    size_t n = strlen(lit);
    return s.n == n && memcmp(s.p, lit, n) == 0;
}

static size_t find_crlf(const char *b, size_t from, size_t to)
{
    for (size_t i = from; i + 1 < to; i++)
        if (b[i] == '\r' && b[i + 1] == '\n')
            return i;
    return NOT_FOUND;
}

static size_t min_sz(size_t a, size_t b) { return a < b ? a : b; }

/* ------------------------------------------------------------------ */
/* HTTP request parsing.                                               */

struct hstate {
    int have_cl, have_host, chunked, conn_close;
    size_t content_length;
    unsigned count;
};

static int parse_version(const char *p, size_t n, int *minor)
{
    if (n != 8 || memcmp(p, "HTTP/", 5) != 0 || p[6] != '.')
        return -400;
    if (!is_digit((unsigned char)p[5]) || !is_digit((unsigned char)p[7]))
        return -400;
    if (p[5] != '1' || (p[7] != '0' && p[7] != '1'))
        return -505;
    *minor = p[7] - '0';
    return 0;
}

static int parse_target(const char *p, size_t n, struct request *r)
{
    if (n == 0 || p[0] != '/')
        return -400;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c <= 0x20 || c >= 0x7f || c == '#')
            return -400;
    }
    r->target = (struct slice){p, n};
    const char *q = memchr(p, '?', n);
    size_t plen = q ? (size_t)(q - p) : n;
    r->path = (struct slice){p, plen};
    r->query = q ? (struct slice){q + 1, n - plen - 1} : (struct slice){p + n, 0};
    return 0;
}

/* Request line is b[0..e). */
static int parse_request_line(const char *b, size_t e, struct request *r)
{
    size_t m = 0;
    while (m < e && is_tchar((unsigned char)b[m]))
        m++;
    if (m == 0 || m > 16 || m >= e || b[m] != ' ')
        return -400;
    r->method = (struct slice){b, m};
    const char *t = b + m + 1;
    const char *sp = memchr(t, ' ', e - m - 1);
    if (!sp)
        return -400;
    int rc = parse_target(t, (size_t)(sp - t), r);
    if (rc)
        return rc;
    size_t vpos = (size_t)(sp - b) + 1;
    return parse_version(b + vpos, e - vpos, &r->http_minor);
}

static int parse_content_length(struct slice v, struct hstate *h)
{
    if (h->have_cl || v.n == 0 || v.n > 10)
        return -400;
    size_t cl = 0;
    for (size_t i = 0; i < v.n; i++) {
        if (!is_digit((unsigned char)v.p[i]))
            return -400;
        cl = cl * 10 + (size_t)(v.p[i] - '0');
    }
    if (cl > HTTP_MAX_BODY)
        return -413;
    h->have_cl = 1;
    h->content_length = cl;
    return 0;
}

static void parse_connection(struct slice v, struct hstate *h)
{
    size_t i = 0;
    while (i < v.n) {
        while (i < v.n && (v.p[i] == ' ' || v.p[i] == '\t' || v.p[i] == ','))
            i++;
        size_t s = i;
        while (i < v.n && v.p[i] != ',' && v.p[i] != ' ' && v.p[i] != '\t')
            i++;
        if (ieq((struct slice){v.p + s, i - s}, "close"))
            h->conn_close = 1;
    }
}

static int request_id_ok(struct slice v)
{
    if (v.n == 0 || v.n > HTTP_MAX_REQUEST_ID)
        return 0;
    for (size_t i = 0; i < v.n; i++) {
        unsigned char c = (unsigned char)v.p[i];
        if (c < 0x21 || c > 0x7e)
            return 0;
    }
    return 1;
}

static int apply_header(struct slice name, struct slice v, struct request *r,
                        struct hstate *h)
{
    if (ieq(name, "content-length"))
        return parse_content_length(v, h);
    if (ieq(name, "transfer-encoding")) {
        if (h->chunked)
            return -400;
        if (!ieq(v, "chunked"))
            return -501;
        h->chunked = 1;
    } else if (ieq(name, "host")) {
        if (h->have_host++)
            return -400;
    } else if (ieq(name, "connection")) {
        parse_connection(v, h);
    } else if (ieq(name, "x-request-id")) {
        if (request_id_ok(v))
            r->request_id = v;
    } else if (ieq(name, "content-type")) {
        r->content_type = v;
    }
    return 0;
}

/* Split and validate one header line b[0..n); name/value out. */
static int split_header(const char *b, size_t n, struct slice *name,
                        struct slice *value)
{
    size_t i = 0;
    while (i < n && is_tchar((unsigned char)b[i]))
        i++;
    if (i == 0 || i >= n || b[i] != ':')
        return -400;
    *name = (struct slice){b, i};
    size_t s = i + 1, e = n;
    for (size_t k = s; k < n; k++)
        if (!is_vchar_ws((unsigned char)b[k]))
            return -400;
    while (s < e && (b[s] == ' ' || b[s] == '\t'))
        s++;
    while (e > s && (b[e - 1] == ' ' || b[e - 1] == '\t'))
        e--;
    *value = (struct slice){b + s, e - s};
    return 0;
}

/* Headers start at hs.  On success *end is the offset after the blank
 * line.  Returns 0 complete, 1 need more, or -status. */
static int parse_headers(const char *b, size_t hs, size_t len,
                         struct request *r, struct hstate *h, size_t *end)
{
    size_t to = min_sz(len, hs + HTTP_MAX_HEADERS), pos = hs;
    for (;;) {
        size_t e = find_crlf(b, pos, to);
        if (e == NOT_FOUND)
            return len >= hs + HTTP_MAX_HEADERS ? -431 : 1;
        if (e == pos) {
            *end = e + 2;
            return 0;
        }
        if (++h->count > HTTP_MAX_HEADER_COUNT)
            return -431;
        struct slice name, value;
        int rc = split_header(b + pos, e - pos, &name, &value);
        if (rc == 0)
            rc = apply_header(name, value, r, h);
        if (rc)
            return rc;
        pos = e + 2;
    }
}

/* Parse "hex[;ext]" in b[s..e).  Returns 0 and *size, or -400. */
static int chunk_size(const char *b, size_t s, size_t e, size_t *size)
{
    size_t v = 0, i = s;
    while (i < e && hex_val((unsigned char)b[i]) >= 0 && i - s < 8)
        v = v * 16 + (size_t)hex_val((unsigned char)b[i++]);
    if (i == s || (i < e && b[i] != ';'))
        return -400;
    for (; i < e; i++)
        if (!is_vchar_ws((unsigned char)b[i]))
            return -400;
    *size = v;
    return 0;
}

/* Skip trailer fields from pos.  Returns offset after the final CRLF,
 * 0 if more input is needed, or -status. */
static long skip_trailers(const char *b, size_t pos, size_t len)
{
    size_t start = pos, to = min_sz(len, pos + HTTP_MAX_TRAILERS);
    for (;;) {
        size_t e = find_crlf(b, pos, to);
        if (e == NOT_FOUND)
            return len >= start + HTTP_MAX_TRAILERS ? -431 : 0;
        if (e == pos)
            return (long)(e + 2);
        struct slice n, v;
        if (split_header(b + pos, e - pos, &n, &v))
            return -400;
        pos = e + 2;
    }
}

/* Walk chunked framing from pos; if decode, move data to b[pos..).
 * Returns the end offset, 0 for more input, or -status. */
static long walk_chunks(char *b, size_t pos, size_t len, int decode,
                        size_t *body_len)
{
    size_t start = pos, out = pos, total = 0;
    for (;;) {
        if (pos - start > HTTP_MAX_CHUNK_RAW)
            return -413;
        size_t e = find_crlf(b, pos, min_sz(len, pos + 80));
        if (e == NOT_FOUND)
            return len >= pos + 80 ? -400 : 0;
        size_t sz;
        if (chunk_size(b, pos, e, &sz))
            return -400;
        pos = e + 2;
        if (sz > HTTP_MAX_BODY - total)
            return -413;
        if (sz == 0)
            break;
        if (len - pos < sz + 2)
            return 0;
        if (b[pos + sz] != '\r' || b[pos + sz + 1] != '\n')
            return -400;
        if (decode)
            memmove(b + out, b + pos, sz);
        out += sz;
        total += sz;
        pos += sz + 2;
    }
    *body_len = total;
    return skip_trailers(b, pos, len);
}

static long parse_chunked(char *b, size_t hend, size_t len, struct request *r)
{
    size_t blen = 0;
    long end = walk_chunks(b, hend, len, 0, &blen);
    if (end == 0 && len - hend > HTTP_MAX_CHUNK_RAW)
        return -413;
    if (end <= 0)
        return end;
    walk_chunks(b, hend, len, 1, &blen);
    r->body = (struct slice){b + hend, blen};
    return end;
}

static long parse_body(char *b, size_t hend, size_t len, struct request *r,
                       const struct hstate *h)
{
    if (h->chunked)
        return parse_chunked(b, hend, len, r);
    size_t cl = h->have_cl ? h->content_length : 0;
    if (len - hend < cl)
        return 0;
    r->body = (struct slice){b + hend, cl};
    return (long)(hend + cl);
}

static int check_framing(const struct request *r, const struct hstate *h)
{
    if (h->chunked && h->have_cl)
        return -400;
    if (r->http_minor == 1 && !h->have_host)
        return -400;
    if (r->http_minor == 0 && h->chunked)
        return -400;
    return 0;
}

long http_parse(char *buf, size_t len, struct request *req)
{
    memset(req, 0, sizeof *req);
    size_t e = find_crlf(buf, 0, min_sz(len, HTTP_MAX_LINE));
    if (e == NOT_FOUND)
        return len >= HTTP_MAX_LINE ? -414 : 0;
    int rc = parse_request_line(buf, e, req);
    if (rc)
        return rc;
    struct hstate h = {0};
    size_t hend = 0;
    rc = parse_headers(buf, e + 2, len, req, &h, &hend);
    if (rc)
        return rc > 0 ? 0 : rc;
    rc = check_framing(req, &h);
    if (rc)
        return rc;
    req->keep_alive = req->http_minor == 1 && !h.conn_close;
    return parse_body(buf, hend, len, req, &h);
}

/* ------------------------------------------------------------------ */
/* Output buffer, JSON and URL helpers.                                */

void sb_put(struct sbuf *b, const char *s, size_t n)
{
    if (b->overflow || n > b->cap - b->len) {
        b->overflow = 1;
        return;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

void sb_puts(struct sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }

void sb_printf(struct sbuf *b, const char *fmt, ...)
{
    if (b->overflow)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= b->cap - b->len)
        b->overflow = 1;
    else
        b->len += (size_t)n;
}

/* Length of the valid UTF-8 sequence at s (n > 0 bytes), or 0. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned lo = 0x80, hi = 0xbf;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        len = 2;
    else if (c >= 0xe0 && c <= 0xef)
        len = 3;
    else if (c >= 0xf0 && c <= 0xf4)
        len = 4;
    else
        return 0;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    return len;
}

static void json_escape_byte(struct sbuf *b, unsigned char c)
{
    switch (c) {
    case '"': sb_put(b, "\\\"", 2); break;
    case '\\': sb_put(b, "\\\\", 2); break;
    case '\n': sb_put(b, "\\n", 2); break;
    case '\r': sb_put(b, "\\r", 2); break;
    case '\t': sb_put(b, "\\t", 2); break;
    default:
        if (c < 0x20 || c == 0x7f)
            sb_printf(b, "\\u%04x", c);
        else
            sb_put(b, (const char *)&c, 1);
    }
}

void sb_json_str(struct sbuf *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    sb_put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        if (u[i] < 0x80) {
            json_escape_byte(b, u[i++]);
            continue;
        }
        size_t l = utf8_seq(u + i, n - i);
        if (l == 0) {
            sb_puts(b, "\\ufffd");
            i++;
        } else {
            sb_put(b, s + i, l);
            i += l;
        }
    }
    sb_put(b, "\"", 1);
}

long url_decode(const char *s, size_t n, char *out, size_t cap, int plus)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '%') {
            if (n - i < 3)
                return -1;
            int hi = hex_val((unsigned char)s[i + 1]);
            int lo = hex_val((unsigned char)s[i + 2]);
            if (hi < 0 || lo < 0)
                return -1;
            c = (unsigned char)(hi * 16 + lo);
            i += 2;
        } else if (c == '+' && plus) {
            c = ' ';
        }
        if (o >= cap)
            return -1;
        out[o++] = (char)c;
    }
    return (long)o;
}

int form_get(struct slice qs, const char *key, char *out, size_t cap,
             size_t *outn)
{
    size_t i = 0, klen = strlen(key);
    while (i < qs.n) {
        const char *amp = memchr(qs.p + i, '&', qs.n - i);
        size_t end = amp ? (size_t)(amp - qs.p) : qs.n;
        const char *pair = qs.p + i;
        const char *eq = memchr(pair, '=', end - i);
        size_t nlen = eq ? (size_t)(eq - pair) : end - i;
        char name[64];
        long dn = url_decode(pair, nlen, name, sizeof name, 1);
        if (dn == (long)klen && memcmp(name, key, klen) == 0) {
            size_t vs = eq ? nlen + 1 : nlen;
            long vn = url_decode(pair + vs, end - i - vs, out, cap, 1);
            if (vn < 0)
                return -1;
            *outn = (size_t)vn;
            return 1;
        }
        i = end + 1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Worker identity, responses.                                         */

static char g_worker[72] = "worker@dev";
static unsigned long g_delay_ms;

const char *worker_name(void) { return g_worker; }

static void init_worker_name(const char *service)
{
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
    sb_printf(&res->body, ",\"pid\":%ld", (long)getpid());
}

void json_error(struct response *res, int status, const char *msg)
{
    json_begin(res, status);
    sb_printf(&res->body, ",\"status\":%d,\"error\":", status);
    sb_json_str(&res->body, msg, strlen(msg));
    sb_puts(&res->body, "}\n");
}

static const char *reason(int status)
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

static const char *error_text(int status)
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
/* Time, logging, sd_notify.                                           */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static double now_s(void)
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

static void log_request(const struct request *r, int status, double secs)
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

static int g_notify_fd = -1;
static struct sockaddr_un g_notify_addr;
static socklen_t g_notify_len;
static long long g_watchdog_ms, g_watchdog_next;

static void notify_init(void)
{
    const char *s = getenv("NOTIFY_SOCKET");
    if (!s || (s[0] != '/' && s[0] != '@'))
        return;
    size_t n = strlen(s);
    if (n < 2 || n >= sizeof g_notify_addr.sun_path) {
        fprintf(stderr, "%s: NOTIFY_SOCKET too long, ignored\n", g_worker);
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
        fprintf(stderr, "%s: sd_notify: %s\n", g_worker, strerror(errno));
}

static void watchdog_init(void)
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

static void watchdog_tick(void)
{
    if (g_watchdog_ms == 0 || now_ms() < g_watchdog_next)
        return;
    notify("WATCHDOG=1");
    g_watchdog_next = now_ms() + g_watchdog_ms;
}

/* Sleep for the test delay, in slices so the watchdog keeps ticking. */
static void test_delay(void)
{
    long long end = now_ms() + (long long)g_delay_ms;
    for (long long left; (left = end - now_ms()) > 0;) {
        if (g_watchdog_ms && left > g_watchdog_ms)
            left = g_watchdog_ms;
        struct timespec ts = {left / 1000, (left % 1000) * 1000000L};
        nanosleep(&ts, NULL);
        watchdog_tick();
    }
}

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
              res->status, reason(res->status), res->body.len, g_worker);
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
    int n = snprintf(path, sizeof path, "%s/%s", dir, g_worker);
    return n > 0 && (size_t)n < sizeof path && access(path, F_OK) == 0;
}

static void dispatch(const struct request *req, struct response *res)
{
    if (g_delay_ms)
        test_delay();
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

/* Serve one complete request; returns 0 to keep the connection. */
static int serve(struct conn *c, const struct request *req)
{
    double t0 = now_s();
    struct response res;
    init_response(&res);
    dispatch(req, &res);
    g_served++;
    c->nreq++;
    int keep = req->keep_alive && !c->eof && !stop_pending() &&
               c->nreq < MAX_REQS_PER_CONN &&
               (g_max_requests == 0 || g_served < g_max_requests);
    int rc = send_response(c, req, &res, keep);
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

static void accept_one(int lfd)
{
    if (g_nconns >= MAX_CONNS)
        return;
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
            errno != ECONNABORTED)
            fprintf(stderr, "%s: accept: %s\n", g_worker, strerror(errno));
        return;
    }
    struct conn *c = &g_conns[g_nconns++];
    memset(c, 0, sizeof *c);
    c->fd = fd;
    c->idle_since = c->req_since = now_ms();
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
    if (g_watchdog_ms && g_watchdog_next < next)
        next = g_watchdog_next;
    return next <= now ? 0 : (int)(next - now);
}

static int done(void)
{
    return g_stop || (g_max_requests && g_served >= g_max_requests);
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
    for (int i = 0; i < n && !done(); i++)
        if ((pfds[i].revents || g_conns[i].ready) &&
            conn_event(&g_conns[i], pfds[i].revents))
            conn_close(&g_conns[i]);
    compact();
    if (pfds[n].revents & POLLIN && !done())
        accept_one(lfd);
    expire();
}

/* After SIGTERM / max requests: serve requests already received, close. */
static void drain(void)
{
    for (int i = 0; i < g_nconns; i++) {
        struct conn *c = &g_conns[i];
        if (read_some(c) == 0)
            try_request(c);
        conn_close(c);
    }
    g_nconns = 0;
}

static int run_loop(int lfd)
{
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &old);
    while (!done())
        loop_once(lfd, &old);
    notify("STOPPING=1\nSTATUS=draining");
    drain();
    fprintf(stderr, "%s: exiting after %lu requests\n", g_worker, g_served);
    return 0;
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
            "Without --listen the socket comes from systemd (LISTEN_FDS).\n",
            prog);
    return 2;
}

static int parse_args(int argc, char **argv, const char **listen_spec)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen") == 0 && i + 1 < argc) {
            *listen_spec = argv[++i];
        } else if (strcmp(argv[i], "--max-requests") == 0 && i + 1 < argc) {
            if (parse_ulong(argv[++i], ULONG_MAX / 2, &g_max_requests))
                return -1;
        } else {
            return -1;
        }
    }
    return 0;
}

static void setup_signals(void)
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

static void init_delay(void)
{
    const char *d = getenv("CGIPOOL_TEST_DELAY_MS");
    if (d && *d && parse_ulong(d, 600000, &g_delay_ms))
        fprintf(stderr, "%s: bad CGIPOOL_TEST_DELAY_MS ignored\n", g_worker);
}

int worker_main(int argc, char **argv, const struct service *svc)
{
    const char *spec = NULL;
    g_svc = svc;
    init_worker_name(svc->name);
    if (parse_args(argc, argv, &spec))
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
    fprintf(stderr, "%s: ready (pid %ld)\n", g_worker, (long)getpid());
    return run_loop(lfd);
}
