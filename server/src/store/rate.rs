//! How fast each user may start conversations.
//!
//! Every conversation is stored for good and cached while in use, so an unlimited rate would
//! let one client fill disk and memory by messaging made-up users or creating groups. Each
//! user has a token bucket: `conversation_starts_burst` at once, refilled at
//! `conversation_starts_per_minute`. A start past it fails with `RATE_LIMITED` and the time
//! until a token is back, writing nothing; sends in existing conversations are not limited.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::StoreError;

/// Per-user buckets of conversation starts.
#[derive(Debug)]
pub(super) struct StartBuckets {
    per_minute: u32,
    burst: u32,
    users: HashMap<Arc<str>, Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl StartBuckets {
    /// `per_minute` 0 means no limit.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_minute,
            burst: burst.max(1),
            users: HashMap::new(),
        }
    }

    /// Tokens per millisecond.
    fn rate(&self) -> f64 {
        f64::from(self.per_minute) / 60_000.0
    }

    /// Takes one start for `user` at `now`, or says how long until one is available.
    pub fn take(&mut self, user: &Arc<str>, now: Instant) -> Result<(), StoreError> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let (rate, burst) = (self.rate(), f64::from(self.burst));
        let bucket = self.users.entry(user.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed_ms = now.saturating_duration_since(bucket.at).as_secs_f64() * 1000.0;
        bucket.tokens = (bucket.tokens + elapsed_ms * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait_ms = ((1.0 - bucket.tokens) / rate).ceil();
        Err(StoreError::RateLimited {
            what: "conversation starts",
            // At least 1 ms, and a u64 for any configured rate above zero.
            retry_after_ms: (wait_ms as u64).max(1),
        })
    }

    /// Forgets buckets that have refilled (they equal a fresh one), once there are more than
    /// `limit`: only users who started conversations recently stay.
    pub fn trim(&mut self, limit: usize, now: Instant) {
        if self.users.len() <= limit {
            return;
        }
        let (rate, burst) = (self.rate(), f64::from(self.burst));
        self.users.retain(|_, b| {
            let elapsed_ms = now.saturating_duration_since(b.at).as_secs_f64() * 1000.0;
            b.tokens + elapsed_ms * rate < burst
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate_then_a_typed_wait() {
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        let t0 = Instant::now();
        let mut buckets = StartBuckets::new(60, 3);
        for _ in 0..3 {
            assert!(buckets.take(&alice, t0).is_ok());
        }
        match buckets.take(&alice, t0) {
            Err(StoreError::RateLimited { retry_after_ms, .. }) => {
                assert_eq!(retry_after_ms, 1000);
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
        // Others are not affected; one token is back after a second.
        assert!(buckets.take(&bob, t0).is_ok());
        assert!(
            buckets
                .take(&alice, t0 + Duration::from_millis(1000))
                .is_ok()
        );
        assert!(
            buckets
                .take(&alice, t0 + Duration::from_millis(1000))
                .is_err()
        );
        // Refilled buckets are forgotten when there are too many.
        buckets.trim(1, t0 + Duration::from_secs(60));
        assert!(buckets.users.is_empty());
    }

    #[test]
    fn zero_per_minute_is_unlimited() {
        let alice: Arc<str> = Arc::from("alice");
        let mut buckets = StartBuckets::new(0, 1);
        let now = Instant::now();
        for _ in 0..1000 {
            assert!(buckets.take(&alice, now).is_ok());
        }
    }
}
