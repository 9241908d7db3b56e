//! Validators for single values: absolute paths, durations, sizes, rates,
//! pool, user and unit names, environment variable names, routes and
//! health-check paths.

use std::ops::Range;
use std::path::PathBuf;

use super::diag::{get_str, get_str_list, type_err, Cx, Src};
use super::duration::duration_usec;
use super::model::{MAX_POOL_NAME, RESERVED_ROUTES};

pub(super) fn get_abs_path(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<PathBuf> {
    let s = get_str(cx, src)?;
    check_abs_path(cx, src.span(), &src.key, &s)
}

pub(super) fn check_abs_path(
    cx: &mut Cx<'_>,
    span: Option<Range<usize>>,
    key: &str,
    s: &str,
) -> Option<PathBuf> {
    if let Err(msg) = abs_path_problem(s) {
        cx.err(span, key, msg);
        return None;
    }
    Some(PathBuf::from(s))
}

/// Paths are written unquoted into unit and nginx files: keep them plain.
/// The running cgipool binary (the default `gateway` of CGI pools, and
/// what watch's unit runs), if its path can be written into a unit as is.
pub(super) fn own_binary() -> Result<(), String> {
    binary_problem(&crate::paths::cgipool_binary())
}

fn binary_problem(p: &std::path::Path) -> Result<(), String> {
    abs_path_problem(&p.display().to_string()).map_err(|m| {
        format!(
            "cgipool runs from {}, which cannot go into a unit file ({m}); install it elsewhere",
            p.display()
        )
    })
}

pub(crate) fn abs_path_problem(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err(format!("must be an absolute path, got {s:?}"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "\"'\\;{}%$#".contains(*c))
    {
        return Err(format!(
            "path {s:?} must not contain whitespace, quotes, backslashes or any of ; {{ }} % $ # (found {c:?})"
        ));
    }
    if s.split('/').any(|seg| seg == "..") {
        return Err(format!("path {s:?} must not contain `..`"));
    }
    Ok(())
}

/// A program to run (`exec`, `gateway`): an absolute path that names a
/// file, not a directory (systemd refuses an ExecStart= ending in `/`).
pub(super) fn get_program_path(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<PathBuf> {
    let p = get_abs_path(cx, src)?;
    if p.as_os_str().as_encoded_bytes().ends_with(b"/") {
        cx.err(
            src.span(),
            &src.key,
            format!(
                "{:?} names a directory: give the program's file",
                p.display().to_string()
            ),
        );
        return None;
    }
    Some(p)
}

pub(super) fn get_abs_path_list(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<Vec<PathBuf>> {
    let list = get_str_list(cx, src)?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, (s, span)) in list.iter().enumerate() {
        let key = format!("{}[{i}]", src.key);
        match check_abs_path(cx, span.clone(), &key, s) {
            Some(p) => out.push(p),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

// ---------------------------------------------------------------------------
// Value syntaxes
/// A duration: string in systemd syntax, or an integer number of seconds.
/// Returns microseconds.
pub(super) fn get_duration(cx: &mut Cx<'_>, src: &Src<'_>, allow_zero: bool) -> Option<u64> {
    let us = if let Some(i) = src.item.as_integer() {
        u64::try_from(i).ok().and_then(|i| i.checked_mul(1_000_000))
    } else if src.item.is_str() {
        let s = get_str(cx, src)?;
        duration_usec(&s)
    } else {
        type_err(cx, src, "a duration (e.g. \"100ms\", \"5s\", \"1min 30s\")");
        return None;
    };
    match us {
        Some(0) if !allow_zero => {
            cx.err(src.span(), &src.key, "must be greater than zero");
            None
        }
        Some(us) => Some(us),
        None => {
            cx.err(
                src.span(),
                &src.key,
                "invalid duration: use systemd syntax, e.g. \"100ms\", \"5s\", \"1min 30s\", \"2h\"",
            );
            None
        }
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// Positive decimal integer without leading zeros issues (parses as u64 > 0).
pub(super) fn positive(s: &str) -> bool {
    all_digits(s) && s.parse::<u64>().is_ok_and(|n| n > 0)
}

pub(super) fn percent(s: &str) -> Option<u64> {
    let n = s.strip_suffix('%')?;
    if !all_digits(n) {
        return None;
    }
    n.parse().ok()
}

/// systemd MemoryMax=: bytes with an optional K/M/G/T suffix, "infinity",
/// or a percentage 1..=100.
pub(super) fn memory_ok(s: &str) -> bool {
    if s == "infinity" {
        return true;
    }
    if let Some(p) = percent(s) {
        return (1..=100).contains(&p);
    }
    // systemd refuses (and then ignores: no limit at all) a size past u64.
    const UNITS: &[(char, u32)] = &[('K', 10), ('M', 20), ('G', 30), ('T', 40)];
    bytes_with_suffix(s, UNITS).is_some_and(|b| b > 0)
}

/// nginx size: bytes with an optional k/K/m/M/g/G suffix ("0" disables),
/// at most what nginx's offsets hold (i64).
pub(super) fn nginx_size_ok(s: &str) -> bool {
    const UNITS: &[(char, u32)] = &[
        ('k', 10),
        ('K', 10),
        ('m', 20),
        ('M', 20),
        ('g', 30),
        ('G', 30),
    ];
    bytes_with_suffix(s, UNITS).is_some_and(|b| b <= i64::MAX as u64)
}

/// `s` in bytes: decimal digits, then at most one suffix of `units` (a
/// power of two, by its exponent). None when it is not that or overflows u64.
fn bytes_with_suffix(s: &str, units: &[(char, u32)]) -> Option<u64> {
    let (digits, shift) = match units.iter().find(|(c, _)| s.ends_with(*c)) {
        Some((c, shift)) => (&s[..s.len() - c.len_utf8()], *shift),
        None => (s, 0),
    };
    if !all_digits(digits) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// nginx rate: "20r/s" or "600r/m".
pub(super) fn rate_ok(s: &str) -> bool {
    s.strip_suffix("r/s")
        .or_else(|| s.strip_suffix("r/m"))
        .is_some_and(|n| positive(n) && n.len() <= 9)
}

pub(super) fn pool_name_ok(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= MAX_POOL_NAME
}

/// User and group names: `[a-z_][a-z0-9_-]*`, at most 32 characters.
pub(super) fn user_name_ok(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && s.len() <= 32
}

pub(super) fn env_key_ok(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn route_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || "/_.~-".contains(c)
}

pub(super) fn unit_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || ":_.@-\\".contains(c))
        && s.ends_with(".service")
        && s.len() > ".service".len()
        // A template (`x@.service`) is no unit systemd can reload.
        && !s.starts_with('@')
        && !s.ends_with("@.service")
}

/// A probe path: sent verbatim in a request line, so no spaces or controls.
pub(super) fn health_path_problem(s: &str) -> Option<String> {
    if !s.starts_with('/') {
        return Some(format!("must start with `/`, got {s:?}"));
    }
    s.chars().find(|c| !(route_char_ok(*c) || "?=&%+".contains(*c))).map(|c| {
        format!("health_path {s:?} contains {c:?}: only letters, digits and / _ . ~ - ? = & % + are allowed")
    })
}

pub(super) fn route_problem(s: &str) -> Option<String> {
    if !s.starts_with('/') {
        return Some(format!("must start with `/`, got {s:?}"));
    }
    if let Some(c) = s.chars().find(|c| !route_char_ok(*c)) {
        return Some(format!(
            "route {s:?} contains {c:?}: only letters, digits and / _ . ~ - are allowed"
        ));
    }
    let trimmed = if s.len() > 1 {
        s.trim_end_matches('/')
    } else {
        s
    };
    for r in RESERVED_ROUTES {
        let reserved =
            trimmed == *r || (r.starts_with("/.") && trimmed.starts_with(&format!("{r}/")));
        if reserved {
            return Some(format!("route {s:?} is reserved for cgipool ({r})"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::binary_problem;
    use crate::config::tests::{errs, ok, one_err, pool_with};
    use pretty_assertions::assert_eq;

    #[test]
    fn own_binary_must_fit_in_a_unit() {
        assert_eq!(
            binary_problem(std::path::Path::new("/usr/bin/cgipool")),
            Ok(())
        );
        let e = binary_problem(std::path::Path::new("/home/a b/cgipool")).unwrap_err();
        assert!(
            e.contains("/home/a b/cgipool") && e.contains("whitespace"),
            "{e}"
        );
    }

    #[test]
    fn exec_and_paths() {
        for bad in [
            "bin/x",
            "/bin/my prog",
            "/bin/x%i",
            "/bin/$x",
            "/bin/\\\\x",
            "/bin/x;y",
            "/bin/'x'",
            "/a/../b",
        ] {
            let e = errs(&format!("[pool.p]\nexec = \"{bad}\"\nroute = \"/p\"\n"));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].contains("pool.p.exec"), "{bad}: {e:?}");
        }
        assert!(one_err("read_write_paths = [\"/ok\", \"rel\"]")
            .contains("pool.p.read_write_paths[1]: must be an absolute path"));
        assert!(one_err("read_only_paths = [\"/a b\"]").contains("read_only_paths[0]"));
        assert!(one_err("working_directory = \"srv\"").contains("must be an absolute path"));
        assert!(errs(
            "[nginx]\nlocations = \"/etc/x;y\"\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n"
        )[0]
        .contains("nginx.locations"));
    }

    #[test]
    fn control_characters_rejected() {
        assert!(one_err("description = \"a\\nb\"").contains("must not contain newlines"));
        assert!(one_err("args = [\"a\\tb\"]").contains("pool.p.args[0]: must not contain newlines"));
        assert!(one_err("environment = { A = \"x\\ny\" }")
            .contains("pool.p.environment.A: must not contain newlines"));
        assert!(one_err("description = 'ends with \\'").contains("must not end with a backslash"));
    }

    #[test]
    fn environment_keys() {
        assert!(one_err("environment = { CGIPOOL_WORKER = \"1\" }").contains("reserved"));
        assert_eq!(
            one_err("environment = { CGIPOOL_ACCESS_LOG = \"1\" }"),
            "t.toml:4:17: pool.p.environment.CGIPOOL_ACCESS_LOG: CGIPOOL_ACCESS_LOG is reserved (cgipool or systemd sets it)"
        );
        // The workers' state reports go to systemd's socket.
        assert!(one_err("environment = { NOTIFY_SOCKET = \"\" }").contains("reserved"));
        assert!(ok(&pool_with(
            "environment = { CGIPOOL_TEST_DELAY_MS = \"20\" }"
        ))
        .pools["p"]
            .environment
            .contains_key("CGIPOOL_TEST_DELAY_MS"));
        assert!(one_err("environment = { \"1A\" = \"1\" }")
            .contains("invalid environment variable name"));
        assert!(one_err("environment = { \"A-B\" = \"1\" }")
            .contains("invalid environment variable name"));
        let c = ok(&pool_with(
            "[pool.p.environment]\nFOO = 'a % $HOME \" \\ ; b'",
        ));
        assert_eq!(c.pools["p"].environment["FOO"], r#"a % $HOME " \ ; b"#);
    }

    #[test]
    fn routes() {
        for bad in [
            "api",
            "/a b",
            "/a;b",
            "/a{b}",
            "/a\\\"b",
            "/a'b",
            "/a\\\\b",
            "/a$b",
            "/pool-status",
            "/metrics",
            "/metrics/",
            "/.cgipool",
            "/.cgipool/generation",
        ] {
            let e = errs(&format!("[pool.p]\nexec = \"/bin/p\"\nroute = \"{bad}\"\n"));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].contains("pool.p.route"), "{bad}: {e:?}");
        }
        for good in ["/", "/api/v1.2/search_x-y~z", "/metrics2", "/.well-known"] {
            ok(&format!(
                "[pool.p]\nexec = \"/bin/p\"\nroute = \"{good}\"\n"
            ));
        }
        assert!(errs("[pool.p]\nexec = \"/bin/p\"\n")[0].contains("missing required key `route`"));
    }

    #[test]
    fn value_syntaxes() {
        for good in [
            "memory_max = \"256M\"",
            "memory_max = \"1G\"",
            "memory_max = \"infinity\"",
            "memory_max = \"100%\"",
            "memory_max = \"1048576\"",
            "cpu_quota = \"50%\"",
            "cpu_quota = \"200%\"",
            "tasks_max = \"infinity\"",
            "tasks_max = \"12\"",
            "body_limit = \"0\"",
            "body_limit = \"512k\"",
            "rate_limit = \"600r/m\"",
            "request_timeout = \"1500ms\"",
            "watchdog_sec = \"1min 30s\"",
            "user = \"_svc-1\"",
            "protocol = \"http\"",
            "protocol = \"cgi\"",
            "gateway = \"/usr/bin/cgipool\"",
            "max_connections = 1",
            "slow_request = \"5s\"",
            "slow_request = \"1min 30s\"",
        ] {
            ok(&pool_with(good));
        }
        for (bad, msg) in [
            ("memory_max = \"256MB\"", "invalid memory size"),
            ("memory_max = \"101%\"", "invalid memory size"),
            ("memory_max = 256", "expected a string"),
            ("cpu_quota = \"50\"", "invalid CPU quota"),
            ("cpu_quota = \"0%\"", "invalid CPU quota"),
            ("tasks_max = 0", "must be at least 1"),
            (
                "tasks_max = \"lots\"",
                "expected an integer or \"infinity\"",
            ),
            ("body_limit = \"1 m\"", "invalid size"),
            ("body_limit = \"1m;\"", "invalid size"),
            ("rate_limit = \"20/s\"", "invalid rate"),
            ("rate_limit = \"0r/s\"", "invalid rate"),
            ("rate_limit = \"20r/s; evil\"", "invalid rate"),
            (
                "request_timeout = \"1500us\"",
                "whole number of milliseconds",
            ),
            ("request_timeout = \"0\"", "greater than zero"),
            ("request_timeout = \"60s;\"", "invalid duration"),
            ("watchdog_sec = \"soon\"", "invalid duration"),
            ("restart_sec = true", "expected a duration"),
            ("user = \"Root\"", "invalid user name"),
            ("user = \"a b\"", "invalid user name"),
            ("gateway = \"cgipool\"", "must be an absolute path"),
            (
                "gateway = \"/usr/local/bin/cgi pool\"",
                "must not contain whitespace",
            ),
            (
                "protocol = \"scgi\"",
                "expected \"http\", \"cgi\" or \"fastcgi\"",
            ),
            ("max_connections = 0", "must be between 1 and"),
            ("burst = -1", "must be between 0 and"),
            ("slow_request = \"0\"", "greater than zero"),
            ("slow_request = \"soon\"", "invalid duration"),
            ("slow_request = true", "expected a duration"),
        ] {
            let e = one_err(bad);
            assert!(e.contains(msg), "{bad}: {e}");
            assert!(e.starts_with("t.toml:4:"), "{bad}: {e}");
        }
    }
}
