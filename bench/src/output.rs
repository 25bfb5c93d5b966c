//! A scenario's result: one JSON object (common fields first) and the plots of the report.

use std::time::Instant;

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

use crate::probe::{Tracker, quantile_ms};
use crate::traffic::Sent;

/// What the report draws.
#[derive(Debug, Clone)]
pub enum Plot {
    /// Latency distributions (microsecond histograms), drawn as percentile curves.
    Latency {
        title: String,
        series: Vec<(String, Histogram<u64>)>,
    },
    /// Values over time: (seconds, value) per series.
    Over {
        title: String,
        unit: String,
        series: Vec<(String, Vec<(f64, f64)>)>,
    },
}

/// What a scenario produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub json: Map<String, Value>,
    pub plots: Vec<Plot>,
}

/// The common delivery figures.
#[derive(Debug, Clone)]
pub struct Summary {
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub msgs_per_s: f64,
    pub latency: Histogram<u64>,
}

impl Summary {
    /// From what was sent and what the receivers saw. Throughput counts deliveries from the
    /// first send to the last delivery.
    pub fn of(sent: &Sent, seen: &Tracker) -> Self {
        let end = seen.last_arrival.unwrap_or_else(Instant::now);
        let secs = end.saturating_duration_since(sent.started).as_secs_f64();
        Self {
            sent: sent.acked,
            delivered: seen.delivered,
            lost: sent.expected.saturating_sub(seen.delivered),
            duplicated: seen.duplicated,
            out_of_order: seen.out_of_order,
            msgs_per_s: if secs > 0.0 {
                seen.delivered as f64 / secs
            } else {
                0.0
            },
            latency: seen.latency.clone(),
        }
    }

    /// `scenario` and the common fields, in the documented order.
    pub fn json(&self, scenario: &str, server_rss_kb: Option<u64>) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("scenario".into(), json!(scenario));
        map.insert("sent".into(), json!(self.sent));
        map.insert("delivered".into(), json!(self.delivered));
        map.insert("lost".into(), json!(self.lost));
        map.insert("duplicated".into(), json!(self.duplicated));
        map.insert("out_of_order".into(), json!(self.out_of_order));
        map.insert("msgs_per_s".into(), json!(round(self.msgs_per_s)));
        map.insert(
            "p50_ms".into(),
            json!(round(quantile_ms(&self.latency, 0.5))),
        );
        map.insert(
            "p99_ms".into(),
            json!(round(quantile_ms(&self.latency, 0.99))),
        );
        map.insert(
            "p999_ms".into(),
            json!(round(quantile_ms(&self.latency, 0.999))),
        );
        map.insert("server_rss_kb".into(), json!(server_rss_kb));
        map
    }
}

/// Rounds to 3 decimals, so the JSON stays readable.
pub fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `a / b`, or null when `b` is zero.
pub fn ratio(a: f64, b: f64) -> Value {
    if b > 0.0 {
        json!(round(a / b))
    } else {
        Value::Null
    }
}
