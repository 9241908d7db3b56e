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
//!
//! Layout: [`model`] holds the validated types and their constants, [`diag`]
//! the diagnostics and typed accessors, [`values`] the single-value
//! validators, [`duration`] the systemd time-span syntax, [`pool`] the pool
//! keys and [`sections`] the top level, `[nginx]` and `[watch]`.

use std::path::Path;

use toml_edit::TableLike;

mod diag;
mod duration;
mod fastcgi;
mod hosts;
mod keys;
mod model;
mod pool;
mod sections;
#[cfg(test)]
mod tests;
mod values;

pub use diag::{ConfigError, Diagnostic};
pub use duration::{duration_usec, format_nginx_usec};
pub use model::{
    Config, FastCgi, Host, ListenFd, Nginx, Pool, Protocol, Queue, DEFAULT_CONFIG, LOCAL_HOST,
};
pub(crate) use values::abs_path_problem;

use diag::Cx;
use sections::parse_root;

/// Read and validate a config file; returns it with the exact text parsed.
pub fn load(path: &Path) -> Result<(Config, String), ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(path, &text).map(|cfg| (cfg, text)),
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
            let mut msg = e.message().trim_end().to_string();
            // toml_edit says "duplicate key" without the key: its span has it.
            if let Some(key) = e
                .span()
                .and_then(|r| text.get(r))
                .filter(|k| msg == "duplicate key" && !k.is_empty())
            {
                msg = format!("duplicate key `{}`", key.trim());
            }
            cx.err(e.span(), "", msg);
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
