//! Durable send throughput with group commit, against the same run with buffered durability.
//!
//! `cargo run --release -p tern-server --example group_commit -- [CLIENTS] [IN_FLIGHT] [SECS]`
//!
//! An in-process server on 127.0.0.1 with a temporary data directory; CLIENTS senders, each
//! with IN_FLIGHT sends outstanding, for SECS seconds per durability mode. Prints msgs/s per
//! mode and fsyncs avoided. A first look before the bench harness; figures vary run to run on
//! a shared machine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tern_client::{Client, ClientConfig, SendTarget, Trust};
use tern_server::Config;
use tern_server::store::Durability;

async fn run(durability: Durability, clients: usize, in_flight: usize, secs: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        certs_dir: dir.path().join("certs"),
        durability,
        ..Config::default()
    };
    let (endpoint, state) = tern_server::start(config).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let ca = std::fs::read_to_string(dir.path().join("certs/ca.pem")).unwrap();
    tokio::spawn(tern_server::run(
        endpoint,
        state.clone(),
        std::future::pending(),
    ));

    let sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let token = state
            .auth
            .mint(&format!("user{c}"), "bench", Duration::from_secs(600))
            .unwrap();
        let mut config = ClientConfig::new(addr.to_string(), token, Trust::CaPem(ca.clone()));
        config.server_name = Some("localhost".into());
        let (client, _events) = Client::connect(config).await.unwrap();
        let client = Arc::new(client);
        for _ in 0..in_flight {
            let client = client.clone();
            let sent = sent.clone();
            let peer = format!("peer{c}");
            tasks.push(tokio::spawn(async move {
                while Instant::now() < deadline {
                    client
                        .send(
                            SendTarget::User(peer.clone()),
                            "x".repeat(100).as_str(),
                            None,
                        )
                        .await
                        .unwrap();
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    let start = Instant::now();
    for task in tasks {
        task.await.unwrap();
    }
    let rate = sent.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let (groups, commands) = state.store.write_stats();
    eprintln!(
        "{durability:?}: {rate:.0} msgs/s, {:.1} writes per commit",
        commands as f64 / groups.max(1) as f64
    );
    rate
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let clients = args.first().copied().unwrap_or(8);
    let in_flight = args.get(1).copied().unwrap_or(8);
    let secs = args.get(2).copied().unwrap_or(5) as u64;
    let sync = run(Durability::Sync, clients, in_flight, secs).await;
    let buffered = run(Durability::Buffered, clients, in_flight, secs).await;
    println!(
        "{{\"clients\":{clients},\"in_flight\":{in_flight},\"sync_msgs_per_s\":{sync:.0},\"buffered_msgs_per_s\":{buffered:.0},\"sync_over_buffered\":{:.2}}}",
        sync / buffered
    );
}
