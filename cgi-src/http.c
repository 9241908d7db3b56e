/* http.c - strict, bounded HTTP/1.1 request parsing (http_parse) and
 * URL/form decoding, with the locale-independent character helpers they
 * use. No I/O: the poll loop (loop.c) hands it the bytes received so far,
 * and the fuzzer (fuzz/fuzz_parser.c) links only this file and buf.c. */
#include "internal.h"

#include <stdint.h>
#include <string.h>

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
/* URL and form decoding.                                              */

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

