//! The autoscaling policy: a pure function of recent load samples. Scale up
//! when every sample of a short window saw requests waiting (double, up to
//! max); scale down when every sample of a longer window saw none (halve,
//! down to min). Windows that restart after each change give hysteresis and
//! a rate cap, so a pool does not flap.
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    /// How long a pool must be saturated before it grows.
    pub up_after: Duration,
    /// How long a pool must be idle before it shrinks.
    pub down_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at: Instant,
    /// Workers running now.
    pub workers: u32,
    /// Requests waiting for a worker, summed over the pool's sockets.
    pub waiting: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Scaler {
    pub policy: Policy,
    samples: VecDeque<Sample>,
    /// Samples before this instant belong to the previous count.
    since: Option<Instant>,
}

impl Scaler {
    pub fn new(policy: Policy) -> Scaler {
        Scaler {
            policy,
            samples: VecDeque::new(),
            since: None,
        }
    }

    /// Forget the window (after any change of the count, by anyone).
    pub fn reset(&mut self, now: Instant) {
        self.samples.clear();
        self.since = Some(now);
    }

    /// Adds a sample; returns a decision when the count should change.
    pub fn observe(&mut self, s: Sample) -> Option<Decision> {
        let keep = self.policy.up_after.max(self.policy.down_after);
        self.samples.push_back(s);
        // Keep one sample older than the longest window, so that a window's
        // start is always covered by history.
        while self.samples.len() > 1 && self.samples[1].at + keep <= s.at {
            self.samples.pop_front();
        }
        let n = s.workers;
        if n < self.policy.max {
            if let Some(peak) = self.all_within(self.policy.up_after, s.at, |x| x.waiting > 0) {
                let to = (n.max(1) * 2).min(self.policy.max);
                return Some(Decision {
                    from: n,
                    to,
                    reason: format!(
                        "saturated for {:.1}s: requests waiting in every sample (peak {peak} waiting on {n} workers)",
                        self.policy.up_after.as_secs_f64()
                    ),
                });
            }
        }
        if n > self.policy.min
            && self
                .all_within(self.policy.down_after, s.at, |x| x.waiting == 0)
                .is_some()
        {
            let to = n.div_ceil(2).max(self.policy.min);
            return Some(Decision {
                from: n,
                to,
                reason: format!(
                    "idle for {:.1}s: no request waited on {n} workers",
                    self.policy.down_after.as_secs_f64()
                ),
            });
        }
        None
    }

    /// If the samples cover the whole `window` before `now` (since the last
    /// change) and all satisfy `pred`, the peak waiting figure.
    fn all_within(
        &self,
        window: Duration,
        now: Instant,
        pred: impl Fn(&Sample) -> bool,
    ) -> Option<u32> {
        let start = now.checked_sub(window)?;
        if self.since.map(|s| s > start).unwrap_or(false) {
            return None; // the window reaches back before the last change
        }
        let first = self.samples.front()?;
        if first.at > start {
            return None; // not enough history yet
        }
        let in_window: Vec<&Sample> = self.samples.iter().filter(|x| x.at >= start).collect();
        if in_window.is_empty() || !in_window.iter().all(|x| pred(x)) {
            return None;
        }
        Some(in_window.iter().map(|x| x.waiting).max().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min: 2,
            max: 6,
            up_after: Duration::from_secs(2),
            down_after: Duration::from_secs(8),
        }
    }

    fn run(
        s: &mut Scaler,
        t0: Instant,
        from_ms: u64,
        to_ms: u64,
        workers: u32,
        waiting: u32,
    ) -> Vec<(u64, Decision)> {
        let mut out = Vec::new();
        let mut ms = from_ms;
        let mut workers = workers;
        while ms <= to_ms {
            let at = t0 + Duration::from_millis(ms);
            if let Some(d) = s.observe(Sample {
                at,
                workers,
                waiting,
            }) {
                workers = d.to;
                s.reset(at);
                out.push((ms, d));
            }
            ms += 250;
        }
        out
    }

    #[test]
    fn saturation_doubles_up_to_max_then_idle_halves_to_min() {
        let t0 = Instant::now();
        let mut s = Scaler::new(policy());
        s.reset(t0);
        let ups = run(&mut s, t0, 0, 10_000, 2, 20);
        let steps: Vec<(u32, u32)> = ups.iter().map(|(_, d)| (d.from, d.to)).collect();
        assert_eq!(steps, vec![(2, 4), (4, 6)]);
        assert_eq!(ups[0].0, 2000, "first step after the up window");
        assert!(ups[0].1.reason.contains("peak 20 waiting"));
        let downs = run(&mut s, t0, 10_250, 40_000, 6, 0);
        let steps: Vec<(u32, u32)> = downs.iter().map(|(_, d)| (d.from, d.to)).collect();
        assert_eq!(steps, vec![(6, 3), (3, 2)]);
        assert_eq!(
            downs[0].0, 18_250,
            "first step down one idle window after the load stopped"
        );
    }

    #[test]
    fn a_single_idle_sample_does_not_scale_up_and_a_single_busy_one_blocks_down() {
        let t0 = Instant::now();
        let mut s = Scaler::new(policy());
        s.reset(t0);
        for i in 0..20u64 {
            let waiting = if i == 5 { 0 } else { 3 };
            assert_eq!(
                s.observe(Sample {
                    at: t0 + Duration::from_millis(i * 100),
                    workers: 2,
                    waiting
                }),
                None
            );
        }
        let mut s = Scaler::new(policy());
        s.reset(t0);
        for i in 0..100u64 {
            let waiting = u32::from(i % 30 == 29);
            let d = s.observe(Sample {
                at: t0 + Duration::from_millis(i * 250),
                workers: 4,
                waiting,
            });
            assert_eq!(d, None, "sample {i}");
        }
    }

    #[test]
    fn jittered_sampling_still_decides() {
        let t0 = Instant::now();
        let mut s = Scaler::new(policy());
        s.reset(t0);
        let mut decided = None;
        for i in 0..200u64 {
            // 500 ms ticks that drift by a few ms, as a real loop does.
            let at = t0 + Duration::from_millis(i * 503 + (i * 7) % 11);
            if let Some(d) = s.observe(Sample {
                at,
                workers: 6,
                waiting: 0,
            }) {
                decided = Some((at - t0, d));
                break;
            }
        }
        let (when, d) = decided.expect("an idle pool above min must shrink");
        assert_eq!((d.from, d.to), (6, 3));
        assert!(
            when >= Duration::from_secs(8) && when < Duration::from_secs(9),
            "{when:?}"
        );
    }

    #[test]
    fn stays_within_bounds() {
        let t0 = Instant::now();
        let mut s = Scaler::new(policy());
        assert!(
            run(&mut s, t0, 0, 30_000, 6, 50).is_empty(),
            "already at max"
        );
        let mut s = Scaler::new(policy());
        assert!(
            run(&mut s, t0, 0, 30_000, 2, 0).is_empty(),
            "already at min"
        );
    }
}
