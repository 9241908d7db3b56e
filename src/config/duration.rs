//! The systemd time-span syntax ("100ms", "1min 30s", "2h", "5") and its
//! normalised systemd and nginx spellings.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{ok, pool_with};
    use pretty_assertions::assert_eq;

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
}
