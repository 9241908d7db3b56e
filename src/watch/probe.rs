//! The active health probe: `GET health_path` on a worker's own socket,
//! the same way nginx reaches it. A 2xx answer within the timeout is healthy.
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Probes one worker; Err says why it is unhealthy.
pub async fn probe(socket: &str, path: &str, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, status(socket, path)).await {
        Err(_) => Err(format!("no answer within {}ms", timeout.as_millis())),
        Ok(Err(e)) => Err(e),
        Ok(Ok(code)) if (200..300).contains(&code) => Ok(()),
        Ok(Ok(code)) => Err(format!("answered {code}")),
    }
}

async fn status(socket: &str, path: &str) -> Result<u16, String> {
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: cgipool-watch\r\nUser-Agent: cgipool-watch\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        let n = s.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a status line".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status(&head).ok_or_else(|| "no HTTP status line".into())
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
    }

    #[tokio::test(flavor = "current_thread")]
    async fn probes_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let p = path.to_string_lossy().into_owned();
        let server = tokio::spawn(async move {
            for answer in ["HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 503 No\r\n\r\n"] {
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
        let _listener = server.await.unwrap();
        // Nobody accepts any more: the connection waits in the backlog.
        assert!(probe(&p, "/healthz", Duration::from_millis(200))
            .await
            .unwrap_err()
            .contains("no answer"));
    }
}
