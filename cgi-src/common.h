/* common.h - the one shared module of the cgipool C workers.
 *
 * Socket activation (LISTEN_FDS) or --listen, strict bounded HTTP/1.1
 * parsing, response writing, sd_notify without libsystemd, URL decoding,
 * JSON escaping, request logging and the poll() event loop that serves one
 * request at a time while keeping idle keep-alive connections open.
 * Implemented in http.c (parsing, URL/form decoding), buf.c (buffers,
 * JSON), notify.c (sd_notify, watchdog), loop.c (the poll loop) and
 * common.c (identity, logging, listening socket, worker_main); internal.h
 * is what they share. Each service (search.c, auth.c) is one file.
 */
#ifndef CGIPOOL_COMMON_H
#define CGIPOOL_COMMON_H

#include <stddef.h>

/* Limits (bytes unless noted). */
#define HTTP_MAX_LINE        8192u            /* request line incl. CRLF -> 414 */
#define HTTP_MAX_HEADERS     16384u           /* header block -> 431 */
#define HTTP_MAX_HEADER_COUNT 64u             /* header fields -> 431 */
#define HTTP_MAX_BODY        (1024u * 1024u)  /* decoded body -> 413 */
#define HTTP_MAX_CHUNK_RAW   (HTTP_MAX_BODY + 65536u) /* chunked framing */
#define HTTP_MAX_TRAILERS    4096u
#define HTTP_MAX_REQUEST     (HTTP_MAX_LINE + HTTP_MAX_HEADERS + \
                              HTTP_MAX_CHUNK_RAW + HTTP_MAX_TRAILERS + 1024u)
#define HTTP_MAX_REQUEST_ID  128u

struct slice {
    const char *p;
    size_t n;
};

struct request {
    struct slice method;
    struct slice target;     /* path?query as received */
    struct slice path;
    struct slice query;      /* without '?', may be empty */
    struct slice request_id; /* X-Request-ID if present and sane */
    struct slice content_type;
    struct slice body;       /* de-chunked if chunked */
    int http_minor;          /* 0 or 1 */
    int keep_alive;
};

/* Parse one request at the start of buf[0..len).  Returns the number of
 * bytes consumed (> 0) when complete, 0 when more input is needed, or
 * -status (e.g. -400, -413, -414, -431, -501, -505) when the input is
 * invalid.  A chunked body is decoded in place, so buf is modified only
 * when a complete request is returned. */
long http_parse(char *buf, size_t len, struct request *req);

/* Growable-but-bounded output buffer; overflow is sticky. */
struct sbuf {
    char *p;
    size_t len;
    size_t cap;
    int overflow;
};

void sb_put(struct sbuf *b, const char *s, size_t n);
void sb_puts(struct sbuf *b, const char *s);
void sb_printf(struct sbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Append s as a JSON string literal (quotes included).  Invalid UTF-8
 * becomes U+FFFD, control characters are escaped. */
void sb_json_str(struct sbuf *b, const char *s, size_t n);

/* Decode %xx (and '+' as space if plus) into out.  Returns the decoded
 * length, or -1 on a malformed escape or if out is too small. */
long url_decode(const char *s, size_t n, char *out, size_t cap, int plus);

/* Look up key in an application/x-www-form-urlencoded string.  Returns 1
 * and the decoded value in out (length *outn) if found, 0 if absent, -1 if
 * the value is malformed or longer than cap. */
int form_get(struct slice qs, const char *key, char *out, size_t cap,
             size_t *outn);

struct response {
    int status;
    const char *allow;       /* Allow header for 405, or NULL */
    struct sbuf body;        /* JSON */
};

/* Helpers for handlers. */
int slice_eq(struct slice s, const char *lit);
int path_matches(const struct request *req, const char *suffix);
int method_is(const struct request *req, const char *m); /* GET also matches HEAD */
const char *worker_name(void);
void json_error(struct response *res, int status, const char *msg);
/* Start a JSON object with "worker" and "pid" members; caller continues
 * with ",..." members and closes with "}". */
void json_begin(struct response *res, int status);

struct service {
    const char *name;         /* "search" -> default worker "search@dev" */
    int (*init)(void);        /* optional, 0 on success */
    void (*handle)(const struct request *req, struct response *res);
};

/* Parse argv, set up the listening socket, notify, run the loop. */
int worker_main(int argc, char **argv, const struct service *svc);

/* sd_notify over $NOTIFY_SOCKET; silently does nothing if unset. */
void notify(const char *msg);

#endif
