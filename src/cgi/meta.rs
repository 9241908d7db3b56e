//! RFC 3875 §4.1 meta-variables for one request.
//!
//! Meta-variables are byte strings: what the request carries besides ASCII
//! (obs-text in a header value or in the request target, a percent-encoded
//! byte in the path) reaches the program unchanged, never as U+FFFD.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use super::http::Request;

/// What the gateway knows besides the request.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The pool's route, e.g. `/git`; becomes SCRIPT_NAME.
    pub route: &'a str,
    /// DOCUMENT_ROOT; PATH_TRANSLATED is DOCUMENT_ROOT + PATH_INFO.
    pub document_root: &'a str,
    /// The program, for SCRIPT_FILENAME.
    pub program: &'a str,
}

pub const SERVER_SOFTWARE: &str = concat!("cgipool/", env!("CARGO_PKG_VERSION"));

/// Request header fields that never become HTTP_* variables: the two that
/// have their own variables, hop-by-hop fields, and `Proxy` (httpoxy: a
/// client must not be able to set HTTP_PROXY for the program).
const NOT_PASSED: &[&str] = &[
    "content-length",
    "content-type",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy",
];

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes a path: every `%` is followed by exactly two hex digits
/// (`%+2`, `%2` and `%2g` are refused, unlike `u8::from_str_radix`, which
/// takes a sign); None for a malformed escape or a NUL byte.
pub fn percent_decode(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex_digit(*b.get(i + 1)?)?;
            let lo = hex_digit(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    (!out.contains(&0)).then_some(out)
}

/// SCRIPT_NAME and PATH_INFO for a decoded path under `route`, or None when
/// the path is not under the route (`/gitx` for route `/git`).
pub fn split_route<'p>(route: &str, path: &'p [u8]) -> Option<(String, &'p [u8])> {
    let script = route.trim_end_matches('/');
    let rest = path.strip_prefix(script.as_bytes())?;
    (rest.is_empty() || rest[0] == b'/').then(|| (script.to_string(), rest))
}

/// `Host` without its port, and the port if one was given.
fn split_host(host: &str) -> (&str, Option<&str>) {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        if let Some((addr, after)) = rest.split_once(']') {
            let port = after.strip_prefix(':');
            return (&host[..addr.len() + 2], port);
        }
        return (host, None);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (host, None),
    }
}

fn http_var_name(header: &str) -> Option<String> {
    // A field name with `_` could pose as another one after the mapping
    // (X_Real_IP vs X-Real-IP); nginx drops those by default, so do we.
    if header.contains('_') {
        return None;
    }
    Some(format!(
        "HTTP_{}",
        header.to_ascii_uppercase().replace('-', "_")
    ))
}

/// The meta-variables (name, value) for `req`, or the status and reason to
/// refuse it (404 outside the route, 400 for a path the program must not see).
pub fn variables(
    req: &Request,
    cx: &Context<'_>,
    content_length: Option<u64>,
) -> Result<Vec<(String, OsString)>, (u16, &'static str)> {
    let (raw_path, query) = match req.target.iter().position(|&b| b == b'?') {
        Some(q) => (&req.target[..q], Some(&req.target[q + 1..])),
        None => (req.target.as_slice(), None),
    };
    let path = percent_decode(raw_path).ok_or((400, "malformed percent-encoding in the path"))?;
    if path
        .split(|&b| b == b'/')
        .any(|seg| seg == b".." || seg == b".")
    {
        return Err((400, "dot segments in the path"));
    }
    let (script_name, path_info) =
        split_route(cx.route, &path).ok_or((404, "path is not under the pool's route"))?;

    let mut v: Vec<(String, OsString)> = Vec::with_capacity(32);
    let mut set = |k: &str, val: OsString| v.push((k.to_string(), val));
    let s = |x: &str| OsString::from(x);
    let bytes = |x: &[u8]| OsString::from_vec(x.to_vec());

    set("GATEWAY_INTERFACE", s("CGI/1.1"));
    set("SERVER_SOFTWARE", s(SERVER_SOFTWARE));
    set("SERVER_PROTOCOL", s(&req.version));
    set("REQUEST_METHOD", s(&req.method));
    set("REQUEST_URI", bytes(&req.target));
    set("SCRIPT_NAME", s(&script_name));
    set("SCRIPT_FILENAME", s(cx.program));
    set("QUERY_STRING", bytes(query.unwrap_or(b"")));
    set("DOCUMENT_ROOT", s(cx.document_root));
    if !path_info.is_empty() {
        set("PATH_INFO", bytes(path_info));
        let mut translated = cx.document_root.trim_end_matches('/').as_bytes().to_vec();
        translated.extend_from_slice(path_info);
        set("PATH_TRANSLATED", OsString::from_vec(translated));
    }

    let https = req
        .header("X-Forwarded-Proto")
        .is_some_and(|p| p.eq_ignore_ascii_case("https"));
    set("REQUEST_SCHEME", s(if https { "https" } else { "http" }));
    if https {
        set("HTTPS", s("on"));
    }
    let (server_name, host_port) = split_host(req.header("Host").unwrap_or(""));
    set(
        "SERVER_NAME",
        s(if server_name.is_empty() {
            "localhost"
        } else {
            server_name
        }),
    );
    let port = req
        .header("X-Forwarded-Port")
        .filter(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
        .or(host_port)
        .unwrap_or(if https { "443" } else { "80" });
    set("SERVER_PORT", s(port));

    // nginx sets X-Real-IP to the client address (trusted: only nginx's
    // group can connect to the worker socket).
    let remote = req
        .header("X-Real-IP")
        .filter(|a| a.parse::<std::net::IpAddr>().is_ok())
        .unwrap_or("127.0.0.1");
    set("REMOTE_ADDR", s(remote));
    set("REMOTE_HOST", s(remote));

    if let Some(n) = content_length.filter(|&n| n > 0) {
        set("CONTENT_LENGTH", s(&n.to_string()));
    }
    if let Some(ct) = req.header_bytes("Content-Type") {
        set("CONTENT_TYPE", bytes(ct));
    }
    if let Some(auth) = req.header_bytes("Authorization") {
        if let Some(scheme) = auth
            .split(|b| b.is_ascii_whitespace())
            .find(|w| !w.is_empty())
        {
            set("AUTH_TYPE", bytes(scheme));
        }
    }

    // Fields listed in Connection are hop-by-hop too.
    let connection_listed: Vec<Vec<u8>> = req
        .header_all("Connection")
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .collect();
    let mut http: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, value) in &req.headers {
        let lower = name.to_ascii_lowercase();
        if NOT_PASSED.contains(&lower.as_str())
            || connection_listed.iter().any(|t| t == lower.as_bytes())
        {
            continue;
        }
        let Some(var) = http_var_name(name) else {
            continue;
        };
        let sep: &[u8] = if lower == "cookie" { b"; " } else { b", " };
        match http.iter_mut().find(|(k, _)| *k == var) {
            Some((_, existing)) => {
                existing.extend_from_slice(sep);
                existing.extend_from_slice(value);
            }
            None => http.push((var, value.clone())),
        }
    }
    for (k, val) in http {
        set(&k, OsString::from_vec(val));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, target: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: method.into(),
            target: target.as_bytes().to_vec(),
            version: "HTTP/1.1".into(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    const CX: Context<'static> = Context {
        route: "/git",
        document_root: "/srv/www",
        program: "/usr/lib/git-core/git-http-backend",
    };

    fn vars(r: &Request, cl: Option<u64>) -> Vec<(String, String)> {
        variables(r, &CX, cl)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_string_lossy().into_owned()))
            .collect()
    }

    fn get<'a>(v: &'a [(String, String)], k: &str) -> Option<&'a str> {
        v.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn rfc3875_variables_from_an_nginx_request() {
        let r = req(
            "POST",
            "/git/my%20repo.git/git-upload-pack?service=x&a=%41",
            &[
                ("Host", "example.org"),
                ("X-Real-IP", "192.0.2.7"),
                ("X-Forwarded-For", "192.0.2.7"),
                ("X-Forwarded-Proto", "https"),
                ("X-Request-ID", "abc"),
                ("Content-Type", "application/x-git-upload-pack-request"),
                ("Content-Length", "42"),
                ("Connection", "keep-alive, X-Hop"),
                ("X-Hop", "1"),
                ("Proxy", "http://evil:3128"),
                ("Transfer-Encoding", "chunked"),
                ("Authorization", "Basic dXNlcjpwdw=="),
                ("Accept", "a"),
                ("accept", "b"),
                ("Cookie", "a=1"),
                ("Cookie", "b=2"),
                ("X_Under", "no"),
            ],
        );
        let v = vars(&r, Some(42));
        let want = [
            ("GATEWAY_INTERFACE", "CGI/1.1"),
            ("SERVER_PROTOCOL", "HTTP/1.1"),
            ("REQUEST_METHOD", "POST"),
            (
                "REQUEST_URI",
                "/git/my%20repo.git/git-upload-pack?service=x&a=%41",
            ),
            ("SCRIPT_NAME", "/git"),
            ("SCRIPT_FILENAME", "/usr/lib/git-core/git-http-backend"),
            ("PATH_INFO", "/my repo.git/git-upload-pack"),
            ("PATH_TRANSLATED", "/srv/www/my repo.git/git-upload-pack"),
            ("QUERY_STRING", "service=x&a=%41"),
            ("DOCUMENT_ROOT", "/srv/www"),
            ("HTTPS", "on"),
            ("REQUEST_SCHEME", "https"),
            ("SERVER_NAME", "example.org"),
            ("SERVER_PORT", "443"),
            ("REMOTE_ADDR", "192.0.2.7"),
            ("REMOTE_HOST", "192.0.2.7"),
            ("CONTENT_LENGTH", "42"),
            ("CONTENT_TYPE", "application/x-git-upload-pack-request"),
            ("AUTH_TYPE", "Basic"),
            ("HTTP_HOST", "example.org"),
            ("HTTP_X_REAL_IP", "192.0.2.7"),
            ("HTTP_X_REQUEST_ID", "abc"),
            ("HTTP_AUTHORIZATION", "Basic dXNlcjpwdw=="),
            ("HTTP_ACCEPT", "a, b"),
            ("HTTP_COOKIE", "a=1; b=2"),
        ];
        for (k, val) in want {
            assert_eq!(get(&v, k), Some(val), "{k}");
        }
        for k in [
            "HTTP_PROXY",
            "HTTP_CONNECTION",
            "HTTP_X_HOP",
            "HTTP_TRANSFER_ENCODING",
            "HTTP_CONTENT_LENGTH",
            "HTTP_CONTENT_TYPE",
            "HTTP_X_UNDER",
        ] {
            assert_eq!(get(&v, k), None, "{k} must not be set");
        }
        assert!(get(&v, "SERVER_SOFTWARE").unwrap().starts_with("cgipool/"));
        // Every name appears once.
        let mut names: Vec<&String> = v.iter().map(|(k, _)| k).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len());
    }

    #[test]
    fn plain_get_defaults() {
        let v = vars(&req("GET", "/git", &[("Host", "h:8080")]), None);
        assert_eq!(get(&v, "PATH_INFO"), None);
        assert_eq!(get(&v, "PATH_TRANSLATED"), None);
        assert_eq!(get(&v, "QUERY_STRING"), Some(""));
        assert_eq!(get(&v, "SERVER_NAME"), Some("h"));
        assert_eq!(get(&v, "SERVER_PORT"), Some("8080"));
        assert_eq!(get(&v, "REMOTE_ADDR"), Some("127.0.0.1"));
        assert_eq!(get(&v, "HTTPS"), None);
        assert_eq!(get(&v, "CONTENT_LENGTH"), None);
        assert_eq!(get(&v, "CONTENT_TYPE"), None);
        let v = vars(
            &req(
                "GET",
                "/git/",
                &[
                    ("Host", "[::1]:81"),
                    ("X-Forwarded-Port", "8443"),
                    ("X-Real-IP", "junk"),
                ],
            ),
            Some(0),
        );
        assert_eq!(get(&v, "PATH_INFO"), Some("/"));
        assert_eq!(get(&v, "SERVER_NAME"), Some("[::1]"));
        assert_eq!(get(&v, "SERVER_PORT"), Some("8443"));
        assert_eq!(get(&v, "REMOTE_ADDR"), Some("127.0.0.1"));
        assert_eq!(get(&v, "CONTENT_LENGTH"), None);
    }

    #[test]
    fn route_splitting() {
        assert_eq!(
            split_route("/git", b"/git/a"),
            Some(("/git".into(), &b"/a"[..]))
        );
        assert_eq!(
            split_route("/git/", b"/git/a"),
            Some(("/git".into(), &b"/a"[..]))
        );
        assert_eq!(
            split_route("/git", b"/git"),
            Some(("/git".into(), &b""[..]))
        );
        assert_eq!(split_route("/git", b"/gitx"), None);
        assert_eq!(split_route("/git", b"/other"), None);
        assert_eq!(split_route("/", b"/x/y"), Some(("".into(), &b"/x/y"[..])));
    }

    #[test]
    fn refused_paths() {
        for (target, code) in [
            ("/other", 404),
            ("/gitweb", 404),
            ("/git/%zz", 400),
            ("/git/%4", 400),
            ("/git/a%00b", 400),
            ("/git/../etc/passwd", 400),
            ("/git/%2e%2e/x", 400),
            ("/git/./x", 400),
        ] {
            assert_eq!(
                variables(&req("GET", target, &[]), &CX, None)
                    .unwrap_err()
                    .0,
                code,
                "{target}"
            );
        }
    }

    /// Bytes that are not UTF-8 reach the program as they are.
    #[test]
    fn bytes_beyond_ascii_are_kept() {
        let mut r = req("GET", "/", &[]);
        r.target = b"/git/caf\xe9/%E9?q=\xe9".to_vec();
        r.headers = vec![
            ("X-Name".to_string(), b"caf\xe9".to_vec()),
            ("X-Name".to_string(), b"\xff".to_vec()),
            ("Content-Type".to_string(), b"text/plain; x=\xe9".to_vec()),
        ];
        let v = variables(&r, &CX, None).unwrap();
        let get = |k: &str| {
            v.iter()
                .find(|(n, _)| n == k)
                .map(|(_, val)| val.as_encoded_bytes().to_vec())
        };
        assert_eq!(get("REQUEST_URI").unwrap(), b"/git/caf\xe9/%E9?q=\xe9");
        assert_eq!(get("PATH_INFO").unwrap(), b"/caf\xe9/\xe9");
        assert_eq!(get("QUERY_STRING").unwrap(), b"q=\xe9");
        assert_eq!(get("HTTP_X_NAME").unwrap(), b"caf\xe9, \xff");
        assert_eq!(get("CONTENT_TYPE").unwrap(), b"text/plain; x=\xe9");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode(b"/a%20b%2Fc").unwrap(), b"/a b/c");
        assert_eq!(percent_decode(b"%e2%82%ac").unwrap(), "€".as_bytes());
        assert_eq!(percent_decode(b"%"), None);
        assert_eq!(percent_decode(b"%g0"), None);
        assert_eq!(percent_decode(b"/a%+2"), None);
        assert_eq!(percent_decode(b"/a%-2x"), None);
        assert_eq!(percent_decode(b"/a%2"), None);
        assert_eq!(percent_decode(b"/a% 2"), None);
        assert_eq!(percent_decode(b"%41%7a%7A").unwrap(), b"Azz");
    }
}
