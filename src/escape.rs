//! Escapers for the files cgipool generates.
//!
//! Two layers, so that nothing reaches a unit file or an nginx file unescaped:
//!
//! 1. **Auto-escapers** (configured per template extension in `askama.toml`):
//!    every `{{ expr }}` in a `.service`/`.socket`/`.target` template goes
//!    through [`Unit`] (`%` → `%%`, the only character systemd treats
//!    specially in every setting: specifier expansion), and every `{{ expr }}`
//!    in a `.conf` template goes through [`Nginx`] (backslash-escapes the
//!    characters that could end an nginx token or directive).
//! 2. **Context filters** (in [`filters`]) for the places where systemd
//!    applies extra syntax on top of specifiers: `exec_arg` quotes one
//!    `ExecStart=` argument (C-style quoting, `$` → `$$`), `env_quote` quotes
//!    one `Environment=` assignment. Their output is *still* run through the
//!    auto-escaper, which adds the `%` → `%%` step; the two steps commute
//!    because they touch disjoint characters.
//!
//! Newlines and other control characters are never escaped: config
//! validation rejects them, so they cannot get here from a validated config.
//! The escapers still neutralise them (defence in depth) rather than letting
//! them start a new line.

use std::fmt::{self, Write};

/// askama escaper for systemd unit files: `%` → `%%`.
///
/// Control characters (which validation rejects) are replaced by `?` so a
/// value can never start a new line in a unit file.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unit;

impl askama::filters::Escaper for Unit {
    fn write_escaped_str<W: Write>(&self, mut dest: W, string: &str) -> fmt::Result {
        for c in string.chars() {
            match c {
                '%' => dest.write_str("%%")?,
                c if c.is_control() => dest.write_char('?')?,
                c => dest.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// askama escaper for nginx configuration files.
///
/// Validation rejects everything this escapes, so for a validated config it
/// is the identity. For anything else it guarantees that an interpolated
/// value stays one token: `\`, `"`, `'`, `;`, `{`, `}`, `#` and whitespace
/// are backslash-escaped (nginx's tokenizer never ends a token at an escaped
/// character) and control characters are written as `\n`, `\r`, `\t` (which
/// nginx unescapes) or replaced by `?`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Nginx;

impl askama::filters::Escaper for Nginx {
    fn write_escaped_str<W: Write>(&self, mut dest: W, string: &str) -> fmt::Result {
        for c in string.chars() {
            match c {
                '\\' | '"' | '\'' | ';' | '{' | '}' | '#' | ' ' => {
                    dest.write_char('\\')?;
                    dest.write_char(c)?;
                }
                '\n' => dest.write_str("\\n")?,
                '\r' => dest.write_str("\\r")?,
                '\t' => dest.write_str("\\t")?,
                c if c.is_control() || c.is_whitespace() => dest.write_char('?')?,
                c => dest.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// `%` → `%%` (and control characters → `?`), i.e. what [`Unit`] does, as a
/// plain function (for tests; templates use the escaper).
#[cfg(test)]
pub fn unit(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // Writing into a String cannot fail.
    let _ = askama::filters::Escaper::write_escaped_str(&Unit, &mut out, s);
    out
}

/// What [`Nginx`] does, as a plain function (for tests).
#[cfg(test)]
pub fn nginx(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let _ = askama::filters::Escaper::write_escaped_str(&Nginx, &mut out, s);
    out
}

/// Backslash-escape `\` and `"` and wrap in double quotes: systemd's quoting
/// for a word that is unquoted with C-unescaping (`ExecStart=`,
/// `Environment=`). Control characters become `?` (validation rejects them).
fn quote_c(s: &str, dollar: bool) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '$' if dollar => out.push_str("$$"),
            c if c.is_control() => out.push('?'),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One `ExecStart=` argument: double-quoted, `\` and `"` backslash-escaped,
/// `$` → `$$` (systemd expands `$VAR` in command lines). Does NOT double
/// `%`: the [`Unit`] auto-escaper does that when the result is interpolated.
pub fn exec_arg(s: &str) -> String {
    quote_c(s, true)
}

/// One `Environment=` assignment `"KEY=value"`: double-quoted, `\` and `"`
/// backslash-escaped; `$` stays literal (`Environment=` does not expand
/// variables). Does NOT double `%` (the [`Unit`] auto-escaper does).
pub fn env_quote(key: &str, value: &str) -> String {
    quote_c(&format!("{key}={value}"), false)
}

/// For systemd settings whose parser does NOT expand specifiers
/// (`CPUQuota=`, `MemoryMax=`, `TasksMax=`): there `%%` would be taken
/// literally, so `%` must be written as is. Only `[A-Za-z0-9.%]` passes;
/// anything else (which validation rejects) becomes `?`.
pub fn no_specifiers(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '%' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// Template filters for the systemd quoting contexts. Their output is
/// auto-escaped again by the template's escaper (`%` → `%%`).
pub mod filters {
    use std::fmt::Display;

    /// `{{ arg|exec_arg }}`: see [`super::exec_arg`].
    #[askama::filter_fn]
    pub fn exec_arg(value: impl Display, _env: &dyn askama::Values) -> askama::Result<String> {
        Ok(super::exec_arg(&value.to_string()))
    }

    /// `{{ value|no_specifiers }}`: see [`super::no_specifiers`]. The result
    /// is marked safe so the `%` → `%%` auto-escaper leaves it alone; it
    /// cannot contain anything but `[A-Za-z0-9.%?]`.
    #[askama::filter_fn]
    pub fn no_specifiers(
        value: impl Display,
        _env: &dyn askama::Values,
    ) -> askama::Result<askama::filters::Safe<String>> {
        Ok(askama::filters::Safe(super::no_specifiers(
            &value.to_string(),
        )))
    }

    /// `{{ key|env_quote(value) }}`: see [`super::env_quote`].
    #[askama::filter_fn]
    pub fn env_quote(
        key: impl Display,
        _env: &dyn askama::Values,
        value: &str,
    ) -> askama::Result<String> {
        Ok(super::env_quote(&key.to_string(), value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NASTY: &str = r#"a % $HOME " \ ; b"#;

    #[test]
    fn unit_doubles_percent_only() {
        assert_eq!(unit(NASTY), r#"a %% $HOME " \ ; b"#);
        assert_eq!(unit("100%%i"), "100%%%%i");
        assert_eq!(unit("a\nb"), "a?b");
    }

    #[test]
    fn exec_arg_quotes() {
        assert_eq!(exec_arg(NASTY), r#""a % $$HOME \" \\ ; b""#);
        assert_eq!(exec_arg(""), r#""""#);
        // With the auto-escaper on top, as in a template:
        assert_eq!(unit(&exec_arg(NASTY)), r#""a %% $$HOME \" \\ ; b""#);
    }

    #[test]
    fn env_quote_keeps_dollar() {
        assert_eq!(env_quote("K", NASTY), r#""K=a % $HOME \" \\ ; b""#);
        assert_eq!(unit(&env_quote("K", NASTY)), r#""K=a %% $HOME \" \\ ; b""#);
    }

    #[test]
    fn nginx_escapes_token_breakers() {
        assert_eq!(nginx("/api/search"), "/api/search");
        assert_eq!(nginx("a; b{c}"), r"a\;\ b\{c\}");
        assert_eq!(nginx("x\"'\\"), r#"x\"\'\\"#);
        assert_eq!(nginx("a\nb"), r"a\nb");
        assert_eq!(nginx("$host"), "$host");
    }

    #[test]
    fn no_specifiers_passes_percent_only_with_safe_chars() {
        assert_eq!(no_specifiers("200%"), "200%");
        assert_eq!(no_specifiers("1.5G"), "1.5G");
        assert_eq!(no_specifiers("5%\nX=1"), "5%?X?1");
    }

    /// Inverse of systemd's handling of one quoted word (specifier `%%`,
    /// then C-unescape inside double quotes, then `$$` at exec time), to
    /// check the round trip.
    fn systemd_unquote(s: &str, dollar: bool) -> String {
        let s = s.replace("%%", "%");
        let inner = &s[1..s.len() - 1];
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                out.extend(chars.next());
            } else {
                out.push(c);
            }
        }
        if dollar {
            out.replace("$$", "$")
        } else {
            out
        }
    }

    #[test]
    fn round_trips() {
        for v in [
            NASTY, "", "%%", "$$", "\\\"", "plain", "a b  c", "\"'\"", "50%",
        ] {
            assert_eq!(systemd_unquote(&unit(&exec_arg(v)), true), v, "{v:?}");
            let e = systemd_unquote(&unit(&env_quote("K", v)), false);
            assert_eq!(e, format!("K={v}"), "{v:?}");
        }
    }
}
