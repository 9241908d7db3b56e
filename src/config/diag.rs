//! Diagnostics: what a problem looks like ([`Diagnostic`], [`ConfigError`]),
//! where it is (line and column), the [`Cx`] that collects them, "did you
//! mean" suggestions, and the typed accessors that report type errors.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml_edit::{Item, TableLike};

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

// ---------------------------------------------------------------------------
// Diagnostics context

pub(super) struct Cx<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
    pub(super) diags: Vec<Diagnostic>,
    /// Every error counts, including duplicates dropped from `diags`.
    pub(super) errors: usize,
}

impl Cx<'_> {
    pub(super) fn err(
        &mut self,
        span: Option<Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) {
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

    pub(super) fn into_error(mut self) -> ConfigError {
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
pub(super) struct Src<'d> {
    /// The key itself (last segment, unquoted).
    pub(super) name: String,
    /// Dotted key where the value was written, e.g. `defaults.min`.
    pub(super) key: String,
    pub(super) key_span: Option<Range<usize>>,
    pub(super) item: &'d Item,
}

impl Src<'_> {
    /// Where to point at for a problem with the value.
    pub(super) fn span(&self) -> Option<Range<usize>> {
        self.item.span().or_else(|| self.key_span.clone())
    }
}

/// The entries of a table-like item, with key spans, in document order.
pub(super) fn entries<'d>(prefix: &str, table: &'d dyn TableLike) -> Vec<Src<'d>> {
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

pub(super) fn unknown_key(cx: &mut Cx<'_>, src: &Src<'_>, known: &[&str], what: &str) {
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

pub(super) fn type_err(cx: &mut Cx<'_>, src: &Src<'_>, expected: &str) {
    cx.err(
        src.span(),
        &src.key,
        format!("expected {expected}, found {}", src.item.type_name()),
    );
}

pub(super) fn get_str(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<String> {
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
    } else if s.ends_with('\\') {
        // A unit-file line that ends in a backslash continues on the next.
        cx.err(
            span,
            key,
            "must not end with a backslash (systemd would join the next line to it)",
        );
        false
    } else {
        true
    }
}

pub(super) fn get_bool(cx: &mut Cx<'_>, src: &Src<'_>) -> Option<bool> {
    let b = src.item.as_bool();
    if b.is_none() {
        type_err(cx, src, "a boolean (true or false)");
    }
    b
}

pub(super) fn get_u32(cx: &mut Cx<'_>, src: &Src<'_>, lo: u32, hi: u32) -> Option<u32> {
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
pub(super) fn get_str_list(
    cx: &mut Cx<'_>,
    src: &Src<'_>,
) -> Option<Vec<(String, Option<Range<usize>>)>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{errs, one_err};
    use pretty_assertions::assert_eq;

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
            one_err("access_log = \"yes\""),
            "t.toml:4:14: pool.p.access_log: expected a boolean (true or false), found string"
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
}
