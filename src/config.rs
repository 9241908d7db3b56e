//! Parsing and validating the cgipool TOML config into the model.
//!
//! The file is parsed with `toml_edit` into a spanned document and validated
//! by hand, so that *every* problem is reported at once with the
//! `file:line:col` of the offending key or value (serde stops at the first).
//!
//! Semantics worth knowing:
//! - `[defaults]` takes any pool key; a pool's own value replaces the default,
//!   except `environment`, which is merged per variable (the pool wins).
//!   `route` is not allowed in `[defaults]` (routes are unique per pool).
//!   An invalid default is reported once, at the line in `[defaults]`.
//! - `burst` defaults to 10 when `rate_limit` is set, else 0.
//! - Durations are accepted in systemd syntax ("100ms", "1min 30s", "2h", or
//!   an integer meaning seconds) and stored normalised in the largest unit
//!   that represents them exactly ("1min 30s" → "90s", "1.5s" → "1500ms").
//! - At least one pool is required.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{Item, TableLike};

pub const DEFAULT_CONFIG: &str = "/etc/cgipool/cgipool.toml";

pub const DEFAULT_UPSTREAMS: &str = "/etc/nginx/conf.d/cgipool-upstreams.conf";
pub const DEFAULT_LOCATIONS: &str = "/etc/nginx/snippets/cgipool-locations.conf";

/// Routes cgipool keeps for itself (exact, or as a prefix for `/.cgipool`).
pub const RESERVED_ROUTES: &[&str] = &["/pool-status", "/metrics", "/.cgipool"];

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The config path as given (used in the headers of generated files).
    pub source: PathBuf,
    pub nginx: Nginx,
    pub watch_enabled: bool,
    pub pools: BTreeMap<String, Pool>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nginx {
    pub upstreams: PathBuf,
    pub locations: PathBuf,
    pub unit: String,
    pub socket_group: String,
    /// host:port where cgipool reaches nginx over HTTP on loopback to read
    /// `/.cgipool/generation` after a reload.
    pub check_address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Cgi,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub exec: PathBuf,
    pub args: Vec<String>,
    pub description: String,
    pub environment: BTreeMap<String, String>,
    pub route: String,
    pub min: u32,
    pub max: u32,
    pub notify: bool,
    /// Normalised systemd duration.
    pub watchdog_sec: Option<String>,
    /// Normalised systemd duration.
    pub restart_sec: String,
    /// Normalised systemd duration or "infinity".
    pub runtime_max_sec: Option<String>,
    pub memory_max: String,
    pub cpu_quota: Option<String>,
    pub tasks_max: String,
    pub user: Option<String>,
    pub read_write_paths: Vec<PathBuf>,
    pub read_only_paths: Vec<PathBuf>,
    pub private_network: bool,
    pub protocol: Protocol,
    /// The cgipool binary whose `cgi-gateway` subcommand runs a
    /// `protocol = "cgi"` pool's program (unused for "http" pools).
    pub gateway: PathBuf,
    pub working_directory: Option<PathBuf>,
    /// Normalised systemd duration (render converts it to nginx syntax).
    pub request_timeout: String,
    pub body_limit: String,
    pub rate_limit: Option<String>,
    pub burst: u32,
    pub max_connections: Option<u32>,
    /// Normalised systemd duration: how long the pool must be saturated
    /// before `cgipool watch` grows it.
    pub scale_up_after: String,
    /// Normalised systemd duration: how long the pool must be idle before
    /// `cgipool watch` shrinks it.
    pub scale_down_after: String,
    /// Path `cgipool watch` probes on each worker's socket (none: no probe).
    pub health_path: Option<String>,
    /// Normalised systemd durations.
    pub health_interval: String,
    pub health_timeout: String,
    /// Failed probes in a row before a worker is taken out and restarted.
    pub unhealthy_after: u32,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based; 0 when the problem has no position (the file is unreadable).
    pub line: usize,
    /// 1-based, in characters.
    pub col: usize,
    /// Dotted key, e.g. `pool.search.min`; empty for TOML syntax errors and
    /// I/O errors.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    /// `{file}:{line}:{col}: {key}: {message}`; `:{line}:{col}` is left out
    /// when line is 0 and `{key}: ` when the key is empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.col)?;
        }
        write!(f, ": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{}", self.message)
    }
}

/// All problems found in a config file, sorted by position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Read and validate a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text),
        Err(e) => Err(ConfigError {
            diagnostics: vec![Diagnostic {
                file: path.to_path_buf(),
                line: 0,
                col: 0,
                key: String::new(),
                message: format!("cannot read config file: {e}"),
            }],
        }),
    }
}

/// Validate config text; `source` names the file in diagnostics and headers.
pub fn parse(source: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut cx = Cx {
        file: source,
        text,
        diags: Vec::new(),
        errors: 0,
    };
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            cx.err(e.span(), "", e.message().trim_end().to_string());
            return Err(cx.into_error());
        }
    };
    let root: &dyn TableLike = doc.as_table();
    let config = parse_root(&mut cx, source, root);
    match config {
        Some(c) if cx.errors == 0 => Ok(c),
        _ => Err(cx.into_error()),
    }
}

// ---------------------------------------------------------------------------
// Key tables

const TOP_KEYS: &[&str] = &["nginx", "watch", "defaults", "pool"];
const NGINX_KEYS: &[&str] = &[
    "upstreams",
    "locations",
    "unit",
    "socket_group",
    "check_address",
];
const WATCH_SECTION_KEYS: &[&str] = &["enabled"];
const POOL_KEYS: &[&str] = &[
    "exec",
    "args",
    "description",
    "environment",
    "route",
    "min",
    "max",
    "notify",
    "watchdog_sec",
    "restart_sec",
    "runtime_max_sec",
    "memory_max",
    "cpu_quota",
    "tasks_max",
    "user",
    "read_write_paths",
    "read_only_paths",
    "private_network",
    "protocol",
    "gateway",
    "working_directory",
    "request_timeout",
    "body_limit",
    "rate_limit",
    "burst",
    "max_connections",
    "scale_up_after",
    "scale_down_after",
    "health_path",
    "health_interval",
    "health_timeout",
    "unhealthy_after",
];
/// The running cgipool binary (the default `gateway` of CGI pools, and
/// what watch's unit runs), if its path can be written into a unit as is.
fn own_binary() -> Result<(), String> {
    binary_problem(&crate::paths::cgipool_binary())
}

fn binary_problem(p: &Path) -> Result<(), String> {
    abs_path_problem(&p.display().to_string()).map_err(|m| {
        format!(
            "cgipool runs from {}, which cannot go into a unit file ({m}); install it elsewhere",
            p.display()
        )
    })
}

pub const MAX_POOL_NAME: usize = 32;
/// Environment variables the units set for every worker.
const RESERVED_ENV: &[&str] = &["CGIPOOL_POOL", "CGIPOOL_WORKER"];
pub const MAX_WORKERS: u32 = 512;

// ---------------------------------------------------------------------------
// Diagnostics context

struct Cx<'a> {
    file: &'a Path,
    text: &'a str,
    diags: Vec<Diagnostic>,
    /// Every error counts, including duplicates dropped from `diags`.
    errors: usize,
}

impl Cx<'_> {
    fn err(&mut self, span: Option<Range<usize>>, key: &str, message: impl Into<String>) {
        self.errors += 1;
        let (line, col) = line_col(self.text, span.map_or(0, |s| s.start));
        let d = Diagnostic {
            file: self.file.to_path_buf(),
            line,
            col,
            key: key.to_string(),
            message: message.into(),
        };
        // A bad [defaults] value is seen once per pool; report it once.
        if !self.diags.contains(&d) {
            self.diags.push(d);
        }
    }

    fn into_error(mut self) -> ConfigError {
        self.diags.sort();
        ConfigError {
            diagnostics: self.diags,
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// One value in the document with where it came from.
#[derive(Clone)]
struct Src<'d> {
    /// The key itself (last segment, unquoted).
    name: String,
    /// Dotted key where the value was written, e.g. `defaults.min`.
    key: String,
    key_span: Option<Range<usize>>,
    item: &'d Item,
}

impl Src<'_> {
    /// Where to point at for a problem with the value.
    fn span(&self) -> Option<Range<usize>> {
        self.item.span().or_else(|| self.key_span.clone())
    }
}

/// The entries of a table-like item, with key spans, in document order.
fn entries<'d>(prefix: &str, table: &'d dyn TableLike) -> Vec<Src<'d>> {
    table
        .iter()
        .filter_map(|(k, _)| table.get_key_value(k))
        .map(|(key, item)| Src {
            name: key.get().to_string(),
            key: join_key(prefix, key.get()),
            key_span: key.span(),
            item,
        })
        .collect()
}

fn join_key(prefix: &str, key: &str) -> String {
    let key = if is_bare_key(key) {
        key.to_string()
    } else {
        format!("{key:?}")
    };
    if prefix.is_empty() {
        key
    } else {
        format!("{prefix}.{key}")
    }
}

fn is_bare_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn unknown_key(cx: &mut Cx<'_>, src: &Src<'_>, known: &[&str], what: &str) {
    let name = src.name.as_str();
    let mut msg = format!("unknown key `{name}` in {what}");
    if let Some(s) = suggest(name, known) {
        msg.push_str(&format!("; did you mean `{s}`?"));
    }
    cx.err(src.key_span.clone().or_else(|| src.span()), &src.key, msg);
}

fn suggest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (levenshtein(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

// ---------------------------------------------------------------------------
// Typed accessors: each reports its own error and returns None on failure.

fn type_err(cx: &mut Cx<'_>, src: &Src<'_>, expected: &str) {
    cx.err(
        src.span(),
        &src.key,
        format!("expected {expected}, found {}", src.item.type_name()),
    );
}

fn get_str(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<String> {
    match src.item.as_str() {
        Some(s) => check_text(cx, src.span(), &src.key, s).then(|| s.to_string()),
        None => {
            type_err(cx, src, "a string");
            None
        }
    }
}

/// Control characters (newline, tab, …) can never be written safely into a
/// unit or nginx file: reject them for every string.
fn check_text(cx: &mut Cx<'_>, span: Option<Range<usize>>, key: &str, s: &str) -> bool {
    if s.chars().any(char::is_control) {
        cx.err(
            span,
            key,
            "must not contain newlines, tabs or other control characters",
        );
        false
    } else {
        true
    }
}

fn get_bool(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<bool> {
    let b = src.item.as_bool();
    if b.is_none() {
        type_err(cx, src, "a boolean (true or false)");
    }
    b
}

fn get_u32(cx: &mut Cx<'_>, src: &Src<'_>, lo: u32, hi: u32) -> Option<u32> {
    let Some(i) = src.item.as_integer() else {
        type_err(cx, src, "an integer");
        return None;
    };
    match u32::try_from(i) {
        Ok(v) if (lo..=hi).contains(&v) => Some(v),
        _ => {
            cx.err(
                src.span(),
                &src.key,
                format!("must be between {lo} and {hi}, got {i}"),
            );
            None
        }
    }
}

/// An array of strings, each with its span.
fn get_str_list(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<Vec<(String, Option<Range<usize>>)>> {
    let Some(arr) = src.item.as_array() else {
        type_err(cx, src, "an array of strings");
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for (i, v) in arr.iter().enumerate() {
        let key = format!("{}[{i}]", src.key);
        match v.as_str() {
            Some(s) => {
                if check_text(cx, v.span(), &key, s) {
                    out.push((s.to_string(), v.span()));
                } else {
                    ok = false;
                }
            }
            None => {
                cx.err(
                    v.span(),
                    &key,
                    format!("expected a string, found {}", v.type_name()),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn get_abs_path(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<PathBuf> {
    let s = get_str(cx, src)?;
    check_abs_path(cx, src.span(), &src.key, &s)
}

fn check_abs_path(
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
fn abs_path_problem(s: &str) -> Result<(), String> {
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

fn get_abs_path_list(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<Vec<PathBuf>> {
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

const USEC_UNITS: &[(&str, u64)] = &[
    ("us", 1),
    ("usec", 1),
    ("µs", 1),
    ("μs", 1),
    ("ms", 1_000),
    ("msec", 1_000),
    ("s", 1_000_000),
    ("sec", 1_000_000),
    ("second", 1_000_000),
    ("seconds", 1_000_000),
    ("m", 60_000_000),
    ("min", 60_000_000),
    ("minute", 60_000_000),
    ("minutes", 60_000_000),
    ("h", 3_600_000_000),
    ("hr", 3_600_000_000),
    ("hour", 3_600_000_000),
    ("hours", 3_600_000_000),
    ("d", 86_400_000_000),
    ("day", 86_400_000_000),
    ("days", 86_400_000_000),
    ("w", 604_800_000_000),
    ("week", 604_800_000_000),
    ("weeks", 604_800_000_000),
];

/// Parse a systemd time span ("100ms", "1min 30s", "2h", "5", "1.5s") into
/// microseconds. Months and years are not accepted. None if invalid.
pub fn duration_usec(s: &str) -> Option<u64> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let int_len = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let mult = if unit.is_empty() {
            1_000_000
        } else {
            USEC_UNITS.iter().find(|(u, _)| *u == unit)?.1
        };
        let int: u64 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let mut value = int.checked_mul(mult)?;
        if !frac.is_empty() {
            let digits = frac.len().min(9);
            let frac_num: u64 = frac[..digits].parse().ok()?;
            let scale = 10u64.pow(u32::try_from(digits).ok()?);
            value = value.checked_add(frac_num.checked_mul(mult)? / scale)?;
        }
        total = total.checked_add(value)?;
        rest = after.trim_start();
    }
    Some(total)
}

/// Format microseconds in the largest systemd unit that is exact.
pub fn format_systemd_usec(us: u64) -> String {
    if us == 0 {
        return "0".to_string();
    }
    for (unit, mult) in [
        ("h", 3_600_000_000u64),
        ("min", 60_000_000),
        ("s", 1_000_000),
        ("ms", 1_000),
    ] {
        if us.is_multiple_of(mult) {
            return format!("{}{unit}", us / mult);
        }
    }
    format!("{us}us")
}

/// Format microseconds as an nginx time: whole seconds as "90s", else
/// milliseconds ("1500ms"); None when not a whole number of milliseconds.
pub fn format_nginx_usec(us: u64) -> Option<String> {
    if us.is_multiple_of(1_000_000) {
        Some(format!("{}s", us / 1_000_000))
    } else if us.is_multiple_of(1_000) {
        Some(format!("{}ms", us / 1_000))
    } else {
        None
    }
}

/// A duration: string in systemd syntax, or an integer number of seconds.
/// Returns microseconds.
fn get_duration(cx: &mut Cx<'_>, src: &Src<'_>, allow_zero: bool) -> Option<u64> {
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
fn positive(s: &str) -> bool {
    all_digits(s) && s.parse::<u64>().is_ok_and(|n| n > 0)
}

fn percent(s: &str) -> Option<u64> {
    let n = s.strip_suffix('%')?;
    if !all_digits(n) {
        return None;
    }
    n.parse().ok()
}

/// systemd MemoryMax=: bytes with an optional K/M/G/T suffix, "infinity",
/// or a percentage 1..=100.
fn memory_ok(s: &str) -> bool {
    if s == "infinity" {
        return true;
    }
    if let Some(p) = percent(s) {
        return (1..=100).contains(&p);
    }
    let n = s.strip_suffix(['K', 'M', 'G', 'T']).unwrap_or(s);
    positive(n)
}

/// nginx size: bytes with an optional k/K/m/M/g/G suffix ("0" disables).
fn nginx_size_ok(s: &str) -> bool {
    let n = s.strip_suffix(['k', 'K', 'm', 'M', 'g', 'G']).unwrap_or(s);
    all_digits(n) && n.len() <= 12
}

/// nginx rate: "20r/s" or "600r/m".
fn rate_ok(s: &str) -> bool {
    s.strip_suffix("r/s")
        .or_else(|| s.strip_suffix("r/m"))
        .is_some_and(|n| positive(n) && n.len() <= 9)
}

fn pool_name_ok(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= MAX_POOL_NAME
}

/// User and group names: `[a-z_][a-z0-9_-]*`, at most 32 characters.
fn user_name_ok(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && s.len() <= 32
}

fn env_key_ok(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn route_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || "/_.~-".contains(c)
}

fn unit_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || ":_.@-\\".contains(c))
        && s.ends_with(".service")
        && s.len() > ".service".len()
}

// ---------------------------------------------------------------------------
// Sections

fn parse_root(cx: &mut Cx<'_>, source: &Path, root: &dyn TableLike) -> Option<Config> {
    let top = entries("", root);
    let mut nginx = None;
    let mut watch = None;
    let mut defaults = Vec::new();
    let mut pool_section = None;
    for src in &top {
        match src.name.as_str() {
            "nginx" => nginx = Some(src.clone()),
            "watch" => watch = Some(src.clone()),
            "defaults" => match src.item.as_table_like() {
                Some(t) => defaults = entries("defaults", t),
                None => type_err(cx, src, "a table"),
            },
            "pool" => pool_section = Some(src.clone()),
            _ => unknown_key(cx, src, TOP_KEYS, "the top level"),
        }
    }

    let nginx = parse_nginx(cx, nginx.as_ref());
    let watch_enabled = parse_watch(cx, watch.as_ref());
    if watch_enabled == Some(true) {
        if let Err(msg) = own_binary() {
            let span = watch.as_ref().and_then(|w| w.span());
            cx.err(
                span,
                "watch",
                format!("{msg}, or set `[watch] enabled = false`"),
            );
        }
    }

    // Validate [defaults] on its own so its errors show even without pools.
    let mut default_env = Vec::new();
    for src in &defaults {
        let name = src.name.as_str();
        if name == "route" {
            cx.err(
                src.key_span.clone(),
                &src.key,
                "route cannot be set in [defaults]: every pool needs its own route",
            );
        } else if name == "environment" {
            if let Some(env) = parse_env(cx, src) {
                default_env = env;
            }
        } else {
            check_pool_key(cx, src, "[defaults]");
        }
    }
    let default_values: Vec<&Src<'_>> = defaults
        .iter()
        .filter(|s| {
            let k = s.name.as_str();
            k != "route" && k != "environment" && POOL_KEYS.contains(&k)
        })
        .collect();
    // Validate each default once (errors dedup), independent of pools.
    let mut scratch = PoolFields::default();
    for src in &default_values {
        apply_field(cx, &mut scratch, src);
    }

    let mut pools = BTreeMap::new();
    let mut routes: BTreeMap<String, (String, Src<'_>)> = BTreeMap::new();
    match &pool_section {
        None => cx.err(
            Some(0..0),
            "pool",
            "no pools defined: add at least one [pool.NAME] table",
        ),
        Some(sec) => match sec.item.as_table_like() {
            None => type_err(cx, sec, "a table of pools ([pool.NAME])"),
            Some(t) => {
                let list = entries("pool", t);
                if list.is_empty() {
                    cx.err(
                        sec.key_span.clone(),
                        "pool",
                        "no pools defined: add at least one [pool.NAME] table",
                    );
                }
                for psrc in &list {
                    let raw_name = psrc.name.clone();
                    if !pool_name_ok(&raw_name) {
                        cx.err(
                            psrc.key_span.clone().or_else(|| psrc.span()),
                            &psrc.key,
                            format!(
                                "invalid pool name {raw_name:?}: use [a-z0-9][a-z0-9_]*, at most {MAX_POOL_NAME} characters"
                            ),
                        );
                        continue;
                    }
                    let Some(ptable) = psrc.item.as_table_like() else {
                        type_err(cx, psrc, "a table");
                        continue;
                    };
                    if let Some(pool) =
                        parse_pool(cx, &raw_name, psrc, ptable, &default_values, &default_env)
                    {
                        // Route uniqueness.
                        let route_src = entries(&psrc.key, ptable)
                            .into_iter()
                            .find(|s| s.name == "route");
                        if let Some(rs) = route_src {
                            if let Some((other, _)) = routes.get(&pool.route) {
                                cx.err(
                                    rs.span(),
                                    &rs.key,
                                    format!(
                                        "route {:?} is already used by pool.{other}",
                                        pool.route
                                    ),
                                );
                            } else {
                                routes.insert(pool.route.clone(), (raw_name.clone(), rs));
                            }
                        }
                        pools.insert(raw_name, pool);
                    }
                }
            }
        },
    }

    let nginx = nginx?;
    Some(Config {
        source: source.to_path_buf(),
        nginx,
        watch_enabled: watch_enabled?,
        pools,
    })
}

fn parse_nginx(cx: &mut Cx<'_>, sec: Option<&Src<'_>>) -> Option<Nginx> {
    let mut n = Nginx {
        upstreams: PathBuf::from(DEFAULT_UPSTREAMS),
        locations: PathBuf::from(DEFAULT_LOCATIONS),
        unit: "nginx.service".to_string(),
        socket_group: "www-data".to_string(),
        check_address: "127.0.0.1:80".to_string(),
    };
    let Some(sec) = sec else { return Some(n) };
    let Some(t) = sec.item.as_table_like() else {
        type_err(cx, sec, "a table");
        return None;
    };
    let before = cx.errors;
    let mut upstreams_src = None;
    for src in entries("nginx", t) {
        match src.name.as_str() {
            "upstreams" => {
                if let Some(p) = get_abs_path(cx, &src) {
                    n.upstreams = p;
                    upstreams_src = Some(src.clone());
                }
            }
            "locations" => {
                if let Some(p) = get_abs_path(cx, &src) {
                    if p == n.upstreams {
                        cx.err(src.span(), &src.key, "must differ from nginx.upstreams");
                    }
                    n.locations = p;
                }
            }
            "unit" => {
                if let Some(s) = get_str(cx, &src) {
                    if unit_name_ok(&s) {
                        n.unit = s;
                    } else {
                        cx.err(
                            src.span(),
                            &src.key,
                            format!("invalid unit name {s:?}: expected e.g. \"nginx.service\""),
                        );
                    }
                }
            }
            "socket_group" => {
                if let Some(s) = get_str(cx, &src) {
                    if user_name_ok(&s) {
                        n.socket_group = s;
                    } else {
                        cx.err(
                            src.span(),
                            &src.key,
                            format!("invalid group name {s:?}: use [a-z_][a-z0-9_-]*"),
                        );
                    }
                }
            }
            "check_address" => {
                if let Some(s) = get_str(cx, &src) {
                    match s.parse::<std::net::SocketAddr>() {
                        Ok(a) if a.ip().is_loopback() => n.check_address = s,
                        _ => cx.err(
                            src.span(),
                            &src.key,
                            format!("invalid address {s:?}: expected a loopback host:port such as \"127.0.0.1:80\""),
                        ),
                    }
                }
            }
            _ => unknown_key(cx, &src, NGINX_KEYS, "[nginx]"),
        }
    }
    // locations may come before upstreams in the file.
    if n.locations == n.upstreams {
        if let Some(src) = upstreams_src {
            cx.err(src.span(), &src.key, "must differ from nginx.locations");
        }
    }
    (cx.errors == before).then_some(n)
}

fn parse_watch(cx: &mut Cx<'_>, sec: Option<&Src<'_>>) -> Option<bool> {
    let Some(sec) = sec else { return Some(true) };
    let Some(t) = sec.item.as_table_like() else {
        type_err(cx, sec, "a table");
        return None;
    };
    let mut enabled = Some(true);
    for src in entries("watch", t) {
        match src.name.as_str() {
            "enabled" => enabled = get_bool(cx, &src),
            _ => unknown_key(cx, &src, WATCH_SECTION_KEYS, "[watch]"),
        }
    }
    enabled
}

/// Reject keys that are not pool keys. Returns true when the key is one.
fn check_pool_key(cx: &mut Cx<'_>, src: &Src<'_>, what: &str) -> bool {
    if POOL_KEYS.contains(&src.name.as_str()) {
        true
    } else {
        unknown_key(cx, src, POOL_KEYS, what);
        false
    }
}

fn parse_env(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<Vec<(String, String)>> {
    let Some(t) = src.item.as_table_like() else {
        type_err(cx, src, "a table of strings");
        return None;
    };
    let mut out = Vec::new();
    let mut ok = true;
    for e in entries(&src.key, t) {
        let raw_key = e.name.clone();
        if !env_key_ok(&raw_key) {
            cx.err(
                e.key_span.clone(),
                &e.key,
                format!(
                    "invalid environment variable name {raw_key:?}: use [A-Za-z_][A-Za-z0-9_]*"
                ),
            );
            ok = false;
            continue;
        }
        if RESERVED_ENV.contains(&raw_key.as_ref()) {
            cx.err(
                e.key_span.clone(),
                &e.key,
                "CGIPOOL_POOL and CGIPOOL_WORKER are reserved (cgipool sets them)",
            );
            ok = false;
            continue;
        }
        match get_str(cx, &e) {
            Some(v) => out.push((raw_key, v)),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// Pool values as parsed; None = not given (or invalid, then an error was
/// reported).
#[derive(Default)]
struct PoolFields {
    exec: Option<PathBuf>,
    args: Option<Vec<String>>,
    description: Option<String>,
    route: Option<String>,
    min: Option<(u32, Option<Range<usize>>, String)>,
    max: Option<u32>,
    notify: Option<bool>,
    watchdog_sec: Option<String>,
    restart_sec: Option<String>,
    runtime_max_sec: Option<String>,
    memory_max: Option<String>,
    cpu_quota: Option<String>,
    tasks_max: Option<String>,
    user: Option<String>,
    read_write_paths: Option<Vec<PathBuf>>,
    read_only_paths: Option<Vec<PathBuf>>,
    private_network: Option<bool>,
    protocol: Option<Protocol>,
    gateway: Option<PathBuf>,
    working_directory: Option<PathBuf>,
    request_timeout: Option<String>,
    body_limit: Option<String>,
    scale_up_after: Option<String>,
    scale_down_after: Option<String>,
    health_path: Option<String>,
    health_interval: Option<String>,
    health_timeout: Option<String>,
    unhealthy_after: Option<u32>,
    rate_limit: Option<String>,
    burst: Option<u32>,
    max_connections: Option<u32>,
}

/// Parse one known pool key (not environment) into `f`.
fn apply_field(cx: &mut Cx<'_>, f: &mut PoolFields, src: &Src<'_>) {
    let sp = src.span();
    let key = src.key.as_str();
    match src.name.as_str() {
        "exec" => {
            if let Some(s) = get_str(cx, src) {
                f.exec = check_abs_path(cx, sp, key, &s);
            }
        }
        "args" => f.args = get_str_list(cx, src).map(|l| l.into_iter().map(|(s, _)| s).collect()),
        "description" => {
            if let Some(s) = get_str(cx, src) {
                let s = s.trim().to_string();
                if s.ends_with('\\') {
                    cx.err(sp, key, "must not end with a backslash");
                } else {
                    f.description = Some(s);
                }
            }
        }
        "route" => {
            if let Some(s) = get_str(cx, src) {
                if let Some(msg) = route_problem(&s) {
                    cx.err(sp, key, msg);
                } else {
                    f.route = Some(s);
                }
            }
        }
        "min" => f.min = get_u32(cx, src, 1, MAX_WORKERS).map(|v| (v, sp, key.to_string())),
        "max" => f.max = get_u32(cx, src, 1, MAX_WORKERS),
        "notify" => f.notify = get_bool(cx, src),
        "watchdog_sec" => f.watchdog_sec = get_duration(cx, src, false).map(format_systemd_usec),
        "restart_sec" => f.restart_sec = get_duration(cx, src, true).map(format_systemd_usec),
        "scale_up_after" => {
            f.scale_up_after = get_duration(cx, src, false).map(format_systemd_usec)
        }
        "scale_down_after" => {
            f.scale_down_after = get_duration(cx, src, false).map(format_systemd_usec)
        }
        "runtime_max_sec" => {
            if src.item.as_str() == Some("infinity") {
                f.runtime_max_sec = Some("infinity".to_string());
            } else {
                f.runtime_max_sec = get_duration(cx, src, false).map(format_systemd_usec);
            }
        }
        "request_timeout" => {
            if let Some(us) = get_duration(cx, src, false) {
                if format_nginx_usec(us).is_some() {
                    f.request_timeout = Some(format_systemd_usec(us));
                } else {
                    cx.err(
                        sp,
                        key,
                        "must be a whole number of milliseconds (nginx's resolution)",
                    );
                }
            }
        }
        "memory_max" => {
            if let Some(s) = get_str(cx, src) {
                if memory_ok(&s) {
                    f.memory_max = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!("invalid memory size {s:?}: use e.g. \"256M\", \"1G\", \"50%\" or \"infinity\""),
                    );
                }
            }
        }
        "cpu_quota" => {
            if let Some(s) = get_str(cx, src) {
                if percent(&s).is_some_and(|p| p > 0 && p <= 100_000) {
                    f.cpu_quota = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!("invalid CPU quota {s:?}: use a percentage of one CPU, e.g. \"50%\" or \"200%\""),
                    );
                }
            }
        }
        "tasks_max" => {
            if let Some(i) = src.item.as_integer() {
                if i >= 1 {
                    f.tasks_max = Some(i.to_string());
                } else {
                    cx.err(sp, key, format!("must be at least 1, got {i}"));
                }
            } else if src.item.is_str() {
                if let Some(s) = get_str(cx, src) {
                    if s == "infinity" || positive(&s) {
                        f.tasks_max = Some(s);
                    } else {
                        cx.err(
                            sp,
                            key,
                            format!("expected an integer or \"infinity\", got {s:?}"),
                        );
                    }
                }
            } else {
                type_err(cx, src, "an integer or \"infinity\"");
            }
        }
        "user" => {
            if let Some(s) = get_str(cx, src) {
                if user_name_ok(&s) {
                    f.user = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!(
                            "invalid user name {s:?}: use [a-z_][a-z0-9_-]*, at most 32 characters"
                        ),
                    );
                }
            }
        }
        "read_write_paths" => f.read_write_paths = get_abs_path_list(cx, src),
        "read_only_paths" => f.read_only_paths = get_abs_path_list(cx, src),
        "private_network" => f.private_network = get_bool(cx, src),
        "protocol" => {
            if let Some(s) = get_str(cx, src) {
                let p = match s.as_str() {
                    "http" => Some(Protocol::Http),
                    "cgi" => Some(Protocol::Cgi),
                    _ => None,
                };
                match p {
                    Some(_) => f.protocol = p,
                    None => cx.err(sp, key, format!("expected \"http\" or \"cgi\", got {s:?}")),
                }
            }
        }
        "gateway" => f.gateway = get_abs_path(cx, src),
        "working_directory" => f.working_directory = get_abs_path(cx, src),
        "body_limit" => {
            if let Some(s) = get_str(cx, src) {
                if nginx_size_ok(&s) {
                    f.body_limit = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!("invalid size {s:?}: use nginx syntax, e.g. \"1m\", \"512k\""),
                    );
                }
            }
        }
        "rate_limit" => {
            if let Some(s) = get_str(cx, src) {
                if rate_ok(&s) {
                    f.rate_limit = Some(s);
                } else {
                    cx.err(
                        sp,
                        key,
                        format!("invalid rate {s:?}: use e.g. \"20r/s\" or \"600r/m\""),
                    );
                }
            }
        }
        "burst" => f.burst = get_u32(cx, src, 0, 1_000_000),
        "max_connections" => f.max_connections = get_u32(cx, src, 1, 1_000_000),
        "health_path" => {
            if let Some(s) = get_str(cx, src) {
                match health_path_problem(&s) {
                    Some(msg) => cx.err(sp, key, msg),
                    None => f.health_path = Some(s),
                }
            }
        }
        "health_interval" => {
            f.health_interval = get_duration(cx, src, false).map(format_systemd_usec)
        }
        "health_timeout" => {
            f.health_timeout = get_duration(cx, src, false).map(format_systemd_usec)
        }
        "unhealthy_after" => f.unhealthy_after = get_u32(cx, src, 1, 1000),
        _ => {}
    }
}

/// A probe path: sent verbatim in a request line, so no spaces or controls.
fn health_path_problem(s: &str) -> Option<String> {
    if !s.starts_with('/') {
        return Some(format!("must start with `/`, got {s:?}"));
    }
    s.chars().find(|c| !(route_char_ok(*c) || "?=&%+".contains(*c))).map(|c| {
        format!("health_path {s:?} contains {c:?}: only letters, digits and / _ . ~ - ? = & % + are allowed")
    })
}

fn route_problem(s: &str) -> Option<String> {
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

fn parse_pool(
    cx: &mut Cx<'_>,
    name: &str,
    psrc: &Src<'_>,
    table: &dyn TableLike,
    defaults: &[&Src<'_>],
    default_env: &[(String, String)],
) -> Option<Pool> {
    let errors_before = cx.errors;
    let own = entries(&psrc.key, table);
    let mut f = PoolFields::default();
    for src in defaults {
        apply_field(cx, &mut f, src);
    }
    let mut environment: BTreeMap<String, String> = default_env.iter().cloned().collect();
    let mut has_exec = defaults.iter().any(|s| s.name == "exec");
    let mut has_route = false;
    for src in &own {
        let k = src.name.as_str();
        if k == "environment" {
            if let Some(env) = parse_env(cx, src) {
                environment.extend(env);
            }
            continue;
        }
        if !check_pool_key(cx, src, &format!("[{}]", psrc.key)) {
            continue;
        }
        match k {
            "exec" => has_exec = true,
            "route" => has_route = true,
            _ => {}
        }
        apply_field(cx, &mut f, src);
    }
    // Where to point at for "missing key": the [pool.NAME] header.
    let here = table_span(psrc);
    if !has_exec {
        cx.err(
            here.clone(),
            &format!("{}.exec", psrc.key),
            "missing required key `exec` (absolute path of the worker program)",
        );
    }
    if !has_route {
        cx.err(
            here,
            &format!("{}.route", psrc.key),
            "missing required key `route` (e.g. \"/api/NAME\")",
        );
    }
    let min = f.min.as_ref().map_or(2, |m| m.0);
    let max = f.max.unwrap_or(5);
    if min > max {
        let (span, key) = match &f.min {
            Some((_, span, key)) => (span.clone(), key.clone()),
            None => (here_or(psrc), format!("{}.min", psrc.key)),
        };
        cx.err(
            span,
            &key,
            format!("min ({min}) must not be greater than max ({max})"),
        );
    }
    if f.protocol == Some(Protocol::Cgi) && f.gateway.is_none() {
        if let Err(msg) = own_binary() {
            cx.err(
                here_or(psrc),
                &format!("{}.gateway", psrc.key),
                format!("{msg}, or set `gateway`"),
            );
        }
    }
    if f.protocol == Some(Protocol::Cgi) && (f.notify == Some(true) || f.watchdog_sec.is_some()) {
        cx.err(
            here_or(psrc),
            &format!("{}.protocol", psrc.key),
            "notify and watchdog_sec are not available for protocol = \"cgi\" (the gateway does not send READY=1 or WATCHDOG=1)",
        );
    }
    if cx.errors != errors_before {
        return None;
    }
    let rate_limit = f.rate_limit;
    let burst = f.burst.unwrap_or(if rate_limit.is_some() { 10 } else { 0 });
    Some(Pool {
        name: name.to_string(),
        exec: f.exec?,
        args: f.args.unwrap_or_default(),
        description: f.description.unwrap_or_default(),
        environment,
        route: f.route?,
        min,
        max,
        notify: f.notify.unwrap_or(false),
        watchdog_sec: f.watchdog_sec,
        restart_sec: f.restart_sec.unwrap_or_else(|| "100ms".to_string()),
        runtime_max_sec: f.runtime_max_sec,
        memory_max: f.memory_max.unwrap_or_else(|| "256M".to_string()),
        cpu_quota: f.cpu_quota,
        tasks_max: f.tasks_max.unwrap_or_else(|| "64".to_string()),
        user: f.user,
        read_write_paths: f.read_write_paths.unwrap_or_default(),
        read_only_paths: f.read_only_paths.unwrap_or_default(),
        private_network: f.private_network.unwrap_or(true),
        protocol: f.protocol.unwrap_or(Protocol::Http),
        gateway: f.gateway.unwrap_or_else(crate::paths::cgipool_binary),
        working_directory: f.working_directory,
        request_timeout: f.request_timeout.unwrap_or_else(|| "60s".to_string()),
        body_limit: f.body_limit.unwrap_or_else(|| "1m".to_string()),
        rate_limit,
        burst,
        max_connections: f.max_connections,
        scale_up_after: f.scale_up_after.unwrap_or_else(|| "2s".to_string()),
        scale_down_after: f.scale_down_after.unwrap_or_else(|| "30s".to_string()),
        health_path: f.health_path,
        health_interval: f.health_interval.unwrap_or_else(|| "5s".to_string()),
        health_timeout: f.health_timeout.unwrap_or_else(|| "2s".to_string()),
        unhealthy_after: f.unhealthy_after.unwrap_or(3),
    })
}

fn table_span(psrc: &Src<'_>) -> Option<Range<usize>> {
    match psrc.item {
        Item::Table(t) => t.span().or_else(|| psrc.key_span.clone()),
        _ => psrc.key_span.clone().or_else(|| psrc.item.span()),
    }
}

fn here_or(psrc: &Src<'_>) -> Option<Range<usize>> {
    table_span(psrc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    const DEMO: &str = include_str!("../examples/demo.toml");

    fn ok(text: &str) -> Config {
        match parse(Path::new("t.toml"), text) {
            Ok(c) => c,
            Err(e) => panic!("unexpected errors:\n{e}"),
        }
    }

    /// Display lines of all diagnostics.
    fn errs(text: &str) -> Vec<String> {
        match parse(Path::new("t.toml"), text) {
            Ok(c) => panic!("expected errors, got {c:#?}"),
            Err(e) => e.diagnostics.iter().map(ToString::to_string).collect(),
        }
    }

    /// A valid pool plus `extra` lines inside it (line 4 on).
    fn pool_with(extra: &str) -> String {
        format!("[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n{extra}\n")
    }

    fn one_err(extra: &str) -> String {
        let e = errs(&pool_with(extra));
        assert_eq!(e.len(), 1, "{e:#?}");
        e[0].clone()
    }

    /// The README's config reference cannot drift from the code.
    #[test]
    fn readme_documents_every_config_key() {
        let readme = include_str!("../README.md");
        let rows: Vec<(&str, &str)> = readme
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((key, *cells.get(2)?))
            })
            .collect();
        let documented =
            |key: &str, section: &str| rows.iter().any(|(k, s)| *k == key && *s == section);
        for key in NGINX_KEYS {
            assert!(
                documented(key, "`[nginx]`"),
                "README lacks [nginx] key {key}"
            );
        }
        for key in WATCH_SECTION_KEYS {
            assert!(
                documented(key, "`[watch]`"),
                "README lacks [watch] key {key}"
            );
        }
        for key in POOL_KEYS {
            assert!(documented(key, "pool"), "README lacks pool key {key}");
        }
        let known = rows.iter().filter(|(_, s)| *s == "pool").count();
        assert_eq!(
            known,
            POOL_KEYS.len(),
            "README documents pool keys the code does not know"
        );
    }

    #[test]
    fn demo_parses_with_defaults() {
        let c = parse(Path::new("examples/demo.toml"), DEMO).unwrap();
        assert_eq!(c.source, PathBuf::from("examples/demo.toml"));
        assert_eq!(
            c.nginx,
            Nginx {
                upstreams: DEFAULT_UPSTREAMS.into(),
                locations: DEFAULT_LOCATIONS.into(),
                unit: "nginx.service".into(),
                socket_group: "www-data".into(),
                check_address: "127.0.0.1:80".into(),
            }
        );
        assert!(c.watch_enabled);
        assert_eq!(c.pools.keys().collect::<Vec<_>>(), ["auth", "search"]);
        let s = &c.pools["search"];
        assert_eq!((s.min, s.max), (2, 5));
        let a = &c.pools["auth"];
        assert_eq!(
            a,
            &Pool {
                name: "auth".into(),
                exec: "/usr/local/lib/cgipool/auth".into(),
                args: vec![],
                description: String::new(),
                environment: BTreeMap::new(),
                route: "/api/auth".into(),
                min: 2,
                max: 5,
                notify: false,
                watchdog_sec: None,
                restart_sec: "100ms".into(),
                runtime_max_sec: None,
                memory_max: "256M".into(),
                cpu_quota: None,
                tasks_max: "64".into(),
                user: None,
                read_write_paths: vec![],
                read_only_paths: vec![],
                private_network: true,
                protocol: Protocol::Http,
                gateway: crate::paths::cgipool_binary(),
                working_directory: None,
                request_timeout: "60s".into(),
                body_limit: "1m".into(),
                rate_limit: None,
                burst: 0,
                max_connections: None,
                scale_up_after: "2s".into(),
                scale_down_after: "30s".into(),
                health_path: None,
                health_interval: "5s".into(),
                health_timeout: "2s".into(),
                unhealthy_after: 3,
            }
        );
    }

    #[test]
    fn every_key_parses() {
        let c = ok(r#"
[nginx]
upstreams = "/etc/nginx/a.conf"
locations = "/etc/nginx/b.conf"
unit = "openresty.service"
socket_group = "nginx"

[watch]
enabled = false

[pool.x]
exec = "/bin/x"
args = ["a", "b c"]
description = "  X pool  "
environment = { A = "1", _b = "two words" }
route = "/x"
min = 1
max = 512
notify = true
watchdog_sec = 30
restart_sec = "0"
runtime_max_sec = "infinity"
memory_max = "50%"
cpu_quota = "150%"
tasks_max = 10
user = "www-x"
read_write_paths = ["/var/lib/x"]
read_only_paths = ["/srv"]
private_network = false
protocol = "http"
gateway = "/opt/cgipool/bin/cgipool"
working_directory = "/var/lib/x"
request_timeout = "2min"
body_limit = "10M"
rate_limit = "5r/m"
burst = 3
max_connections = 7
"#);
        assert_eq!(c.nginx.unit, "openresty.service");
        assert_eq!(c.nginx.socket_group, "nginx");
        assert!(!c.watch_enabled);
        let x = &c.pools["x"];
        assert_eq!(x.args, ["a", "b c"]);
        assert_eq!(x.description, "X pool");
        assert_eq!(
            x.environment.get("_b").map(String::as_str),
            Some("two words")
        );
        assert_eq!((x.min, x.max), (1, 512));
        assert_eq!(x.watchdog_sec.as_deref(), Some("30s"));
        assert_eq!(x.restart_sec, "0");
        assert_eq!(x.runtime_max_sec.as_deref(), Some("infinity"));
        assert_eq!(x.tasks_max, "10");
        assert_eq!(x.request_timeout, "2min");
        assert_eq!(x.burst, 3);
        assert_eq!(x.max_connections, Some(7));
        assert!(!x.private_network);
        assert_eq!(x.protocol, Protocol::Http);
        assert_eq!(x.gateway, Path::new("/opt/cgipool/bin/cgipool"));
    }

    #[test]
    fn defaults_merge() {
        let c = ok(r#"
[defaults]
min = 3
max = 9
memory_max = "1G"
environment = { A = "default", B = "default" }

[pool.a]
exec = "/bin/a"
route = "/a"
max = 4
environment = { B = "pool" }

[pool.b]
exec = "/bin/b"
route = "/b"
"#);
        let a = &c.pools["a"];
        assert_eq!((a.min, a.max, a.memory_max.as_str()), (3, 4, "1G"));
        assert_eq!(
            a.environment,
            BTreeMap::from([("A".into(), "default".into()), ("B".into(), "pool".into())])
        );
        let b = &c.pools["b"];
        assert_eq!((b.min, b.max), (3, 9));
        assert_eq!(b.environment["B"], "default");
    }

    #[test]
    fn burst_defaults_to_10_with_rate_limit() {
        let c = ok(&pool_with("rate_limit = \"20r/s\""));
        assert_eq!(c.pools["p"].burst, 10);
        let c = ok(&pool_with("rate_limit = \"20r/s\"\nburst = 0"));
        assert_eq!(c.pools["p"].burst, 0);
    }

    #[test]
    fn durations() {
        for (s, us) in [
            ("100ms", 100_000),
            ("5s", 5_000_000),
            ("1min 30s", 90_000_000),
            ("1min30s", 90_000_000),
            ("2h", 7_200_000_000),
            ("5", 5_000_000),
            ("1.5s", 1_500_000),
            ("250us", 250),
            ("1d", 86_400_000_000),
        ] {
            assert_eq!(duration_usec(s), Some(us), "{s}");
        }
        for s in ["", "s", "5 parsecs", "-1s", "1.s.", "5M", "1y", "1e3"] {
            assert_eq!(duration_usec(s), None, "{s}");
        }
        assert_eq!(format_systemd_usec(90_000_000), "90s");
        assert_eq!(format_systemd_usec(120_000_000), "2min");
        assert_eq!(format_systemd_usec(1_500), "1500us");
        assert_eq!(format_nginx_usec(90_000_000).as_deref(), Some("90s"));
        assert_eq!(format_nginx_usec(1_500_000).as_deref(), Some("1500ms"));
        assert_eq!(format_nginx_usec(1_500), None);
        let c = ok(&pool_with("restart_sec = \"1min 30s\""));
        assert_eq!(c.pools["p"].restart_sec, "90s");
    }

    #[test]
    fn all_errors_at_once_with_positions() {
        let text = r#"[nginx]
upstreams = "relative.conf"
colour = "blue"

[pool.search]
exec = "bin/search"
route = "/api/search"
min = 6
max = 5
mim = 1

[pool.Bad-Name]
exec = "/bin/x"
route = "/x"

[pool.auth]
route = "/api/search"
health_path = "health"
"#;
        let e = errs(text);
        assert_eq!(
            e,
            [
                "t.toml:2:13: nginx.upstreams: must be an absolute path, got \"relative.conf\"",
                "t.toml:3:1: nginx.colour: unknown key `colour` in [nginx]",
                "t.toml:6:8: pool.search.exec: must be an absolute path, got \"bin/search\"",
                "t.toml:8:7: pool.search.min: min (6) must not be greater than max (5)",
                "t.toml:10:1: pool.search.mim: unknown key `mim` in [pool.search]; did you mean `min`?",
                "t.toml:12:7: pool.Bad-Name: invalid pool name \"Bad-Name\": use [a-z0-9][a-z0-9_]*, at most 32 characters",
                "t.toml:16:1: pool.auth.exec: missing required key `exec` (absolute path of the worker program)",
                "t.toml:18:15: pool.auth.health_path: must start with `/`, got \"health\"",
            ]
        );
    }

    #[test]
    fn duplicate_route_is_reported_at_the_second() {
        let e = errs(
            "[pool.a]\nexec = \"/bin/a\"\nroute = \"/r\"\n[pool.b]\nexec = \"/bin/b\"\nroute = \"/r\"\n",
        );
        assert_eq!(
            e,
            ["t.toml:6:9: pool.b.route: route \"/r\" is already used by pool.a"]
        );
    }

    #[test]
    fn syntax_error_has_position() {
        let e = errs("[pool.a]\nexec = \"/bin/a\nroute = 1\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.toml:2:"), "{e:?}");
    }

    #[test]
    fn io_error_names_file() {
        let e = load(Path::new("/nonexistent/cgipool.toml")).unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("/nonexistent/cgipool.toml: cannot read config file:"),
            "{s}"
        );
    }

    #[test]
    fn no_pools() {
        assert_eq!(
            errs("[nginx]\n"),
            ["t.toml:1:1: pool: no pools defined: add at least one [pool.NAME] table"]
        );
    }

    #[test]
    fn unknown_top_level_and_typo() {
        let e = errs(&format!("{}\n[pools.x]\nexec = 1\n", pool_with("")));
        assert_eq!(e.len(), 1);
        assert!(e[0].contains("unknown key `pools` in the top level; did you mean `pool`?"));
    }

    #[test]
    fn defaults_errors_reported_once_at_defaults() {
        let text = "[defaults]\nmin = 0\nroute = \"/x\"\nbogus = 1\n\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n\n[pool.b]\nexec = \"/bin/b\"\nroute = \"/b\"\n";
        assert_eq!(
            errs(text),
            [
                "t.toml:2:7: defaults.min: must be between 1 and 512, got 0",
                "t.toml:3:1: defaults.route: route cannot be set in [defaults]: every pool needs its own route",
                "t.toml:4:1: defaults.bogus: unknown key `bogus` in [defaults]",
            ]
        );
    }

    #[test]
    fn pool_names() {
        ok("[pool.a_1]\nexec = \"/bin/a\"\nroute = \"/a\"\n");
        ok("[pool.9lives]\nexec = \"/bin/a\"\nroute = \"/a\"\n");
        for bad in ["_a", "A", "a-b", "\"a b\"", "\"\"", &"x".repeat(33)] {
            let e = errs(&format!(
                "[pool.{bad}]\nexec = \"/bin/a\"\nroute = \"/a\"\n"
            ));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].contains("invalid pool name"), "{bad}: {e:?}");
        }
        ok(&format!(
            "[pool.{}]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
            "x".repeat(32)
        ));
    }

    #[test]
    fn type_errors() {
        assert_eq!(
            one_err("min = \"2\""),
            "t.toml:4:7: pool.p.min: expected an integer, found string"
        );
        assert_eq!(
            one_err("notify = 1"),
            "t.toml:4:10: pool.p.notify: expected a boolean (true or false), found integer"
        );
        assert_eq!(
            one_err("args = [\"a\", 2]"),
            "t.toml:4:14: pool.p.args[1]: expected a string, found integer"
        );
        assert!(one_err("args = \"a\"").contains("expected an array of strings"));
        assert!(one_err("environment = [\"A=1\"]").contains("expected a table of strings"));
        assert!(
            one_err("environment = { A = 1 }").contains("pool.p.environment.A: expected a string")
        );
    }

    #[test]
    fn ranges() {
        assert!(one_err("min = 0").contains("must be between 1 and 512, got 0"));
        assert!(one_err("max = 513").contains("must be between 1 and 512, got 513"));
        assert!(one_err("min = -1").contains("must be between 1 and 512"));
        // min > max where max comes from the default (5).
        assert!(one_err("min = 6").contains("min (6) must not be greater than max (5)"));
        // max < default min (2): reported at the pool header.
        assert_eq!(
            one_err("max = 1"),
            "t.toml:1:1: pool.p.min: min (2) must not be greater than max (1)"
        );
        ok(&pool_with("min = 1\nmax = 1"));
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
            ("protocol = \"fastcgi\"", "expected \"http\" or \"cgi\""),
            ("max_connections = 0", "must be between 1 and"),
            ("burst = -1", "must be between 0 and"),
        ] {
            let e = one_err(bad);
            assert!(e.contains(msg), "{bad}: {e}");
            assert!(e.starts_with("t.toml:4:"), "{bad}: {e}");
        }
    }

    #[test]
    fn own_binary_must_fit_in_a_unit() {
        assert_eq!(binary_problem(Path::new("/usr/bin/cgipool")), Ok(()));
        let e = binary_problem(Path::new("/home/a b/cgipool")).unwrap_err();
        assert!(
            e.contains("/home/a b/cgipool") && e.contains("whitespace"),
            "{e}"
        );
    }

    #[test]
    fn cgi_pools() {
        let c = ok(&pool_with("protocol = \"cgi\""));
        assert_eq!(c.pools["p"].protocol, Protocol::Cgi);
        assert_eq!(c.pools["p"].gateway, crate::paths::cgipool_binary());
        for bad in ["notify = true", "watchdog_sec = \"5s\""] {
            let e = errs(&pool_with(&format!("protocol = \"cgi\"\n{bad}")));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(
                e[0].contains("not available for protocol = \"cgi\""),
                "{e:?}"
            );
        }
    }

    #[test]
    fn watch_keys() {
        let c = ok(&pool_with(
            "health_path = \"/healthz\"\nhealth_interval = \"1500ms\"\nunhealthy_after = 2",
        ));
        let p = &c.pools["p"];
        assert_eq!(p.health_path.as_deref(), Some("/healthz"));
        assert_eq!(
            (
                p.health_interval.as_str(),
                p.health_timeout.as_str(),
                p.unhealthy_after
            ),
            ("1500ms", "2s", 2)
        );
        assert!(one_err("health_path = \"healthz\"").contains("must start with `/`"));
        assert!(one_err("health_path = \"/a b\"").contains("only letters"));
        assert!(one_err("unhealthy_after = 0").contains("pool.p.unhealthy_after"));
        assert!(one_err("health_timeout = \"0\"").contains("pool.p.health_timeout"));
        assert!(
            errs("[watch]\nenabled = \"yes\"\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n")[0]
                .contains("watch.enabled: expected a boolean")
        );
        assert!(
            errs("[watch]\ninterval = 1\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n")[0]
                .contains("unknown key `interval` in [watch]")
        );
    }

    #[test]
    fn nginx_section() {
        for (bad, msg) in [
            ("unit = \"nginx\"", "invalid unit name"),
            ("unit = \"ng inx.service\"", "invalid unit name"),
            ("socket_group = \"www data\"", "invalid group name"),
            (
                "check_address = \"192.0.2.1:80\"",
                "expected a loopback host:port",
            ),
            (
                "check_address = \"localhost\"",
                "expected a loopback host:port",
            ),
            (
                "upstreams = \"/etc/nginx/snippets/cgipool-locations.conf\"",
                "must differ",
            ),
        ] {
            let e = errs(&format!(
                "[nginx]\n{bad}\n[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n"
            ));
            assert_eq!(e.len(), 1, "{bad}: {e:?}");
            assert!(e[0].contains(msg), "{bad}: {e:?}");
        }
    }

    #[test]
    fn col_counts_characters() {
        let e = errs("[pool.p]\nexec = \"/bin/p\"\ndescription = \"é\" ; route = 1\n");
        assert!(!e.is_empty());
        let e = errs("[pool.p]\nexec = \"/bin/p\"\nroute = \"/p\"\n# é\nmin =   \"x\"\n");
        assert_eq!(
            e,
            ["t.toml:5:9: pool.p.min: expected an integer, found string"]
        );
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
    }

    #[test]
    fn inline_and_dotted_pools() {
        let c = ok("pool.a = { exec = \"/bin/a\", route = \"/a\" }\n[pool.b]\nexec = \"/bin/b\"\nroute = \"/b\"\n");
        assert_eq!(c.pools.len(), 2);
        let e = errs("pool.a = { exec = \"/bin/a\" }\n");
        assert_eq!(
            e,
            ["t.toml:1:6: pool.a.route: missing required key `route` (e.g. \"/api/NAME\")"]
        );
    }

    #[test]
    fn odd_shapes_are_errors_not_panics() {
        for text in [
            "pool = 1\n",
            "[[pool]]\nexec = \"/bin/a\"\n",
            "pool.a = 1\n",
            "[pool]\n",
            "nginx = 1\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
            "watch = []\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
            "defaults = \"x\"\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
            "[defaults]\nenvironment = 1\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
            "[defaults]\nexec = \"rel\"\n[pool.a]\nroute = \"/a\"\n[pool.b]\nroute = \"/b\"\n",
            "[nginx]\nupstreams = 1\n[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\n",
            "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nenvironment.A.B = \"x\"\n",
            "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nmin = 99999999999999\n",
            "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nwatchdog_sec = 99999999999999999\n",
            "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nrestart_sec = \"99999999999999999999h\"\n",
            "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nrestart_sec = \"1.99999999999999999999s\"\nmin=0\n",
            "\u{feff}[pool.é]\n",
            "[pool.a]\nexec = \"/bin/a\"\nroute = \"/a\"\nexec = \"/bin/b\"\n",
        ] {
            let e = errs(text);
            assert!(!e.is_empty(), "{text:?}");
            for d in &e {
                assert!(d.starts_with("t.toml:"), "{text:?}: {d}");
            }
        }
        // An invalid default exec is reported once, not as "missing exec".
        let e = errs(
            "[defaults]\nexec = \"rel\"\n[pool.a]\nroute = \"/a\"\n[pool.b]\nroute = \"/b\"\n",
        );
        assert_eq!(
            e,
            ["t.toml:2:8: defaults.exec: must be an absolute path, got \"rel\""]
        );
    }
}
