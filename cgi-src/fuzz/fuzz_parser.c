/* libFuzzer target: the HTTP request parser plus the helpers that run on
 * what it returns (form decoding, JSON escaping). */
#include "../common.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void exercise(const struct request *req)
{
    static char out[1 << 16], val[HTTP_MAX_LINE];
    struct sbuf b = {out, 0, sizeof out, 0};
    size_t vn = 0;
    if (form_get(req->query, "q", val, sizeof val, &vn) > 0)
        sb_json_str(&b, val, vn);
    if (form_get(req->body, "user", val, sizeof val, &vn) > 0)
        sb_json_str(&b, val, vn);
    sb_json_str(&b, req->target.p, req->target.n);
    sb_json_str(&b, req->body.p, req->body.n < 4096 ? req->body.n : 4096);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    struct request req;
    long n = http_parse(buf, size, &req);
    if (n > (long)size)
        abort();
    if (n > 0)
        exercise(&req);
    free(buf);
    return 0;
}
