//! The worker contract's settings that reach every worker through its
//! environment (the rendered unit sets them; README "The worker contract"):
//!
//! - `CGIPOOL_ACCESS_LOG` = `1` or `0`: one log line per request, or only
//!   the lines of requests that went wrong (errors are always logged).
//!   Unset: `1`.
//! - `CGIPOOL_MAX_REQUESTS` = N: after N requests the worker answers the
//!   last one with `Connection: close`, finishes what it already received
//!   and exits 0 (systemd starts a fresh one). Unset, empty or `0`: no
//!   limit.

use anyhow::{bail, Result};

pub const ACCESS_LOG: &str = "CGIPOOL_ACCESS_LOG";
pub const MAX_REQUESTS: &str = "CGIPOOL_MAX_REQUESTS";

/// What the environment asks of this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contract {
    pub access_log: bool,
    /// None: no limit.
    pub max_requests: Option<u64>,
}

impl Contract {
    /// From the process environment.
    pub fn from_env() -> Result<Contract> {
        Contract::from_vars(
            std::env::var(ACCESS_LOG).ok().as_deref(),
            std::env::var(MAX_REQUESTS).ok().as_deref(),
        )
    }

    pub fn from_vars(access_log: Option<&str>, max_requests: Option<&str>) -> Result<Contract> {
        let access_log = match access_log {
            None | Some("1") => true,
            Some("0") => false,
            Some(v) => bail!("{ACCESS_LOG}={v:?}: expected 0 or 1"),
        };
        let max_requests = match max_requests {
            None | Some("") | Some("0") => None,
            Some(v) if v.bytes().all(|b| b.is_ascii_digit()) => match v.parse::<u64>() {
                Ok(n) => Some(n),
                Err(_) => bail!("{MAX_REQUESTS}={v:?}: too large"),
            },
            Some(v) => bail!("{MAX_REQUESTS}={v:?}: expected a number of requests"),
        };
        Ok(Contract {
            access_log,
            max_requests,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_values() {
        let c = Contract::from_vars(None, None).unwrap();
        assert_eq!(
            c,
            Contract {
                access_log: true,
                max_requests: None
            }
        );
        let c = Contract::from_vars(Some("0"), Some("25")).unwrap();
        assert!(!c.access_log);
        assert_eq!(c.max_requests, Some(25));
        assert_eq!(
            Contract::from_vars(Some("1"), Some("0"))
                .unwrap()
                .max_requests,
            None
        );
        assert!(Contract::from_vars(Some("yes"), None).is_err());
        assert!(Contract::from_vars(None, Some("-1")).is_err());
        assert!(Contract::from_vars(None, Some("1e3")).is_err());
        assert!(Contract::from_vars(None, Some("99999999999999999999999")).is_err());
    }
}
