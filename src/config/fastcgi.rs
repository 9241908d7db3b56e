//! FastCGI pool keys (`protocol = "fastcgi"`): `listen_fd`, `keep_conn`,
//! `document_root` and `index`, the checks that tie them to the protocol
//! (and to php-cgi), and the document root's checks on the host (absolute,
//! an existing directory that nginx's user can read).

use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::diag::{get_bool, get_str, Cx, Src};
use super::model::{FastCgi, ListenFd, Protocol};
use super::values::check_abs_path;

/// The keys only `protocol = "fastcgi"` pools take.
pub(super) const FASTCGI_KEYS: &[&str] = &[
    "listen_fd",
    "keep_conn",
    "document_root",
    "index",
    "pcre_jit",
];

/// The user Debian's nginx runs as (`user www-data;` in nginx.conf): the
/// document root must be readable by it.
pub const NGINX_USER: &str = "www-data";

/// Longest pool name of a php-cgi pool with a dynamic user: its workers
/// share the user `cgipool-<pool>` (sessions), and user names have at most
/// 31 characters.
const MAX_PHP_POOL_NAME: usize = 31 - "cgipool-".len();

/// A value with where it was written.
type At<T> = (T, Option<Range<usize>>, String);

#[derive(Default)]
pub(super) struct FastCgiFields {
    listen_fd: Option<At<ListenFd>>,
    keep_conn: Option<At<bool>>,
    document_root: Option<At<PathBuf>>,
    index: Option<At<String>>,
    pcre_jit: Option<At<bool>>,
    /// `document_root` was written (even if invalid: one error is enough).
    document_root_given: bool,
}

impl FastCgiFields {
    /// Where the first FastCGI key was written (for "not with this protocol").
    fn first_given(&self) -> Option<(Option<Range<usize>>, String, &'static str)> {
        fn at<T>(
            a: &Option<At<T>>,
            name: &'static str,
        ) -> Option<(Option<Range<usize>>, String, &'static str)> {
            a.as_ref().map(|(_, s, k)| (s.clone(), k.clone(), name))
        }
        at(&self.listen_fd, "listen_fd")
            .or_else(|| at(&self.keep_conn, "keep_conn"))
            .or_else(|| at(&self.document_root, "document_root"))
            .or_else(|| at(&self.index, "index"))
            .or_else(|| at(&self.pcre_jit, "pcre_jit"))
    }
}

/// Parse one FastCGI key into `f`.
pub(super) fn apply_field(cx: &mut Cx<'_>, f: &mut FastCgiFields, src: &Src<'_>) {
    let sp = src.span();
    let key = src.key.clone();
    match src.name.as_str() {
        "listen_fd" => {
            if let Some(s) = get_str(cx, src) {
                match s.as_str() {
                    "stdin" => f.listen_fd = Some((ListenFd::Stdin, sp, key)),
                    "systemd" => f.listen_fd = Some((ListenFd::Systemd, sp, key)),
                    _ => cx.err(
                        sp,
                        &key,
                        format!("expected \"stdin\" or \"systemd\", got {s:?}"),
                    ),
                }
            }
        }
        "keep_conn" => {
            if let Some(b) = get_bool(cx, src) {
                f.keep_conn = Some((b, sp, key));
            }
        }
        "pcre_jit" => {
            if let Some(b) = get_bool(cx, src) {
                f.pcre_jit = Some((b, sp, key));
            }
        }
        "document_root" => {
            f.document_root_given = true;
            if let Some(s) = get_str(cx, src) {
                if let Some(p) = check_abs_path(cx, sp.clone(), &key, &s) {
                    match document_root_problem(&p) {
                        Some(msg) => cx.err(sp, &key, msg),
                        None => f.document_root = Some((p, sp, key)),
                    }
                }
            }
        }
        "index" => {
            if let Some(s) = get_str(cx, src) {
                let ok = !s.is_empty()
                    && s.len() <= 64
                    && s != "."
                    && s != ".."
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
                if ok {
                    f.index = Some((s, sp, key));
                } else {
                    cx.err(
                        sp,
                        &key,
                        format!("invalid index {s:?}: a file name of letters, digits and . _ -"),
                    );
                }
            }
        }
        _ => {}
    }
}

/// True for Debian's php-cgi and its versioned names (`php-cgi8.2`).
pub fn is_php_cgi(exec: &Path) -> bool {
    exec.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("php-cgi"))
        .is_some_and(|v| v.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// What the pool's protocol makes of the FastCGI keys: `Some` for
/// `protocol = "fastcgi"` (with the php-cgi defaults), `None` otherwise.
/// Keys that do not fit the protocol or the program are errors, reported at
/// the key (or at the pool when the problem is a missing key).
#[allow(clippy::too_many_arguments)]
pub(super) fn finish(
    cx: &mut Cx<'_>,
    f: FastCgiFields,
    protocol: Protocol,
    exec: Option<&Path>,
    pool_name: &str,
    dynamic_user: bool,
    notify: Option<At<bool>>,
    here: (Option<Range<usize>>, String),
) -> Option<FastCgi> {
    if protocol != Protocol::FastCgi {
        if let Some((span, key, name)) = f.first_given() {
            cx.err(
                span,
                &key,
                format!("`{name}` is only for protocol = \"fastcgi\" pools"),
            );
        }
        return None;
    }
    let php = exec.is_some_and(is_php_cgi);
    let listen_fd = match (&f.listen_fd, php) {
        (Some((v, _, _)), _) => *v,
        (None, true) => ListenFd::Stdin,
        (None, false) => ListenFd::Systemd,
    };
    if php {
        if let Some((true, span, key)) = &f.keep_conn {
            cx.err(
                span.clone(),
                key,
                "php-cgi serves one connection at a time: with keep_conn an idle nginx connection holds the whole worker",
            );
        }
        if let Some((ListenFd::Systemd, span, key)) = &f.listen_fd {
            cx.err(
                span.clone(),
                key,
                "php-cgi only serves FastCGI on its stdin: use listen_fd = \"stdin\" (the default for php-cgi)",
            );
        }
        if !f.document_root_given {
            cx.err(
                here.0.clone(),
                &format!("{}.document_root", here.1),
                "php-cgi pools need `document_root` (the directory of the .php scripts nginx passes to them)",
            );
        }
        if dynamic_user && pool_name.len() > MAX_PHP_POOL_NAME {
            cx.err(
                here.0.clone(),
                &here.1,
                format!("a php-cgi pool's name has at most {MAX_PHP_POOL_NAME} characters (its workers share the user cgipool-<pool>), or set `user`"),
            );
        }
    }
    if let (false, Some((_, span, key))) = (php, &f.pcre_jit) {
        cx.err(span.clone(), key, "`pcre_jit` is only for php-cgi pools");
    }
    if let Some((true, span, key)) = &notify {
        if listen_fd == ListenFd::Stdin || php {
            cx.err(
                span.clone(),
                key,
                "notify is not available with listen_fd = \"stdin\" or php-cgi (they do not send READY=1)",
            );
        }
    }
    if let (Some((_, span, key)), false) = (&f.index, f.document_root_given) {
        cx.err(span.clone(), key, "`index` needs `document_root`");
    }
    Some(FastCgi {
        listen_fd,
        keep_conn: f.keep_conn.is_some_and(|(v, _, _)| v),
        document_root: f.document_root.map(|(p, _, _)| p),
        index: f
            .index
            .map_or_else(|| "index.php".to_string(), |(s, _, _)| s),
        php,
        pcre_jit: f.pcre_jit.is_some_and(|(v, _, _)| v),
    })
}

/// Why nginx could not serve `dir`: missing, not a directory, or not
/// readable by [`NGINX_USER`].
fn document_root_problem(dir: &Path) -> Option<String> {
    match std::fs::metadata(dir) {
        Err(e) => return Some(format!("document root {}: {e}", dir.display())),
        Ok(m) if !m.is_dir() => {
            return Some(format!(
                "document root {} is not a directory",
                dir.display()
            ))
        }
        Ok(_) => {}
    }
    let reader = Reader::nginx();
    let mut path = PathBuf::from("/");
    let mut checks = vec![(path.clone(), 0o1)];
    for c in dir.components().skip(1) {
        path.push(c);
        checks.push((path.clone(), 0o1));
    }
    if let Some(last) = checks.last_mut() {
        last.1 = 0o5;
    }
    for (p, want) in checks {
        let Ok(m) = std::fs::metadata(&p) else {
            return Some(format!("cannot read {}", p.display()));
        };
        if !reader.may(&m, want) {
            let what = if want == 0o5 { "read" } else { "enter" };
            return Some(format!(
                "nginx's user {} cannot {what} {} (mode {:o}, owner {}:{}); nginx serves the static files from the document root",
                reader.name,
                p.display(),
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            ));
        }
    }
    None
}

/// Who reads the document root: nginx's user, or "anyone" when that user
/// does not exist here (then only the permissions for others count).
struct Reader {
    name: String,
    uid: Option<u32>,
    gids: Vec<u32>,
}

impl Reader {
    fn nginx() -> Reader {
        let user = nix::unistd::User::from_name(NGINX_USER).ok().flatten();
        match user {
            Some(u) => {
                let gids = std::ffi::CString::new(NGINX_USER)
                    .ok()
                    .and_then(|c| nix::unistd::getgrouplist(&c, u.gid).ok())
                    .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                    .unwrap_or_else(|| vec![u.gid.as_raw()]);
                Reader {
                    name: NGINX_USER.to_string(),
                    uid: Some(u.uid.as_raw()),
                    gids,
                }
            }
            None => Reader {
                name: format!("(any user: {NGINX_USER} does not exist)"),
                uid: None,
                gids: Vec::new(),
            },
        }
    }

    /// Permission bits `want` (r=4, x=1) for this reader on `m`.
    fn may(&self, m: &std::fs::Metadata, want: u32) -> bool {
        let mode = m.mode();
        let bits = if self.uid == Some(0) {
            return true;
        } else if self.uid == Some(m.uid()) {
            (mode >> 6) & 7
        } else if self.gids.contains(&m.gid()) {
            (mode >> 3) & 7
        } else {
            mode & 7
        };
        bits & want == want
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{errs, ok};
    use std::os::unix::fs::PermissionsExt;

    fn php_pool(extra: &str) -> String {
        format!("[pool.php]\nprotocol = \"fastcgi\"\nexec = \"/usr/bin/php-cgi8.2\"\nroute = \"/php\"\n{extra}\n")
    }

    fn docroot() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        // tempdir() is 0700: make it and its parent readable for nginx.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    #[test]
    fn php_cgi_names() {
        for yes in ["/usr/bin/php-cgi", "/usr/bin/php-cgi8.2", "/opt/php-cgi7"] {
            assert!(is_php_cgi(Path::new(yes)), "{yes}");
        }
        for no in [
            "/usr/bin/php",
            "/usr/bin/php-cgi-wrapper",
            "/usr/sbin/php-fpm8.2",
        ] {
            assert!(!is_php_cgi(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn php_defaults() {
        let d = docroot();
        let c = ok(&php_pool(&format!(
            "document_root = \"{}\"",
            d.path().display()
        )));
        let f = c.pools["php"].fastcgi.clone().unwrap();
        assert_eq!(f.listen_fd, ListenFd::Stdin);
        assert!(f.php && !f.keep_conn);
        assert_eq!(f.index, "index.php");
        assert_eq!(f.document_root.as_deref(), Some(d.path()));
    }

    #[test]
    fn other_fastcgi_programs() {
        let c = ok("[pool.app]\nprotocol = \"fastcgi\"\nexec = \"/usr/bin/app\"\nroute = \"/app\"\nkeep_conn = true\n");
        let f = c.pools["app"].fastcgi.clone().unwrap();
        assert_eq!(f.listen_fd, ListenFd::Systemd);
        assert!(!f.php && f.keep_conn && f.document_root.is_none());
        let c = ok("[pool.app]\nprotocol = \"fastcgi\"\nexec = \"/usr/bin/app\"\nroute = \"/app\"\nlisten_fd = \"stdin\"\n");
        assert_eq!(
            c.pools["app"].fastcgi.clone().unwrap().listen_fd,
            ListenFd::Stdin
        );
    }

    #[test]
    fn fastcgi_keys_need_the_protocol() {
        let e = errs("[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\nlisten_fd = \"stdin\"\n");
        assert_eq!(
            e,
            ["t.toml:4:13: pool.p.listen_fd: `listen_fd` is only for protocol = \"fastcgi\" pools"]
        );
        let e = errs("[pool.p]\nprotocol = \"cgi\"\ngateway = \"/bin/g\"\nexec = \"/bin/p\"\nroute = \"/p\"\nindex = \"x.php\"\n");
        assert!(
            e[0].contains("`index` is only for protocol = \"fastcgi\""),
            "{e:?}"
        );
        // And the reverse: the CGI gateway makes no sense for FastCGI.
        let e = errs("[pool.p]\nprotocol = \"fastcgi\"\ngateway = \"/bin/g\"\nexec = \"/bin/p\"\nroute = \"/p\"\n");
        assert!(e[0].contains("t.toml:3:11: pool.p.gateway"), "{e:?}");
    }

    #[test]
    fn php_misconfigurations() {
        let d = docroot();
        let root = format!("document_root = \"{}\"", d.path().display());
        for (extra, want) in [
            (
                "keep_conn = true",
                "pool.php.keep_conn: php-cgi serves one connection",
            ),
            (
                "listen_fd = \"systemd\"",
                "pool.php.listen_fd: php-cgi only serves FastCGI on its stdin",
            ),
            ("notify = true", "pool.php.notify: notify is not available"),
        ] {
            let e = errs(&php_pool(&format!("{root}\n{extra}")));
            assert_eq!(e.len(), 1, "{e:?}");
            assert!(
                e[0].starts_with("t.toml:6:") && e[0].contains(want),
                "{e:?}"
            );
        }
        let e = errs(&php_pool(""));
        assert_eq!(e, ["t.toml:1:1: pool.php.document_root: php-cgi pools need `document_root` (the directory of the .php scripts nginx passes to them)"]);
        let e = errs(&php_pool(&format!("{root}\nindex = \"../x\"")));
        assert!(e[0].contains("invalid index"), "{e:?}");
        let c = ok(&php_pool(&format!("{root}\npcre_jit = true")));
        assert!(c.pools["php"].fastcgi.clone().unwrap().pcre_jit);
        let e = errs("[pool.app]\nprotocol = \"fastcgi\"\nexec = \"/usr/bin/app\"\nroute = \"/app\"\npcre_jit = true\n");
        assert!(
            e[0].contains("pool.app.pcre_jit: `pcre_jit` is only for php-cgi pools"),
            "{e:?}"
        );
        let e = errs("[pool.app]\nprotocol = \"fastcgi\"\nexec = \"/usr/bin/app\"\nroute = \"/app\"\nindex = \"a.php\"\n");
        assert!(
            e[0].contains("t.toml:5:9: pool.app.index: `index` needs `document_root`"),
            "{e:?}"
        );
    }

    #[test]
    fn document_root_checks() {
        let e = errs(&php_pool("document_root = \"srv/www\""));
        assert!(
            e[0].contains("t.toml:5:17: pool.php.document_root: must be an absolute path"),
            "{e:?}"
        );
        let e = errs(&php_pool(
            "document_root = \"/nonexistent/cgipool-docroot\"",
        ));
        assert!(e[0].contains("t.toml:5:17: pool.php.document_root: document root /nonexistent/cgipool-docroot: No such file"), "{e:?}");
        let d = docroot();
        let file = d.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let e = errs(&php_pool(&format!(
            "document_root = \"{}\"",
            file.display()
        )));
        assert!(e[0].contains("is not a directory"), "{e:?}");
        // Unreadable for nginx's user (root reads anything: check as another).
        let closed = d.path().join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let nobody = Reader {
            name: "nobody".into(),
            uid: Some(65534),
            gids: vec![65534],
        };
        let m = std::fs::metadata(&closed).unwrap();
        assert!(!nobody.may(&m, 0o5));
        assert!(nobody.may(&std::fs::metadata(d.path()).unwrap(), 0o5));
        if Reader::nginx().uid != Some(0) {
            let e = errs(&php_pool(&format!(
                "document_root = \"{}\"",
                closed.display()
            )));
            assert!(
                e[0].contains("cannot read") && e[0].contains("mode 700"),
                "{e:?}"
            );
        }
    }
}
