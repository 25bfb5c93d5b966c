//! The storage writer's cost per 1:1 send, without QUIC or clients.
//!
//! `cargo run --release -p tern-server --example writer_load -- [SENDS] [any-time|retries]`
//!
//! 100 users in 50 pairs send SENDS messages (default 300,000) of 100 bytes through the
//! store's writer, 400 in flight, with `buffered` durability so that the disk's fsync does not
//! hide the writer's CPU cost. The scope is the sends' `id_scope`: `retries` (the default, what
//! the client library uses when the app gives no id) or `any-time` (indexed ids). The writer
//! is the bottleneck here, so microseconds per send is its cost. Figures vary run to run on a
//! shared machine: compare the two scopes in the same session, several runs each.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use tern_protocol::pb;
use tern_server::delivery::{Delivery, NewEntry};
use tern_server::store::{Durability, Store, StoreLimits, Target};

/// The server binary's allocator, so the figures are the server's.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const USERS: u64 = 100;
const IN_FLIGHT: usize = 400;

/// Nobody is connected: delivery costs nothing.
struct Nobody;

impl Delivery for Nobody {
    fn inbox_appended(&self, _: &str, _: &[NewEntry]) {}
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let total: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(300_000);
    let scope = match args.next().as_deref() {
        Some("any-time") => pb::IdScope::AnyTime,
        _ => pb::IdScope::Retries,
    };
    let dir = tempfile::tempdir().unwrap();
    let limits = StoreLimits::unthrottled(Durability::Buffered);
    let store = Store::open(dir.path(), limits, Arc::new(Nobody)).unwrap();
    let writer = store.writer().clone();
    let (answers_tx, mut answers) = tokio::sync::mpsc::channel(IN_FLIGHT);
    let started = Instant::now();
    let feeder = tokio::spawn(async move {
        for n in 0..total {
            let user = n % USERS;
            let msg = pb::SendMessage {
                // Random-looking, as the client library's ids are.
                client_message_id: format!("{:024x}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                payload: vec![b'x'; 100],
                id_scope: scope as i32,
                ..Default::default()
            };
            let answer = writer
                .send_pipelined(
                    format!("user{user}").into(),
                    "phone".into(),
                    Target::Direct(format!("user{}", user ^ 1)),
                    msg,
                )
                .await
                .unwrap();
            answers_tx.send(answer).await.unwrap();
        }
    });
    let mut done = 0u64;
    while let Some(answer) = answers.recv().await {
        answer.await.unwrap().unwrap();
        done += 1;
    }
    feeder.await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"scope\":\"{}\",\"sends\":{done},\"sends_per_s\":{:.0},\"us_per_send\":{:.2}}}",
        scope.as_str_name(),
        done as f64 / secs,
        secs * 1e6 / done as f64
    );
}
