//! SIGINT and SIGTERM during a run: the executor stops between steps (and
//! stops waiting inside a long one: systemd finishes the jobs it has), says
//! where, and the command exits 1. Nothing is lost: the intent was recorded
//! first, and the next run plans from what the host really does.
use anyhow::Result;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// The error an interrupted run returns.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: &'static str,
    pub during: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interrupted by {} while {}; the host is partly converged and the intent is recorded: run `cgipool apply` again to finish",
            self.signal, self.during
        )
    }
}

impl std::error::Error for Interrupted {}

/// The signal the process caught (0: none), set by the signal handler.
static CAUGHT: AtomicI32 = AtomicI32::new(0);

/// The signal the process caught, if any (for an error that came from
/// it indirectly: SIGINT from a terminal, or `timeout`'s SIGTERM, reaches
/// the whole process group, so the ssh connections to other hosts die
/// with it and a step fails on its transport before it sees the flag).
pub fn caught() -> Option<&'static str> {
    match CAUGHT.load(Ordering::SeqCst) {
        nix::libc::SIGINT => Some("SIGINT"),
        nix::libc::SIGTERM => Some("SIGTERM"),
        _ => None,
    }
}

#[derive(Clone, Default)]
pub struct Interrupt {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    raised: AtomicBool,
    /// Made by `on_signals` (the process's signals count for it).
    watches_signals: AtomicBool,
    signal: std::sync::Mutex<&'static str>,
    notify: Notify,
}

impl Interrupt {
    /// Never raised (watch: systemd's SIGTERM ends it between converges).
    pub fn never() -> Interrupt {
        Interrupt::default()
    }

    /// Raised by SIGINT or SIGTERM; call inside the tokio runtime.
    pub fn on_signals() -> Result<Interrupt> {
        use tokio::signal::unix::{signal, SignalKind};
        // The flag is set in the signal handler itself, so that a step
        // boundary sees it at once (the task below runs only when the
        // runtime polls its signal driver); the task wakes guarded waits.
        for sig in [nix::libc::SIGINT, nix::libc::SIGTERM] {
            // SAFETY: the action only stores into an atomic, which is
            // async-signal-safe.
            unsafe {
                signal_hook_registry::register(sig, move || CAUGHT.store(sig, Ordering::SeqCst))
            }?;
        }
        let i = Interrupt::default();
        i.inner.watches_signals.store(true, Ordering::SeqCst);
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let raise = i.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = int.recv() => "SIGINT",
                _ = term.recv() => "SIGTERM",
            };
            raise.raise(name);
        });
        Ok(i)
    }

    pub fn raise(&self, signal: &'static str) {
        if let Ok(mut s) = self.inner.signal.lock() {
            *s = signal;
        }
        self.inner.raised.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
    }

    fn error(&self, during: &str) -> anyhow::Error {
        let signal = self.inner.signal.lock().map(|s| *s).unwrap_or("a signal");
        anyhow::Error::new(Interrupted {
            signal,
            during: during.to_string(),
        })
    }

    /// Fails if a signal came, before the step `during` begins.
    pub fn check(&self, during: &str) -> Result<()> {
        if self.inner.watches_signals.load(Ordering::SeqCst) {
            match CAUGHT.load(Ordering::SeqCst) {
                nix::libc::SIGINT => self.raise("SIGINT"),
                nix::libc::SIGTERM => self.raise("SIGTERM"),
                _ => {}
            }
        }
        if self.inner.raised.load(Ordering::SeqCst) {
            return Err(self.error(during));
        }
        Ok(())
    }

    /// Runs `fut`, or fails as soon as a signal comes.
    pub async fn guard<T>(&self, during: &str, fut: impl Future<Output = T>) -> Result<T> {
        self.check(during)?;
        let notified = self.inner.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.inner.raised.load(Ordering::SeqCst) {
            return Err(self.error(during));
        }
        tokio::select! {
            v = fut => Ok(v),
            _ = notified => Err(self.error(during)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_raised_interrupt_stops_checks_and_guarded_waits() {
        let i = Interrupt::default();
        assert!(i.check("a step").is_ok());
        assert_eq!(i.guard("quick", async { 7 }).await.unwrap(), 7);
        let waiting = i.clone();
        let handle = tokio::spawn(async move {
            waiting
                .guard("a long wait", std::future::pending::<()>())
                .await
        });
        tokio::task::yield_now().await;
        i.raise("SIGTERM");
        let err = handle.await.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("SIGTERM while a long wait"),
            "{err}"
        );
        assert!(i.check("the next step").is_err());
    }
}
