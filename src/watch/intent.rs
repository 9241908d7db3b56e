//! watch and the recorded intent: reading it again when someone recorded
//! a new one, keeping per pool and per worker only what that intent wants,
//! and recording watch's own scaling decisions in it (under the lock, only
//! while they still hold) before it converges; a restart after a failed
//! probe, too, is carried out only while it still holds.
use super::*;

/// Why a scaling decision made on an older view does not hold under the
/// intent recorded now (None: it holds): the pool's count moved, the pool
/// is gone, or the applied config's [min, max] no longer has its target.
pub(super) fn stale(intent: &Intent, pool: &str, decision: &scaler::Decision) -> Option<String> {
    let Some(now) = intent.counts.get(pool).copied() else {
        return Some("the intent has no such pool now".into());
    };
    if now != decision.from {
        return Some(format!("the intent says {now} now"));
    }
    match intent.config() {
        Ok(cfg) => match cfg.pools.get(pool) {
            Some(p) if (p.min..=p.max).contains(&decision.to) => None,
            Some(p) => Some(format!(
                "the applied config's [min, max] is [{}, {}] now",
                p.min, p.max
            )),
            None => Some("the applied config has no such pool now".into()),
        },
        Err(e) => Some(format!("{e:#}")),
    }
}

/// Why restarting `unit`, whose probe failed on an older view, does not
/// hold under the intent recorded now (None: it holds): the front no longer
/// runs that worker (systemd's restart would start it again, beyond the
/// count), or its pool no longer probes.
pub(super) fn restart_stale(intent: &Intent, unit: &str) -> Option<String> {
    let Some((pool, n, _)) = plan::parse_instance(unit) else {
        return Some("it is no worker".into());
    };
    let cfg = match intent.config() {
        Ok(cfg) => cfg,
        Err(e) => return Some(format!("{e:#}")),
    };
    let Some(p) = cfg.pools.get(pool) else {
        return Some("the applied config has no such pool now".into());
    };
    if p.health_path.is_none() {
        return Some(format!("pool {pool} no longer probes"));
    }
    let count = crate::hosts::front_counts(&cfg, &intent.counts)
        .get(pool)
        .copied()
        .unwrap_or(0);
    if !(1..=count).contains(&n) {
        return Some(format!(
            "the intent counts {count} for pool {pool} here now"
        ));
    }
    None
}

impl Watcher {
    /// The shared lock, if it can be had now. None while an apply, scale or
    /// down holds it (they are short; watch tries again at its next step);
    /// any other failure (the state directory unwritable, say) is logged
    /// once per cause, so that watch does not go quiet while it cannot act.
    pub(super) fn try_lock(&mut self) -> Option<state::Lock> {
        match state::lock(&self.paths, Duration::ZERO) {
            Ok(lock) => {
                if self.lock_error.take().is_some() {
                    println!("watch: the lock can be taken again");
                }
                Some(lock)
            }
            Err(e) if e.downcast_ref::<state::Busy>().is_some() => None,
            Err(e) => {
                let why = format!("{e:#}");
                if self.lock_error.as_deref() != Some(why.as_str()) {
                    eprintln!("watch: cannot take the lock, so nothing converges: {why}");
                    self.lock_error = Some(why);
                }
                None
            }
        }
    }

    /// Takes the recorded intent; pools whose limits did not change keep
    /// their window, and a changed count resets it.
    pub(super) fn set_intent(&mut self, intent: Intent) {
        let cfg = match intent.config() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("watch: {e:#}");
                return;
            }
        };
        let now = Instant::now();
        for (name, pool) in &cfg.pools {
            let p = policy(pool);
            if self
                .scalers
                .get(name)
                .map(|s| s.policy != p)
                .unwrap_or(true)
            {
                self.scalers.insert(name.clone(), Scaler::new(p));
            }
            let n = intent.counts.get(name).copied().unwrap_or(pool.min);
            if self.counts.insert(name.clone(), n) != Some(n) {
                if let Some(s) = self.scalers.get_mut(name) {
                    s.reset(now);
                }
            }
        }
        self.scalers.retain(|name, _| cfg.pools.contains_key(name));
        self.counts.retain(|name, _| cfg.pools.contains_key(name));
        // What watch holds per worker is for the front's workers this intent
        // wants, and a probe's for pools that still probe: a worker left
        // unhealthy after its pool lost its health_path (or after a scale
        // took it away) was kept out of nginx, or restarted, for good.
        let wanted = plan::numbered(&crate::hosts::front_counts(&cfg, &intent.counts));
        let is_wanted = |unit: &str| {
            plan::parse_instance(unit)
                .is_some_and(|(pool, n, _)| wanted.get(pool).is_some_and(|ns| ns.contains(&n)))
        };
        let probed = |unit: &str| {
            let pool = plan::parse_instance(unit)
                .map(|(pool, _, _)| pool)
                .or_else(|| {
                    unit.strip_prefix("cgipool-")
                        .and_then(|u| u.strip_suffix(".socket"))
                });
            pool.and_then(|p| cfg.pools.get(p))
                .is_some_and(|p| p.health_path.is_some())
        };
        self.unhealthy.retain(|u| is_wanted(u) && probed(u));
        self.probes
            .retain(|u, _| probed(u) && (u.ends_with(".socket") || is_wanted(u)));
        self.down_since.retain(|u, _| is_wanted(u));
        self.cfg = cfg;
        self.intent = Some(intent);
    }

    /// Re-reads the intent when someone recorded a new one.
    pub(super) fn refresh_intent(&mut self) {
        match state::read_intent(&self.paths) {
            Ok(Some(i)) => {
                if self.intent.as_ref().map(|c| c.serial) != Some(i.serial) {
                    println!(
                        "watch: intent {} (recorded by {}): watching {}",
                        i.serial,
                        i.written_by,
                        i.counts
                            .iter()
                            .map(|(p, n)| format!("{p}={n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    self.set_intent(i);
                }
            }
            Ok(None) => {
                if self.intent.take().is_some() {
                    println!("watch: the intent was removed (cgipool down); nothing to watch");
                    self.counts.clear();
                    self.cfg = no_config();
                }
            }
            Err(e) => eprintln!("watch: {e:#}"),
        }
    }

    /// One converge to the recorded intent under the shared lock, after
    /// `change`; false if it could not run or failed (retried later).
    pub(super) async fn converge(&mut self, systemd: &Systemd, why: &str, change: Change) -> bool {
        let Some(lock) = self.try_lock() else {
            return false; // next tick
        };
        self.release_held_probes();
        let mut intent = match state::read_intent(&self.paths) {
            Ok(Some(i)) => i,
            Ok(None) => return false,
            Err(e) => {
                eprintln!("watch: {why}: {e:#}");
                return false;
            }
        };
        if let Change::Scale { pool, decision } = &change {
            if let Some(why_not) = stale(&intent, pool, decision) {
                println!(
                    "watch: pool {pool}: dropping the decision {} -> {}: {why_not} (recorded by {})",
                    decision.from, decision.to, intent.written_by
                );
                drop(lock);
                self.refresh_intent();
                return false;
            }
            intent.counts.insert(pool.clone(), decision.to);
            intent.written_by = "watch".into();
            intent = match state::write_intent(&lock, intent) {
                Ok(i) => i,
                Err(e) => {
                    eprintln!("watch: {why}: {e:#}");
                    return false;
                }
            };
            let d = Decision {
                at_unix: intent.at_unix,
                by: "watch".into(),
                pool: pool.clone(),
                from: decision.from,
                to: decision.to,
                reason: decision.reason.clone(),
                serial: intent.serial,
            };
            if let Err(e) = state::log_decision(&self.paths, &d) {
                eprintln!("watch: logging the decision: {e:#}");
            }
            *self.scale_events.entry(pool.clone()).or_default() += 1;
            self.decisions.insert(pool.clone(), d);
            self.routed = None;
        }
        self.set_intent(intent.clone());
        println!("watch: {why}: converging to intent {}", intent.serial);
        let hosts_out = self.converge_hosts(&intent).await;
        let opts = apply::Options {
            job_timeout: Duration::from_secs(90),
            exclude: self.unhealthy.clone(),
            leave_failed: true,
            hosts_out: hosts_out.clone(),
        };
        let result = apply::converge_front(&lock, &intent, &opts, &Interrupt::never()).await;
        if let Change::Restart(unit) = &change {
            // Decided on the intent of the step; a scale or an apply may
            // have recorded another since (read above, under the lock).
            if let Some(why_not) = restart_stale(&intent, unit) {
                println!("watch: {unit}: not restarting it: {why_not}");
            } else {
                let job = Job::new(JobKind::Restart, unit.as_str());
                if let Err(e) = systemd.run_jobs(&[job], Duration::from_secs(90)).await {
                    eprintln!("watch: restarting {unit}: {e:#}");
                }
            }
        }
        match result {
            Ok(outcome) => {
                for p in &outcome.problems {
                    eprintln!("watch: {why}: {p}");
                }
                self.converged = Some(intent.serial);
                self.failures = 0;
                self.retry_at = None;
                self.routed_out = Some(hosts_out);
                true
            }
            Err(e) => {
                self.failures += 1;
                let wait = Duration::from_secs(1 << self.failures.min(5));
                eprintln!("watch: {why}: {e:#}; trying again in {}s", wait.as_secs());
                self.retry_at = Some(Instant::now() + wait);
                false
            }
        }
    }
}
