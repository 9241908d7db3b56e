//! Unit lists as an operator reads them: the instances of a pool collapse
//! into bash brace ranges (`cgipool-cp@{1..100}.service`), so the line for
//! 1,000 workers stays short and still pastes into `systemctl`.
use crate::plan::parse_instance;
use std::collections::BTreeMap;

/// `units` with runs of consecutive instances of one pool and kind written
/// as `{a..b}`; other names as they are, first, in their order.
pub fn unit_list(units: &[String]) -> String {
    let mut instances: BTreeMap<(&str, &str), Vec<u32>> = BTreeMap::new();
    let mut out: Vec<String> = Vec::new();
    for unit in units {
        match parse_instance(unit) {
            Some((pool, n, kind)) => instances.entry((pool, kind)).or_default().push(n),
            None => out.push(unit.clone()),
        }
    }
    for ((pool, kind), mut ns) in instances {
        ns.sort_unstable();
        ns.dedup();
        for (a, b) in runs(&ns) {
            out.push(if a == b {
                format!("cgipool-{pool}@{a}.{kind}")
            } else {
                format!("cgipool-{pool}@{{{a}..{b}}}.{kind}")
            });
        }
    }
    out.join(" ")
}

/// Runs of consecutive numbers in a sorted, deduplicated list.
fn runs(ns: &[u32]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &n in ns {
        match out.last_mut() {
            Some((_, b)) if b.checked_add(1) == Some(n) => *b = n,
            _ => out.push((n, n)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::unit_list;

    fn list(units: &[&str]) -> String {
        unit_list(&units.iter().map(|u| u.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn one_unit_is_named_as_it_is() {
        assert_eq!(list(&["cgipool-slow@2.service"]), "cgipool-slow@2.service");
    }

    #[test]
    fn consecutive_instances_collapse_per_pool_and_kind() {
        let mut units: Vec<String> = (1..=100)
            .flat_map(|n| {
                [
                    format!("cgipool-cp@{n}.socket"),
                    format!("cgipool-cp@{n}.service"),
                ]
            })
            .collect();
        units.push("cgipool-cp.target".into());
        units.push("cgipool-b@3.service".into());
        units.push("cgipool-b@1.service".into());
        assert_eq!(
            unit_list(&units),
            "cgipool-cp.target cgipool-b@1.service cgipool-b@3.service \
             cgipool-cp@{1..100}.service cgipool-cp@{1..100}.socket"
        );
    }

    #[test]
    fn gaps_and_duplicates() {
        assert_eq!(
            list(&[
                "cgipool-a@5.service",
                "cgipool-a@1.service",
                "cgipool-a@2.service",
                "cgipool-a@2.service",
                "cgipool-a@7.service",
                "cgipool-a@6.service"
            ]),
            "cgipool-a@{1..2}.service cgipool-a@{5..7}.service"
        );
    }
}
