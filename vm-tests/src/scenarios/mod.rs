//! The scenario list. Each module owns the scenarios of one issue.
mod cgi;
pub mod common;
mod control;
mod core;
mod deb;
pub mod edge;
mod fastcgi;
mod fastcgi_watch;
mod figures;
mod harness;
mod hosts;
mod hosts_failover;
mod hosts_fastcgi;
mod hosts_kill;
mod hosts_power;
mod hosts_scale;
mod hosts_unreachable;
mod machine_tier;
mod queue;
mod reaper;
mod watch;

use crate::{LabScenario, Scenario};

pub fn all() -> Vec<Scenario> {
    let mut v = Vec::new();
    v.extend(harness::scenarios());
    v.extend(core::scenarios());
    v.extend(edge::scenarios());
    v.extend(machine_tier::scenarios());
    v.extend(cgi::scenarios());
    v.extend(watch::scenarios());
    v.extend(control::scenarios());
    v.extend(deb::scenarios());
    v.extend(fastcgi::scenarios());
    v.extend(fastcgi_watch::scenarios());
    v.extend(queue::scenarios());
    v.extend(reaper::scenarios());
    v.extend(figures::scenarios());
    v
}

/// Scenarios over several machines (lab.rs).
pub fn labs() -> Vec<LabScenario> {
    let mut v = Vec::new();
    v.extend(hosts::scenarios());
    v
}
