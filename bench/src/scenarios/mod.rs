//! One module per scenario; each returns an [`crate::Outcome`].

pub mod connections;
pub mod direct;
pub mod group;
pub mod hol;
pub mod migration;
pub mod offline_sync;
pub mod pairs;
pub mod soak;

use std::sync::Arc;

use serde_json::{Map, Value, json};
use tern_client::{Client, SendTarget};

use crate::output::{Summary, ratio, round};
use crate::probe::quantile_ms;
use crate::traffic::Flow;

/// `user0`…: user ids with a per-run prefix.
pub fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// One flow per client to its partner (users `2k` and `2k+1` talk to each other), one device
/// receiving each message.
pub fn pair_flows(clients: &[Arc<Client>], users: &[String], size: usize) -> Vec<Flow> {
    (0..clients.len())
        .map(|i| Flow {
            id: i as u32,
            client: clients[i].clone(),
            target: SendTarget::User(users[i ^ 1].clone()),
            recipients: 1,
            size,
        })
        .collect()
}

/// Adds `prefix_p50_ms` and `prefix_p99_ms` of a microsecond histogram.
pub fn add_quantiles(
    map: &mut Map<String, Value>,
    prefix: &str,
    hist: &hdrhistogram::Histogram<u64>,
) {
    map.insert(
        format!("{prefix}_p50_ms"),
        json!(round(quantile_ms(hist, 0.5))),
    );
    map.insert(
        format!("{prefix}_p99_ms"),
        json!(round(quantile_ms(hist, 0.99))),
    );
}

/// Closes clients gracefully (concurrently), so servers see clean disconnects.
pub async fn close_all(clients: Vec<Arc<Client>>) {
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        if let Ok(client) = Arc::try_unwrap(client) {
            tasks.spawn(client.close());
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Adds the relay-baseline run's common figures (`baseline_*`) and tern's ratios to them, from
/// the same run: `ratio_to_baseline` (msgs/s, tern ÷ baseline) and `p50_ratio_to_baseline`,
/// `p99_ratio_to_baseline` (latency, tern ÷ baseline: above 1 is slower).
pub fn add_baseline(map: &mut Map<String, Value>, tern: &Summary, base: &Summary) {
    map.insert("baseline_msgs_per_s".into(), json!(round(base.msgs_per_s)));
    map.insert("baseline_lost".into(), json!(base.lost));
    map.insert("baseline_duplicated".into(), json!(base.duplicated));
    add_quantiles(map, "baseline", &base.latency);
    map.insert(
        "ratio_to_baseline".into(),
        ratio(tern.msgs_per_s, base.msgs_per_s),
    );
    let q = |s: &Summary, p| quantile_ms(&s.latency, p);
    map.insert(
        "p50_ratio_to_baseline".into(),
        ratio(q(tern, 0.5), q(base, 0.5)),
    );
    map.insert(
        "p99_ratio_to_baseline".into(),
        ratio(q(tern, 0.99), q(base, 0.99)),
    );
}
