//! How fast each user may start conversations, add group members and send messages.
//!
//! Every conversation, and every member of a group, is stored for good and cached while in
//! use, so an unlimited rate would let one client fill disk and memory by messaging made-up
//! users, creating groups, or adding made-up members to its groups. Every message is stored
//! for good too, and goes through the one storage writer, so one user sending flat out would
//! take the disk and the writer from everyone else. Each user has a token bucket per kind: a
//! burst at once, refilled at a rate per minute. An operation past it fails with
//! `RATE_LIMITED` and the time until enough tokens are back, writing nothing.

use std::sync::Arc;
use std::time::Instant;

use super::StoreError;

/// Per-user token buckets of one kind of operation.
#[derive(Debug)]
pub(super) struct TokenBuckets {
    /// What a token is, for errors ("conversation starts").
    what: &'static str,
    per_minute: u32,
    burst: u32,
    users: crate::FastMap<Arc<str>, Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl TokenBuckets {
    /// `per_minute` 0 means no limit.
    pub fn new(what: &'static str, per_minute: u32, burst: u32) -> Self {
        Self {
            what,
            per_minute,
            burst: burst.max(1),
            users: crate::FastMap::default(),
        }
    }

    /// Tokens per millisecond.
    fn rate(&self) -> f64 {
        f64::from(self.per_minute) / 60_000.0
    }

    /// Takes one token for `user` at `now`, or says how long until one is available.
    pub fn take(&mut self, user: &Arc<str>, now: Instant) -> Result<(), StoreError> {
        self.take_n(user, 1, now)
    }

    /// Takes `n` tokens for `user` at `now`, or takes none and says how long until `n` are
    /// available (`LIMIT_EXCEEDED` if `n` is more than the burst: never).
    pub fn take_n(&mut self, user: &Arc<str>, n: usize, now: Instant) -> Result<(), StoreError> {
        if self.per_minute == 0 || n == 0 {
            return Ok(());
        }
        if n > self.burst as usize {
            return Err(StoreError::LimitExceeded(format!(
                "at most {} {} at once",
                self.burst, self.what
            )));
        }
        let (rate, burst, need) = (self.rate(), f64::from(self.burst), n as f64);
        let bucket = self.users.entry(user.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed_ms = now.saturating_duration_since(bucket.at).as_secs_f64() * 1000.0;
        bucket.tokens = (bucket.tokens + elapsed_ms * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= need {
            bucket.tokens -= need;
            return Ok(());
        }
        let wait_ms = ((need - bucket.tokens) / rate).ceil();
        Err(StoreError::RateLimited {
            what: self.what,
            // At least 1 ms, and a u64 for any configured rate above zero.
            retry_after_ms: (wait_ms as u64).max(1),
        })
    }

    /// Returns `n` tokens taken for an operation that then failed for another reason.
    pub fn give_back(&mut self, user: &str, n: usize) {
        let burst = f64::from(self.burst);
        if let Some(bucket) = self.users.get_mut(user) {
            bucket.tokens = (bucket.tokens + n as f64).min(burst);
        }
    }

    /// Forgets buckets that have refilled (they equal a fresh one), once there are more than
    /// `limit`: only users who used some recently stay.
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
        let mut buckets = TokenBuckets::new("starts", 60, 3);
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
        let mut buckets = TokenBuckets::new("starts", 0, 1);
        let now = Instant::now();
        for _ in 0..1000 {
            assert!(buckets.take(&alice, now).is_ok());
        }
    }

    #[test]
    fn several_tokens_at_once_all_or_none() {
        let alice: Arc<str> = Arc::from("alice");
        let t0 = Instant::now();
        let mut buckets = TokenBuckets::new("member additions", 60, 10);
        assert!(buckets.take_n(&alice, 7, t0).is_ok());
        // 3 left: 5 more wait 2 s, and take nothing meanwhile.
        match buckets.take_n(&alice, 5, t0) {
            Err(StoreError::RateLimited { retry_after_ms, .. }) => {
                assert_eq!(retry_after_ms, 2000);
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
        assert!(buckets.take_n(&alice, 3, t0).is_ok());
        buckets.give_back(&alice, 2);
        assert!(buckets.take_n(&alice, 2, t0).is_ok());
        assert!(buckets.take(&alice, t0).is_err());
        // More than the burst can never be had at once.
        assert!(matches!(
            buckets.take_n(&alice, 11, t0 + Duration::from_secs(60)),
            Err(StoreError::LimitExceeded(_))
        ));
    }
}
