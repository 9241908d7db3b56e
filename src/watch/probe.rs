//! The active health probe: `GET health_path` on a worker's own socket
//! (`queue = "per-worker"`) or on the pool's socket (`queue = "shared"`:
//! whichever worker accepts answers, and names itself in
//! `X-Cgipool-Worker`), the same way nginx reaches it (HTTP, or a FastCGI
//! request for `protocol = "fastcgi"` pools, whose answers name no worker).
//! A 2xx answer within the timeout is healthy. A failed probe can hand its
//! connection, still open, back to the caller (`probe_keeping`): on a shared
//! queue, the worker holding the other end of it is the one that failed.
use std::time::Duration;

use super::fcgi;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How to ask a FastCGI worker for `health_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastCgiProbe {
    /// The pool's route without a trailing slash (SCRIPT_NAME's prefix).
    pub route: String,
    /// The pool's document root: SCRIPT_FILENAME is health_path in it.
    pub document_root: Option<String>,
}

/// One probe's result, and the worker that answered (its
/// `X-Cgipool-Worker`, when it sent a head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed {
    /// Err says why it is unhealthy.
    pub result: Result<(), String>,
    pub worker: Option<String>,
    /// No answer came within the timeout (the request may still be running).
    pub unanswered: bool,
}

/// Probes one socket; Err says why it is unhealthy.
#[cfg(test)]
pub async fn probe(
    socket: &str,
    path: &str,
    timeout: Duration,
    fastcgi: Option<&FastCgiProbe>,
) -> Result<(), String> {
    probe_named(socket, path, timeout, fastcgi).await.result
}

/// Probes one socket and says which worker answered.
pub async fn probe_named(
    socket: &str,
    path: &str,
    timeout: Duration,
    fastcgi: Option<&FastCgiProbe>,
) -> Probed {
    probe_keeping(socket, path, timeout, fastcgi).await.0
}

/// Probes one socket; on a failure after connecting, also returns the
/// connection, still open (whoever accepted it still holds its other end).
pub async fn probe_keeping(
    socket: &str,
    path: &str,
    timeout: Duration,
    fastcgi: Option<&FastCgiProbe>,
) -> (Probed, Option<UnixStream>) {
    let deadline = tokio::time::Instant::now() + timeout;
    let failed = |why: String, unanswered: bool| Probed {
        result: Err(why),
        worker: None,
        unanswered,
    };
    let no_answer = || format!("no answer within {}ms", timeout.as_millis());
    let mut s = match tokio::time::timeout_at(deadline, UnixStream::connect(socket)).await {
        Err(_) => return (failed(no_answer(), true), None),
        Ok(Err(e)) => return (failed(format!("connect: {e}"), false), None),
        Ok(Ok(s)) => s,
    };
    let answer = async {
        match fastcgi {
            Some(f) => fastcgi_status(&mut s, path, f)
                .await
                .map(|code| (code, None)),
            None => status(&mut s, path).await,
        }
    };
    let probed = match tokio::time::timeout_at(deadline, answer).await {
        Err(_) => failed(no_answer(), true),
        Ok(Err(e)) => failed(e, false),
        Ok(Ok((code, worker))) if (200..300).contains(&code) => Probed {
            result: Ok(()),
            worker,
            unanswered: false,
        },
        Ok(Ok((code, worker))) => Probed {
            result: Err(format!("answered {code}")),
            worker,
            unanswered: false,
        },
    };
    let kept = probed.result.is_err().then_some(s);
    (probed, kept)
}

async fn status(s: &mut UnixStream, path: &str) -> Result<(u16, Option<String>), String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: cgipool-watch\r\nUser-Agent: cgipool-watch\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    if !head.windows(2).any(|w| w == b"\r\n") {
        return Err("closed before a status line".into());
    }
    let code = parse_status(&head).ok_or_else(|| "no HTTP status line".to_string())?;
    Ok((code, worker_header(&head)))
}

/// The `X-Cgipool-Worker` field of a response head (`pool@n`).
fn worker_header(head: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    text.split("\r\n")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("x-cgipool-worker"))
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Bytes of STDOUT the FastCGI probe reads at most for the header block.
const FASTCGI_HEAD_LIMIT: usize = 16 * 1024;

/// The status of one FastCGI request for `path` (split like nginx does for
/// the pool's location: SCRIPT_NAME under the route, SCRIPT_FILENAME in the
/// document root).
async fn fastcgi_status(s: &mut UnixStream, path: &str, f: &FastCgiProbe) -> Result<u16, String> {
    let (script_path, query) = path.split_once('?').unwrap_or((path, ""));
    let script_name = format!("{}{script_path}", f.route);
    let uri = format!("{}{path}", f.route);
    let filename = match &f.document_root {
        Some(root) => format!("{}{script_path}", root.trim_end_matches('/')),
        None => script_name.clone(),
    };
    let params = [
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_SOFTWARE", "cgipool-watch"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("SERVER_NAME", "cgipool-watch"),
        ("SERVER_ADDR", "127.0.0.1"),
        ("SERVER_PORT", "80"),
        ("REMOTE_ADDR", "127.0.0.1"),
        ("REMOTE_PORT", "0"),
        ("REQUEST_SCHEME", "http"),
        ("REQUEST_METHOD", "GET"),
        ("REQUEST_URI", &uri),
        ("DOCUMENT_URI", &script_name),
        ("SCRIPT_NAME", &script_name),
        ("SCRIPT_FILENAME", &filename),
        ("DOCUMENT_ROOT", f.document_root.as_deref().unwrap_or("")),
        ("QUERY_STRING", query),
        ("CONTENT_LENGTH", ""),
        ("CONTENT_TYPE", ""),
        ("REDIRECT_STATUS", "200"),
        ("HTTP_HOST", "cgipool-watch"),
        ("HTTP_USER_AGENT", "cgipool-watch"),
    ];
    s.write_all(&fcgi::encode_request(&params))
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut reader = fcgi::Reader::new(FASTCGI_HEAD_LIMIT);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a FastCGI answer".into());
        }
        if reader.feed(&buf[..n])? {
            break;
        }
    }
    let r = &reader.response;
    match (r.status, r.ended) {
        (Some(code), _) => Ok(code),
        (None, Some(status)) => Err(format!(
            "the request ended without a CGI header block (protocol status {status})"
        )),
        (None, None) => Err("no FastCGI answer".into()),
    }
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nX: y"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b"HTTP/1.1 abc\r\n"), None);
        assert_eq!(
            worker_header(b"HTTP/1.1 200 OK\r\nX-Cgipool-Worker: search@3\r\n\r\n"),
            Some("search@3".into())
        );
        assert_eq!(
            worker_header(b"HTTP/1.1 200 OK\r\nx-cgipool-worker:a@1\r\n\r\nX-Cgipool-Worker: b@2"),
            Some("a@1".into())
        );
        assert_eq!(worker_header(b"HTTP/1.1 200 OK\r\n\r\n"), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn probes_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let p = path.to_string_lossy().into_owned();
        let server = tokio::spawn(async move {
            for answer in [
                "HTTP/1.1 200 OK\r\n\r\n",
                "HTTP/1.1 503 No\r\n\r\n",
                "HTTP/1.1 500 No\r\nX-Cgipool-Worker: p@2\r\n\r\n",
            ] {
                let (mut c, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf).await.unwrap();
                c.write_all(answer.as_bytes()).await.unwrap();
            }
            listener
        });
        assert_eq!(
            probe(&p, "/healthz", Duration::from_secs(2), None).await,
            Ok(())
        );
        assert_eq!(
            probe(&p, "/healthz", Duration::from_secs(2), None).await,
            Err("answered 503".into())
        );
        assert_eq!(
            probe_named(&p, "/healthz", Duration::from_secs(2), None).await,
            Probed {
                result: Err("answered 500".into()),
                worker: Some("p@2".into()),
                unanswered: false,
            }
        );
        let _listener = server.await.unwrap();
        // Nobody accepts any more: the connection waits in the backlog.
        assert!(probe(&p, "/healthz", Duration::from_millis(200), None)
            .await
            .unwrap_err()
            .contains("no answer"));
    }

    /// A failed probe hands back its connection, still open: the kernel
    /// names the socket that accepted it (what watch looks for in the
    /// workers' file tables), and none while nobody has accepted it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_probe_keeps_its_connection() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let inode = |fd: i32| {
            std::fs::metadata(format!("/proc/self/fd/{fd}"))
                .unwrap()
                .ino() as u32
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let p = path.to_string_lossy().into_owned();
        let f = FastCgiProbe {
            route: "/php".into(),
            document_root: None,
        };
        let t = Duration::from_millis(200);
        // Nobody accepts: no answer, and no peer yet.
        let (probed, kept) = probe_keeping(&p, "/health.php", t, Some(&f)).await;
        assert!(probed.unanswered && probed.result.is_err(), "{probed:?}");
        let waiting = kept.expect("the connection is kept");
        let s = super::super::sockdiag::by_inode(&[inode(waiting.as_raw_fd())]).unwrap();
        assert_eq!(s[0].peer, None, "nobody accepted it");
        // Accepted (the one waiting, then the next) and never answered.
        let (first, _) = listener.accept().unwrap();
        drop(waiting);
        drop(first);
        listener.set_nonblocking(true).unwrap();
        let accept = async {
            loop {
                if let Ok((c, _)) = listener.accept() {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let ((probed, kept), taken) =
            tokio::join!(probe_keeping(&p, "/health.php", t, Some(&f)), accept);
        assert!(probed.unanswered, "{probed:?}");
        let kept = kept.expect("the connection is kept");
        let s = super::super::sockdiag::by_inode(&[inode(kept.as_raw_fd())]).unwrap();
        assert_eq!(s[0].peer, Some(inode(taken.as_raw_fd())));
        // A passing probe keeps nothing.
        let answered = tokio::net::UnixListener::bind(dir.path().join("ok.sock")).unwrap();
        let server = tokio::spawn(async move {
            let (mut c, _) = answered.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf).await.unwrap();
            c.write_all(b"HTTP/1.1 204 OK\r\n\r\n").await.unwrap();
        });
        let ok = dir.path().join("ok.sock").to_string_lossy().into_owned();
        let (probed, kept) = probe_keeping(&ok, "/h", Duration::from_secs(2), None).await;
        assert_eq!(probed.result, Ok(()));
        assert!(kept.is_none());
        server.await.unwrap();
    }

    /// A FastCGI responder on a real socket: it gets the probe's request
    /// with the script split like nginx's location, and its CGI Status
    /// decides health.
    #[tokio::test(flavor = "current_thread")]
    async fn probes_a_fastcgi_worker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let p = path.to_string_lossy().into_owned();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for stdout in [
                &b"Content-Type: text/plain\r\n\r\nok"[..],
                &b"Status: 500 Internal Server Error\r\n\r\n"[..],
                &b"garbage"[..],
            ] {
                let (mut c, _) = listener.accept().await.unwrap();
                // Read the request up to its empty STDIN record.
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.ends_with(&[1, fcgi::STDIN, 0, 1, 0, 0, 0, 0]) {
                    let n = c.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    req.extend_from_slice(&buf[..n]);
                }
                seen.push(req);
                let mut out = vec![1, fcgi::STDOUT, 0, 1, 0, stdout.len() as u8, 0, 0];
                out.extend_from_slice(stdout);
                if stdout == b"garbage" {
                    out = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
                }
                c.write_all(&out).await.unwrap();
            }
            seen
        });
        let f = FastCgiProbe {
            route: "/php".into(),
            document_root: Some("/srv/php/".into()),
        };
        let t = Duration::from_secs(2);
        assert_eq!(probe(&p, "/health.php?x=1", t, Some(&f)).await, Ok(()));
        assert_eq!(
            probe(&p, "/health.php", t, Some(&f)).await,
            Err("answered 500".into())
        );
        assert!(probe(&p, "/health.php", t, Some(&f))
            .await
            .unwrap_err()
            .contains("not a FastCGI record"));
        let seen = server.await.unwrap();
        let params = String::from_utf8_lossy(&seen[0]);
        for want in [
            "SCRIPT_FILENAME/srv/php/health.php",
            "SCRIPT_NAME/php/health.php",
            "REQUEST_URI/php/health.php?x=1",
            "QUERY_STRINGx=1",
            "REQUEST_METHODGET",
        ] {
            assert!(params.contains(want), "{want} not in {params:?}");
        }
    }
}
