/* search.c - GET /api/search?q=<words>: case-insensitive word match over
 * a small built-in index.  All words of the query must occur in a
 * document's title or text. */
#include "common.h"

#include <string.h>

struct doc {
    const char *title;
    const char *text;
};

static const struct doc INDEX[] = {
    {"Getting started with cgipool", "install the pool manager and run your first worker"},
    {"Socket activation", "systemd passes the listening socket as fd 3 with LISTEN_FDS"},
    {"Worker contract", "any language can be a worker: read fd 3, answer HTTP, exit on SIGTERM"},
    {"Scaling pools", "pools grow and shrink between min and max workers"},
    {"Health checks", "every worker answers GET /healthz with 200"},
    {"Watchdog", "workers send WATCHDOG=1 to systemd every half interval"},
    {"Graceful shutdown", "SIGTERM means finish the request in flight and exit 0"},
    {"Request IDs", "nginx sets X-Request-ID and workers echo it back"},
    {"Load balancing", "nginx least_conn spreads requests across workers"},
    {"Keep-alive upstreams", "idle keep-alive connections are multiplexed with poll"},
    {"Slowloris protection", "a read timeout closes connections that send too slowly"},
    {"Request limits", "request line, header block and body size are bounded"},
    {"Chunked bodies", "Transfer-Encoding chunked is decoded, smuggling is refused"},
    {"Max requests", "workers exit after N requests and systemd restarts them"},
    {"Logging", "one line per request goes to the journal"},
    {"The search service", "search the built-in index of documents"},
    {"The auth service", "check user names and passwords against a table"},
    {"Python workers", "the standard library is enough for a worker"},
    {"Rust pool manager", "the manager renders units and talks to systemd over D-Bus"},
    {"Unit templates", "service and socket units are rendered from templates"},
    {"Demo configuration", "examples demo toml defines the search and auth pools"},
    {"Benchmarks", "wrk against nginx measures requests per second"},
    {"Sanitizers", "tests run AddressSanitizer and UndefinedBehaviorSanitizer builds"},
    {"Fuzzing", "libFuzzer drives the request parser with random input"},
    {"JSON escaping", "quotes, backslashes and control characters are escaped"},
    {"URL decoding", "percent escapes and plus signs are decoded in queries"},
    {"Unix sockets", "workers listen on unix stream sockets under run"},
    {"TCP development mode", "use --listen host:port to run a worker by hand"},
    {"sd_notify", "READY=1 STATUS STOPPING=1 are datagrams to NOTIFY_SOCKET"},
    {"Resource limits", "MemoryMax and CPUQuota confine each pool"},
    {"Security hardening", "workers run as DynamicUser with a private tmp"},
    {"Troubleshooting", "journalctl shows the per request log lines"},
    {"Reloading nginx", "upstream blocks are regenerated when pools change"},
    {"Constant time comparison", "password checks do not leak timing"},
    {"Error responses", "errors are JSON objects with status and error"},
    {"Versioning", "the worker contract is stable across releases"},
};

#define NDOCS (sizeof INDEX / sizeof INDEX[0])
#define MAX_WORDS 32

static int word_char(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
           (c >= 'A' && c <= 'Z') || c == '_' || c >= 0x80;
}

static unsigned char lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static int word_eq(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (lower((unsigned char)a[i]) != lower((unsigned char)b[i]))
            return 0;
    return 1;
}

/* Does text contain w[0..n) as a whole word, ignoring ASCII case? */
static int has_word(const char *text, struct slice w)
{
    size_t i = 0, len = strlen(text);
    while (i < len) {
        while (i < len && !word_char((unsigned char)text[i]))
            i++;
        size_t s = i;
        while (i < len && word_char((unsigned char)text[i]))
            i++;
        if (i - s == w.n && w.n > 0 && word_eq(text + s, w.p, w.n))
            return 1;
    }
    return 0;
}

/* Split q into words; returns the count (at most MAX_WORDS). */
static size_t split_words(const char *q, size_t n, struct slice *w)
{
    size_t i = 0, k = 0;
    while (i < n && k < MAX_WORDS) {
        while (i < n && !word_char((unsigned char)q[i]))
            i++;
        size_t s = i;
        while (i < n && word_char((unsigned char)q[i]))
            i++;
        if (i > s)
            w[k++] = (struct slice){q + s, i - s};
    }
    return k;
}

static int doc_matches(const struct doc *d, const struct slice *w, size_t nw)
{
    for (size_t i = 0; i < nw; i++)
        if (!has_word(d->title, w[i]) && !has_word(d->text, w[i]))
            return 0;
    return nw > 0;
}

static void write_results(struct sbuf *b, const char *q, size_t qn)
{
    struct slice w[MAX_WORDS];
    size_t nw = split_words(q, qn, w), count = 0;
    sb_puts(b, ",\"results\":[");
    for (size_t i = 0; i < NDOCS; i++) {
        if (!doc_matches(&INDEX[i], w, nw))
            continue;
        sb_printf(b, "%s{\"id\":%zu,\"title\":", count++ ? "," : "", i + 1);
        sb_json_str(b, INDEX[i].title, strlen(INDEX[i].title));
        sb_printf(b, ",\"url\":\"/docs/%zu\"}", i + 1);
    }
    sb_printf(b, "],\"count\":%zu}\n", count);
}

static void handle(const struct request *req, struct response *res)
{
    static char q[HTTP_MAX_LINE];
    size_t qn = 0;
    if (!path_matches(req, "/api/search")) {
        json_error(res, 404, "not found");
        return;
    }
    if (!method_is(req, "GET")) {
        json_error(res, 405, "method not allowed");
        res->allow = "GET, HEAD";
        return;
    }
    int rc = form_get(req->query, "q", q, sizeof q, &qn);
    if (rc <= 0) {
        json_error(res, 400, rc < 0 ? "malformed q" : "missing q");
        return;
    }
    json_begin(res, 200);
    sb_puts(&res->body, ",\"query\":");
    sb_json_str(&res->body, q, qn);
    write_results(&res->body, q, qn);
}

static const struct service SEARCH = {"search", NULL, handle};

int main(int argc, char **argv)
{
    return worker_main(argc, argv, &SEARCH);
}
