#!/usr/bin/python3
"""A CGI program that abuses resources on purpose (cgipool's vm-tests): the
worker's memory_max and tasks_max must hold it, and the worker must keep
serving.

  /memory?mb=N  allocates and touches N MiB, then answers how much it got
                (under memory_max the kernel's OOM killer ends it first)
  /tasks?n=N    starts N children that sleep; answers how many forks the
                kernel refused (tasks_max); the gateway kills the children
                after the request
  anything else a normal answer
"""
import json
import os
import sys
import time
from urllib.parse import parse_qs


def answer(status, body):
    sys.stdout.write(f"Status: {status}\r\nContent-Type: application/json\r\n\r\n")
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


def main():
    path = os.environ.get("PATH_INFO", "")
    query = parse_qs(os.environ.get("QUERY_STRING", ""))
    number = int(query.get("mb", query.get("n", ["0"]))[0])
    if path == "/memory":
        print(f"hog: allocating {number} MiB", file=sys.stderr, flush=True)
        data = b"x" * (number << 20)
        answer(200, {"allocated_mib": len(data) >> 20})
    elif path == "/tasks":
        started, refused = 0, 0
        for _ in range(number):
            try:
                pid = os.fork()
            except OSError:
                refused += 1
                continue
            if pid == 0:
                # Not holding the response open: the gateway reads to EOF.
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                time.sleep(300)
                os._exit(0)
            started += 1
        print(f"hog: {started} children, {refused} forks refused", file=sys.stderr, flush=True)
        answer(200, {"started": started, "refused": refused})
    else:
        answer(200, {"ok": True, "pid": os.getpid()})


main()
