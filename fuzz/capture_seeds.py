#!/usr/bin/env python3
"""Captures the seed corpus of fuzz/: requests exactly as nginx sends them
to a CGI pool's upstream (the proxy settings of templates/locations.conf),
made by curl through a local nginx on loopback.

    python3 fuzz/capture_seeds.py   # rewrites fuzz/corpus/gateway_{head,chunked}/nginx-*

gateway_head gets each whole request (head and body) as the gateway reads
it; gateway_chunked gets the chunked bodies nginx forwards when request
buffering is off (with buffering on, nginx sends Content-Length).
"""
import os, shutil, socket, subprocess, tempfile, threading, time

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY = """
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Request-ID $request_id;
    proxy_set_header X-Real-IP $remote_addr;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Port $server_port;
    proxy_set_header traceparent $http_traceparent;
    client_max_body_size 1m;
"""


def read_request(c):
    data = b""
    while b"\r\n\r\n" not in data:
        b = c.recv(65536)
        if not b:
            return data
        data += b
    head, _, body = data.partition(b"\r\n\r\n")
    low = head.lower()
    if b"transfer-encoding: chunked" in low:
        while not body.endswith(b"0\r\n\r\n"):
            b = c.recv(65536)
            if not b:
                break
            body += b
    elif b"content-length:" in low:
        n = int(low.split(b"content-length:")[1].split(b"\r\n")[0])
        while len(body) < n:
            b = c.recv(65536)
            if not b:
                break
            body += b
    return head + b"\r\n\r\n" + body


def main():
    tmp = tempfile.mkdtemp()
    sock = os.path.join(tmp, "up.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(sock)
    # nginx's workers run as another user.
    os.chmod(tmp, 0o755)
    os.chmod(sock, 0o777)
    srv.listen(16)
    got = []

    def serve():
        while True:
            c, _ = srv.accept()
            got.append(read_request(c))
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    conf = os.path.join(tmp, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log;
events {{}}
http {{
  access_log off; client_body_temp_path {tmp}; proxy_temp_path {tmp};
  upstream up {{ server unix:{sock}; }}
  server {{
    listen 127.0.0.1:{port};
    location /git {{ proxy_pass http://up; {PROXY} }}
    location /unbuffered {{ proxy_pass http://up; proxy_request_buffering off; {PROXY} }}
  }}
}}
""")
    nginx = subprocess.Popen(["nginx", "-c", conf, "-p", tmp])
    time.sleep(0.5)
    base = f"http://127.0.0.1:{port}"
    runs = [
        ["/git/repo.git/info/refs?service=git-upload-pack", "-H", "Git-Protocol: version=2"],
        ["/git/gitweb.cgi?p=repo.git;a=summary", "-H", "Accept: text/html", "-A", "Mozilla/5.0"],
        ["/git/a%20b/%E2%82%AC?q=x+y&z=%2F", "-H", "Cookie: a=b; c=d"],
        ["/git/repo.git/git-upload-pack", "-X", "POST", "-H",
         "Content-Type: application/x-git-upload-pack-request", "--data-binary",
         "0032want 0123456789abcdef0123456789abcdef01234567\n00000009done\n"],
        ["/git/form", "-X", "POST", "-d", "user=alice&comment=hi%21"],
        ["/git/head", "-I"],
        ["/git/old", "-0"],
        ["/git/put", "-X", "PUT", "-H", "Transfer-Encoding: chunked", "--data-binary", "chunked body"],
        ["/unbuffered/push", "-X", "POST", "-H", "Transfer-Encoding: chunked",
         "--data-binary", "0032want 0123\n" * 40],
        ["/unbuffered/small", "-X", "POST", "-H", "Transfer-Encoding: chunked", "-d", "a=1"],
    ]
    try:
        for r in runs:
            subprocess.run(["curl", "-s", "-o", "/dev/null", base + r[0], *r[1:]], check=True)
        # A body that arrives in parts: forwarded chunked (buffering off).
        slow = subprocess.Popen(
            ["curl", "-s", "-o", "/dev/null", "-X", "POST", "-T", "-", base + "/unbuffered/stream"],
            stdin=subprocess.PIPE)
        for i in range(3):
            slow.stdin.write(b"PACK part %d\n" % i * 50)
            slow.stdin.flush()
            time.sleep(0.2)
        slow.stdin.close()
        slow.wait()
        time.sleep(0.3)
    finally:
        nginx.terminate()
        nginx.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    for i, req in enumerate(got):
        with open(os.path.join(HERE, "corpus/gateway_head", f"nginx-{i:02}"), "wb") as f:
            f.write(req)
        head, _, body = req.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" in head.lower():
            with open(os.path.join(HERE, "corpus/gateway_chunked", f"nginx-{i:02}"), "wb") as f:
                f.write(body)
    print(f"captured {len(got)} requests")


if __name__ == "__main__":
    main()
