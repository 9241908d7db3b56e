#!/bin/sh
# A classic CGI program in POSIX shell, for cgipool's `protocol = "cgi"`
# pools (see README.md, "CGI programs"). PATH_INFO picks what it does:
#   /form      GET: an HTML form; POST: the urlencoded fields it received
#   /redirect  a client redirect (Location: with an absolute URL)
#   /teapot    a custom status (Status: 418)
#   /big?mb=N  N MiB of zeros, streamed (no Content-Length: sent chunked)
#   /env       the meta-variables it got, as text
#   anything else: 404 with Status:
set -u
case "${PATH_INFO:-}" in
/form)
    if [ "$REQUEST_METHOD" = POST ]; then
        body=$(head -c "${CONTENT_LENGTH:-0}")
        printf 'Content-Type: text/plain\n\n'
        printf 'content-type=%s\n' "${CONTENT_TYPE:-}"
        printf 'content-length=%s\n' "${CONTENT_LENGTH:-}"
        # a=1&b=x+y → one field per line, + → space (no %-decoding here)
        printf '%s\n' "$body" | tr '&' '\n' | tr '+' ' ' | sed 's/^/field /'
    else
        printf 'Content-Type: text/html; charset=utf-8\n\n'
        printf '<form method="post" action="%s/form"><input name="name"><input type="submit"></form>\n' "$SCRIPT_NAME"
    fi
    ;;
/redirect)
    printf 'Location: https://example.org/after-redirect\n\n'
    ;;
/teapot)
    printf "Status: 418 I'm a teapot\nContent-Type: text/plain\nX-Custom: kept\n\nshort and stout\n"
    ;;
/big)
    mb=$(printf '%s' "${QUERY_STRING:-}" | sed -n 's/^.*mb=\([0-9][0-9]*\).*$/\1/p')
    printf 'Content-Type: application/octet-stream\n\n'
    head -c "$(( ${mb:-1} * 1024 * 1024 ))" /dev/zero
    ;;
/env)
    printf 'Content-Type: text/plain\n\n'
    env | sort
    ;;
*)
    printf 'Status: 404 Not Found\nContent-Type: text/plain\n\nno such page: %s\n' "${PATH_INFO:-}"
    ;;
esac
