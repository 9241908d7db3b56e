#!/bin/sh
# A CGI program that misbehaves on purpose (cgipool's vm-tests):
#   /hang     starts a background child and a setsid grandchild (double
#             fork), then never answers: the gateway must answer 504 at the
#             pool's request_timeout and leave no process behind
#   /garbage  prints something that is not a CGI response: 502
#   /ok       a normal answer, to show the worker still serves
case "${PATH_INFO:-}" in
/hang)
    echo "misbehave: hanging with children" >&2
    sleep 1001 &
    ( setsid sh -c 'sleep 1002' & )
    sleep 1003
    ;;
/garbage)
    echo "misbehave: printing garbage" >&2
    echo "this is not a CGI header block"
    echo "<html>oops</html>"
    ;;
*)
    printf 'Content-Type: text/plain\n\nok from pid %s\n' "$$"
    ;;
esac
