//! Per-object exponential backoff after failed reconciles, reset by the next success.
//!
//! kube-runtime retries with whatever the error policy returns, but keeps no per-object history; this
//! keeps it, so one object failing repeatedly waits longer and longer while others are unaffected.
//!
//! ```
//! use kube_plan::backoff::{Backoff, BackoffTracker};
//! use std::time::Duration;
//!
//! let mut t = BackoffTracker::new(Backoff::new(Duration::from_secs(1), Duration::from_secs(8)));
//! assert_eq!(t.failure("a"), Duration::from_secs(1));
//! assert_eq!(t.failure("a"), Duration::from_secs(2));
//! assert_eq!(t.failure("b"), Duration::from_secs(1));
//! t.success("a");
//! assert_eq!(t.failure("a"), Duration::from_secs(1));
//! ```

use std::collections::HashMap;
use std::time::Duration;

/// Exponential backoff: `initial`, doubled per consecutive failure, capped at `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Upper bound.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `initial` doubling up to `max`.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay after `failures` consecutive failures (1 for the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(31);
        let delay = self.initial.saturating_mul(1u32 << exp);
        delay.min(self.max).max(self.initial.min(self.max))
    }
}

impl Default for Backoff {
    /// 1 s doubling up to 5 minutes.
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(300))
    }
}

/// Consecutive failures per object key.
#[derive(Debug, Default)]
pub struct BackoffTracker {
    policy: Backoff,
    failures: HashMap<String, u32>,
}

impl BackoffTracker {
    /// An empty tracker.
    pub fn new(policy: Backoff) -> Self {
        Self {
            policy,
            failures: HashMap::new(),
        }
    }

    /// Records a failure of `key`; returns how long to wait before retrying.
    pub fn failure(&mut self, key: &str) -> Duration {
        let n = self.failures.entry(key.to_owned()).or_insert(0);
        *n = n.saturating_add(1);
        self.policy.delay(*n)
    }

    /// Records a success of `key`: its next failure starts from `initial` again.
    pub fn success(&mut self, key: &str) {
        self.failures.remove(key);
    }

    /// Consecutive failures of `key`.
    pub fn failures(&self, key: &str) -> u32 {
        self.failures.get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff::new(Duration::from_secs(30), Duration::from_secs(300));
        let d: Vec<u64> = (1..=7).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(d, vec![30, 60, 120, 240, 300, 300, 300]);
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(300));
        assert_eq!(b.delay(0), Duration::from_secs(30));
    }

    #[test]
    fn backoff_max_below_initial_wins() {
        let b = Backoff::new(Duration::from_secs(30), Duration::from_secs(10));
        assert_eq!(b.delay(1), Duration::from_secs(10));
    }

    #[test]
    fn backoff_tracker_is_per_key_and_resets() {
        let mut t = BackoffTracker::new(Backoff::default());
        t.failure("x");
        t.failure("x");
        assert_eq!(t.failures("x"), 2);
        assert_eq!(t.failures("y"), 0);
        t.success("x");
        assert_eq!(t.failures("x"), 0);
    }
}
