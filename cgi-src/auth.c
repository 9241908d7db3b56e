/* auth.c - user checks against a small table.
 *
 *   GET  /api/auth?user=NAME            -> 200 {"user":..,"exists":bool}
 *   POST /api/auth  user=..&password=.. -> 200 / 401 {"authenticated":bool}
 *
 * The table comes from the file named by CGIPOOL_AUTH_USERS, one
 * "user:password" per line ('#' comments and blank lines ignored; the
 * user is [A-Za-z0-9._@-]{1,64}, the password is the rest of the line,
 * 1..128 bytes, and may contain ':').  Without the variable a built-in
 * demo table is used.  A file that cannot be read or parsed is fatal. */
#include "common.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_USERS 256
#define NAME_MAX_LEN 64
#define PASS_MAX_LEN 128

struct user {
    char name[NAME_MAX_LEN + 1];
    char pass[PASS_MAX_LEN];
    size_t pass_len;
};

static struct user g_users[MAX_USERS];
static size_t g_nusers;

static const char *const DEFAULT_USERS[] = {
    "john:hunter2", "alice:wonderland", "bob:builder", "admin:correct horse battery staple",
};

static int name_char(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
           (c >= 'A' && c <= 'Z') || c == '.' || c == '_' || c == '@' ||
           c == '-';
}

static int valid_name(const char *s, size_t n)
{
    if (n == 0 || n > NAME_MAX_LEN)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!name_char((unsigned char)s[i]))
            return 0;
    return 1;
}

/* Add one "user:password" entry (no newline).  Returns 0 or -1. */
static int add_user(const char *line, size_t n)
{
    const char *colon = memchr(line, ':', n);
    if (!colon || g_nusers >= MAX_USERS)
        return -1;
    size_t un = (size_t)(colon - line), pn = n - un - 1;
    if (!valid_name(line, un) || pn == 0 || pn > PASS_MAX_LEN)
        return -1;
    struct user *u = &g_users[g_nusers++];
    memcpy(u->name, line, un);
    u->name[un] = '\0';
    memcpy(u->pass, colon + 1, pn);
    u->pass_len = pn;
    return 0;
}

static int skip_line(const char *line, size_t n)
{
    return n == 0 || line[0] == '#';
}

static int load_file(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "auth: %s: %s\n", path, strerror(errno));
        return -1;
    }
    char line[512];
    int lineno = 0, rc = 0;
    while (rc == 0 && fgets(line, sizeof line, f)) {
        size_t n = strlen(line);
        lineno++;
        if (n == sizeof line - 1 && line[n - 1] != '\n')
            rc = -1;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            n--;
        if (rc == 0 && !skip_line(line, n))
            rc = add_user(line, n);
    }
    if (rc)
        fprintf(stderr, "auth: %s:%d: bad entry (want user:password)\n", path,
                lineno);
    fclose(f);
    return rc;
}

static int init(void)
{
    const char *path = getenv("CGIPOOL_AUTH_USERS");
    if (path && *path)
        return load_file(path);
    for (size_t i = 0; i < sizeof DEFAULT_USERS / sizeof DEFAULT_USERS[0]; i++)
        add_user(DEFAULT_USERS[i], strlen(DEFAULT_USERS[i]));
    return 0;
}

static const struct user *find_user(const char *name, size_t n)
{
    for (size_t i = 0; i < g_nusers; i++)
        if (strlen(g_users[i].name) == n && memcmp(g_users[i].name, name, n) == 0)
            return &g_users[i];
    return NULL;
}

/* Compare without data-dependent branches or early exit. */
static int ct_equal(const char *a, size_t an, const char *b, size_t bn)
{
    unsigned char pa[PASS_MAX_LEN] = {0}, pb[PASS_MAX_LEN] = {0};
    memcpy(pa, a, an < PASS_MAX_LEN ? an : PASS_MAX_LEN);
    memcpy(pb, b, bn < PASS_MAX_LEN ? bn : PASS_MAX_LEN);
    volatile unsigned d = (unsigned)(an ^ bn);
    for (size_t i = 0; i < PASS_MAX_LEN; i++)
        d |= (unsigned)(pa[i] ^ pb[i]);
    return d == 0;
}

static void verdict(struct response *res, const char *user, size_t un,
                    const char *key, int yes, int status)
{
    json_begin(res, status);
    sb_puts(&res->body, ",\"user\":");
    sb_json_str(&res->body, user, un);
    sb_printf(&res->body, ",\"%s\":%s}\n", key, yes ? "true" : "false");
}

static void handle_get(const struct request *req, struct response *res)
{
    char user[NAME_MAX_LEN * 4];
    size_t un = 0;
    int rc = form_get(req->query, "user", user, sizeof user, &un);
    if (rc <= 0 || un == 0) {
        json_error(res, 400, rc < 0 ? "malformed user" : "missing user");
        return;
    }
    verdict(res, user, un, "exists", find_user(user, un) != NULL, 200);
}

static int is_form(struct slice ct)
{
    static const char want[] = "application/x-www-form-urlencoded";
    size_t n = sizeof want - 1;
    if (ct.n < n || (ct.n > n && ct.p[n] != ';' && ct.p[n] != ' '))
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = ct.p[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c + 32);
        if (c != want[i])
            return 0;
    }
    return 1;
}

static void handle_post(const struct request *req, struct response *res)
{
    char user[NAME_MAX_LEN * 4], pass[PASS_MAX_LEN];
    size_t un = 0, pn = 0;
    if (!is_form(req->content_type)) {
        json_error(res, 415, "want application/x-www-form-urlencoded");
        return;
    }
    int ru = form_get(req->body, "user", user, sizeof user, &un);
    int rp = form_get(req->body, "password", pass, sizeof pass, &pn);
    if (ru <= 0 || rp <= 0 || un == 0) {
        json_error(res, 400, "need user and password");
        return;
    }
    static const char dummy[] = "cgipool-dummy-password";
    const struct user *u = find_user(user, un);
    /* Unknown users still pay for one comparison (against a dummy). */
    const char *want = u ? u->pass : dummy;
    size_t wn = u ? u->pass_len : sizeof dummy - 1;
    int ok = ct_equal(pass, pn, want, wn) & (u != NULL);
    verdict(res, user, un, "authenticated", ok, ok ? 200 : 401);
}

static void handle(const struct request *req, struct response *res)
{
    if (!path_matches(req, "/api/auth")) {
        json_error(res, 404, "not found");
    } else if (method_is(req, "GET")) {
        handle_get(req, res);
    } else if (method_is(req, "POST")) {
        handle_post(req, res);
    } else {
        json_error(res, 405, "method not allowed");
        res->allow = "GET, HEAD, POST";
    }
}

static const struct service AUTH = {"auth", init, handle};

int main(int argc, char **argv)
{
    return worker_main(argc, argv, &AUTH);
}
