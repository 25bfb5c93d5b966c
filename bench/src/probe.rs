//! What a bench message carries, and what receivers learn from it.
//!
//! Every message sent by the harness starts with a 20-byte header in its payload: the flow it
//! belongs to, its number within the flow, and when it was sent. Senders and receivers live in
//! the same process, so one monotonic clock timestamps both ends.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Bytes of the header at the start of each payload.
pub const HEADER_BYTES: usize = 20;

/// Largest latency recorded, in microseconds (an hour); larger values are clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since the process-wide epoch.
pub fn now_us() -> u64 {
    u64::try_from(epoch().elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// The header of a bench message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Which sender-and-conversation this message belongs to.
    pub flow: u32,
    /// Its number within the flow, from 0, without gaps.
    pub n: u64,
    /// [`now_us`] when it was handed to the client.
    pub sent_us: u64,
}

impl Probe {
    /// The payload: the header, then filler up to `size` bytes (at least the header).
    pub fn payload(&self, size: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(size.max(HEADER_BYTES));
        out.extend_from_slice(&self.flow.to_be_bytes());
        out.extend_from_slice(&self.n.to_be_bytes());
        out.extend_from_slice(&self.sent_us.to_be_bytes());
        out.resize(size.max(HEADER_BYTES), b'x');
        out
    }

    /// The header of a payload written by [`Probe::payload`].
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let flow = u32::from_be_bytes(payload.get(0..4)?.try_into().ok()?);
        let n = u64::from_be_bytes(payload.get(4..12)?.try_into().ok()?);
        let sent_us = u64::from_be_bytes(payload.get(12..20)?.try_into().ok()?);
        Some(Self { flow, n, sent_us })
    }
}

/// A latency histogram in microseconds.
pub fn histogram() -> Histogram<u64> {
    // Three significant digits up to an hour: a few tens of KB, exact enough for p99.9.
    match Histogram::new_with_bounds(1, MAX_LATENCY_US, 3) {
        Ok(hist) => hist,
        // Only invalid bounds fail, and these are constants.
        Err(e) => panic!("latency histogram bounds: {e}"),
    }
}

/// Records `us` microseconds, clamped to the histogram's range.
pub fn record(hist: &mut Histogram<u64>, us: u64) {
    let _ = hist.record(us.clamp(1, MAX_LATENCY_US));
}

/// Milliseconds at quantile `q` of a microsecond histogram.
pub fn quantile_ms(hist: &Histogram<u64>, q: f64) -> f64 {
    if hist.is_empty() {
        return 0.0;
    }
    hist.value_at_quantile(q) as f64 / 1000.0
}

/// What one receiving device saw.
#[derive(Debug)]
pub struct Tracker {
    /// Per flow, which message numbers arrived (a bitmap indexed by `n`).
    seen: HashMap<u32, Vec<u64>>,
    /// Highest conversation sequence seen per conversation: a lower one is out of order.
    last_seq: HashMap<String, u64>,
    pub delivered: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub latency: Histogram<u64>,
    /// When the last new message arrived.
    pub last_arrival: Option<Instant>,
}

impl Default for Tracker {
    fn default() -> Self {
        Self {
            seen: HashMap::new(),
            last_seq: HashMap::new(),
            delivered: 0,
            duplicated: 0,
            out_of_order: 0,
            latency: histogram(),
            last_arrival: None,
        }
    }
}

impl Tracker {
    /// Records a received message; returns its probe if the payload carried one and it was new.
    pub fn record(&mut self, message: &tern_protocol::pb::Message) -> Option<Probe> {
        let probe = Probe::parse(&message.payload)?;
        let bits = self.seen.entry(probe.flow).or_default();
        let (word, bit) = ((probe.n / 64) as usize, probe.n % 64);
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return None;
        }
        bits[word] |= 1 << bit;
        let last = self
            .last_seq
            .entry(message.conversation_id.clone())
            .or_insert(0);
        if message.seq < *last {
            self.out_of_order += 1;
        }
        *last = (*last).max(message.seq);
        self.delivered += 1;
        let now = now_us();
        record(&mut self.latency, now.saturating_sub(probe.sent_us));
        self.last_arrival = Some(Instant::now());
        Some(probe)
    }

    /// Adds another receiver's counts and latencies to this one.
    pub fn merge(&mut self, other: &Tracker) {
        self.delivered += other.delivered;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        let _ = self.latency.add(&other.latency);
        self.last_arrival = self.last_arrival.max(other.last_arrival);
    }
}

/// Seconds as a `Duration`, for CLI values.
pub fn secs(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let probe = Probe {
            flow: 7,
            n: 1 << 40,
            sent_us: 123_456,
        };
        let payload = probe.payload(100);
        assert_eq!(payload.len(), 100);
        assert_eq!(Probe::parse(&payload), Some(probe));
        assert_eq!(Probe::parse(&payload[..10]), None);
    }

    #[test]
    fn duplicates_and_reordering_are_counted() {
        let mut tracker = Tracker::default();
        let msg = |n: u64, seq: u64| tern_protocol::pb::Message {
            conversation_id: "c".into(),
            seq,
            payload: Probe {
                flow: 1,
                n,
                sent_us: now_us(),
            }
            .payload(32),
            ..Default::default()
        };
        assert!(tracker.record(&msg(0, 1)).is_some());
        assert!(tracker.record(&msg(2, 3)).is_some());
        assert!(tracker.record(&msg(1, 2)).is_some());
        assert!(tracker.record(&msg(1, 2)).is_none());
        assert_eq!(tracker.delivered, 3);
        assert_eq!(tracker.duplicated, 1);
        assert_eq!(tracker.out_of_order, 1);
    }
}
