//! Storage: a 1:1 send (inbox append), sync scans, and the group fan-out write.
//!
//! Durability is `buffered` here, so the figures are the writer's CPU cost and not the disk's
//! fsync latency (group commit amortises that; `tern-bench direct` measures it end to end).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tern_protocol::pb;
use tern_server::delivery::Delivery;
use tern_server::store::{Durability, GroupOp, Store, StoreLimits, Target};

/// Nobody is connected.
struct Nobody;

impl Delivery for Nobody {
    fn inbox_appended(&self, _: &str, _: &[tern_server::delivery::NewEntry]) {}
}

fn open(dir: &std::path::Path) -> Arc<Store> {
    let limits = StoreLimits::unthrottled(Durability::Buffered);
    Store::open(dir, limits, Arc::new(Nobody)).unwrap()
}

fn message(n: u64) -> pb::SendMessage {
    pb::SendMessage {
        client_message_id: format!("m{n}"),
        payload: vec![b'x'; 100],
        ..Default::default()
    }
}

fn store(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.writer().clone();
    let send = |from: &str, target: Target, n: u64| {
        rt.block_on(writer.send(from.into(), "phone".into(), target, message(n)))
            .unwrap()
    };

    let mut n = 0;
    let mut group = c.benchmark_group("inbox_append");
    group.throughput(Throughput::Elements(1));
    group.bench_function("direct_100B", |b| {
        b.iter(|| {
            n += 1;
            send("alice", Target::Direct("bob".into()), n)
        });
    });
    group.finish();

    // A backlog of 10,000 entries for carol; scan pages of 200 from random places.
    for i in 0..10_000 {
        n += 1;
        send(&format!("s{}", i % 50), Target::Direct("carol".into()), n);
    }
    let mut group = c.benchmark_group("sync_scan");
    group.throughput(Throughput::Elements(200));
    let mut at = 0u64;
    group.bench_function("page_200_of_10k", |b| {
        b.iter(|| {
            at = (at + 7_919) % 9_800;
            store.read_inbox("carol", at, 200).unwrap()
        });
    });
    group.finish();

    let mut group = c.benchmark_group("group_fan_out");
    for size in [10usize, 100, 1000] {
        let members: Vec<String> = (0..size).map(|i| format!("g{size}m{i}")).collect();
        let conv = rt
            .block_on(writer.group(
                "owner".into(),
                GroupOp::Create {
                    name: format!("g{size}"),
                    members,
                },
            ))
            .unwrap();
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(format!("members_{size}"), |b| {
            b.iter_batched(
                || {
                    n += 1;
                    n
                },
                |n| {
                    send(
                        "owner",
                        Target::Conversation(conv.conversation_id.clone()),
                        n,
                    )
                },
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

criterion_group!(benches, store);
criterion_main!(benches);
