//! The active health probe: `GET health_path` on a worker's own socket
//! (`queue = "per-worker"`) or on the pool's socket (`queue = "shared"`:
//! whichever worker accepts answers, and names itself in
//! `X-Cgipool-Worker`), the same way nginx reaches it. A 2xx answer within
//! the timeout is healthy.
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// One probe's result, and the worker that answered (its
/// `X-Cgipool-Worker`, when it sent a head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed {
    /// Err says why it is unhealthy.
    pub result: Result<(), String>,
    pub worker: Option<String>,
}

/// Probes one socket; Err says why it is unhealthy.
#[cfg(test)]
pub async fn probe(socket: &str, path: &str, timeout: Duration) -> Result<(), String> {
    probe_named(socket, path, timeout).await.result
}

/// Probes one socket and says which worker answered.
pub async fn probe_named(socket: &str, path: &str, timeout: Duration) -> Probed {
    match tokio::time::timeout(timeout, status(socket, path)).await {
        Err(_) => Probed {
            result: Err(format!("no answer within {}ms", timeout.as_millis())),
            worker: None,
        },
        Ok(Err(e)) => Probed {
            result: Err(e),
            worker: None,
        },
        Ok(Ok((code, worker))) if (200..300).contains(&code) => Probed {
            result: Ok(()),
            worker,
        },
        Ok(Ok((code, worker))) => Probed {
            result: Err(format!("answered {code}")),
            worker,
        },
    }
}

async fn status(socket: &str, path: &str) -> Result<(u16, Option<String>), String> {
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
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
        assert_eq!(probe(&p, "/healthz", Duration::from_secs(2)).await, Ok(()));
        assert_eq!(
            probe(&p, "/healthz", Duration::from_secs(2)).await,
            Err("answered 503".into())
        );
        assert_eq!(
            probe_named(&p, "/healthz", Duration::from_secs(2)).await,
            Probed {
                result: Err("answered 500".into()),
                worker: Some("p@2".into())
            }
        );
        let _listener = server.await.unwrap();
        // Nobody accepts any more: the connection waits in the backlog.
        assert!(probe(&p, "/healthz", Duration::from_millis(200))
            .await
            .unwrap_err()
            .contains("no answer"));
    }
}
