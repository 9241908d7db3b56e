//! How fast this run's guests are. Every wait in the harness and the
//! scenarios was sized on a quiet 2-core machine; a slower machine (TCG speed
//! differs 2× between machines of one kind) or busy neighbours stretch what a
//! guest does in a given time. At each boot the harness times a fixed amount
//! of work inside the guest (a shell loop and forty fork+exec, what test
//! commands spend their time on) and the boot itself, compares both with the
//! reference machine, and scales every wait by the slowest ratio seen so far
//! in this run, never below 1. `VM_TEST_TIMEOUT_FACTOR` multiplies on top.
use std::sync::Mutex;
use std::time::Duration;

use crate::machine::Tier;

/// The work timed in the guest; prints its own duration in milliseconds,
/// measured inside the guest so the agent's round trip is not in it.
pub const WORKLOAD: &str = "s=$(date +%s%N); i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
     for j in $(seq 40); do /bin/true; done; echo $(( ($(date +%s%N) - s) / 1000000 ))";

/// What the reference machine took (2 shared cores, quiet, 2026-12):
/// (workload, boot to `running`). Boot is 11–16 s there; under TCG the
/// workload took about a ninth of the boot in every run measured.
fn reference(tier: Tier) -> (Duration, Duration) {
    match tier {
        Tier::Nspawn => (Duration::from_millis(120), Duration::from_secs(2)),
        Tier::Qemu => (Duration::from_millis(1800), Duration::from_secs(16)),
    }
}

/// Slowdowns above this are reported as such: the machine is too slow or
/// too busy for the tests to mean anything.
pub const MAX_FACTOR: f64 = 20.0;

static SEEN: Mutex<[f64; 2]> = Mutex::new([1.0, 1.0]);

fn slot(tier: Tier) -> usize {
    match tier {
        Tier::Nspawn => 0,
        Tier::Qemu => 1,
    }
}

/// One boot's measurement.
#[derive(Debug, Clone, Copy)]
pub struct Measurement {
    pub tier: Tier,
    pub workload: Duration,
    pub boot: Duration,
}

impl Measurement {
    /// This boot's slowdown against the reference machine, at least 1.
    pub fn factor(&self) -> f64 {
        let (work, boot) = reference(self.tier);
        let w = self.workload.as_secs_f64() / work.as_secs_f64();
        let b = self.boot.as_secs_f64() / boot.as_secs_f64();
        w.max(b).clamp(1.0, MAX_FACTOR)
    }
}

/// Records a boot's measurement; returns the factor in force for this tier
/// from now on (the largest seen in this run: a machine that was slow once
/// may be slow again).
pub fn record(m: &Measurement) -> f64 {
    let f = m.factor();
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    let s = &mut seen[slot(m.tier)];
    *s = s.max(f);
    *s
}

/// The factor in force for `tier` (1 before its first boot).
pub fn current(tier: Tier) -> f64 {
    SEEN.lock().unwrap_or_else(|e| e.into_inner())[slot(tier)]
}

/// Describes a measurement for transcripts and the demo.
pub fn describe(m: &Measurement, in_force: f64) -> String {
    let (work, boot) = reference(m.tier);
    format!(
        "calibration: workload {} ms (reference {} ms), boot {:.1} s (reference {:.0} s): this boot {:.2}x, waits scaled by {:.2}x",
        m.workload.as_millis(),
        work.as_millis(),
        m.boot.as_secs_f64(),
        boot.as_secs_f64(),
        m.factor(),
        in_force
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_is_the_slowest_ratio_and_never_below_one() {
        let quick = Measurement {
            tier: Tier::Qemu,
            workload: Duration::from_millis(100),
            boot: Duration::from_secs(5),
        };
        assert_eq!(quick.factor(), 1.0);
        let slow_boot = Measurement {
            boot: Duration::from_secs(32),
            ..quick
        };
        assert!((slow_boot.factor() - 2.0).abs() < 1e-9);
        let slow_work = Measurement {
            workload: Duration::from_millis(5400),
            ..slow_boot
        };
        assert!((slow_work.factor() - 3.0).abs() < 1e-9);
        let absurd = Measurement {
            workload: Duration::from_secs(3600),
            ..quick
        };
        assert_eq!(absurd.factor(), MAX_FACTOR);
    }

    #[test]
    fn the_largest_factor_seen_stays_in_force() {
        let m = |ms| Measurement {
            tier: Tier::Nspawn,
            workload: Duration::from_millis(ms),
            boot: Duration::from_millis(300),
        };
        assert!((record(&m(360)) - 3.0).abs() < 1e-9);
        assert!((record(&m(120)) - 3.0).abs() < 1e-9);
        assert!((current(Tier::Nspawn) - 3.0).abs() < 1e-9);
    }
}
