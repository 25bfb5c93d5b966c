//! `migration`: pairs of users exchange messages at a rate while, one client after another,
//! each changes network (`Client::network_changed`: a new UDP socket, so the server sees a new
//! address and QUIC migrates the connection). Nothing may be lost or duplicated, and no
//! connection should need re-establishing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::cli::{Common, MigrationArgs};
use crate::clients::{self, PoolOptions};
use crate::output::{Outcome, Plot, Summary};
use crate::server::{Kind, Server};
use crate::traffic::{self, Plan, Receivers};

const DEFAULT_CLIENTS: usize = 20;
const DEFAULT_SECS: f64 = 10.0;

/// One run against a fresh `kind` server.
struct MigrationRun {
    summary: Summary,
    sent: traffic::Sent,
    migrations: u64,
    migrate_errors: u64,
    reconnects: u64,
    rss_kb: Option<u64>,
    placement: &'static str,
}

async fn migration_run(
    common: &Common,
    args: &MigrationArgs,
    kind: Kind,
) -> anyhow::Result<MigrationRun> {
    let server = Server::start(kind, &common.server_options())?;
    let n = common.clients_or(DEFAULT_CLIENTS).max(2) & !1;
    let prefix = if kind == Kind::Tern { "mig" } else { "migb" };
    let users = super::users(prefix, n);
    // Each client on its own socket: rebinding moves every connection of an endpoint.
    let pool =
        clients::connect_all(&server, &users, PoolOptions { per_endpoint: 0 }, |_| {}).await?;
    let (clients, events): (Vec<_>, Vec<_>) = pool.into_iter().unzip();
    let flows = super::pair_flows(&clients, &users, args.size);
    let receivers = Receivers::spawn(events, None);
    let duration = common.duration_or(DEFAULT_SECS);
    let plan = Plan {
        rate: Some(args.rate),
        ..Plan::flat_out(duration, 2)
    };
    let migrator = tokio::spawn(migrate(
        clients.clone(),
        Duration::from_millis(args.migrate_every_ms.max(1)),
        Instant::now() + duration,
    ));
    let sent = traffic::send(&flows, plan).await;
    let (migrations, migrate_errors) = migrator.await.unwrap_or((0, 0));
    receivers
        .wait_for(sent.expected, crate::traffic::PATIENCE)
        .await;
    let seen = receivers.finish().await;
    let reconnects: u64 = clients.iter().map(|c| c.stats().reconnects).sum();
    let rss_kb = server.rss_kb();
    drop(flows);
    super::close_all(clients).await;
    Ok(MigrationRun {
        summary: Summary::of(&sent, &seen),
        sent,
        migrations,
        migrate_errors,
        reconnects,
        rss_kb,
        placement: server.placement,
    })
}

/// Runs against the relay-baseline forwarder (bare quinn migrates the same way), then tern,
/// and reports tern's figures with their ratios to the baseline's.
pub async fn run(common: &Common, args: &MigrationArgs) -> anyhow::Result<Outcome> {
    let base = if common.no_baseline {
        None
    } else {
        Some(migration_run(common, args, Kind::Forwarder).await?)
    };
    let run = migration_run(common, args, Kind::Tern).await?;
    let mut json = run.summary.json("migration", run.rss_kb);
    json.insert("migrations".into(), json!(run.migrations));
    json.insert("reconnects".into(), json!(run.reconnects));
    json.insert("migrate_errors".into(), json!(run.migrate_errors));
    json.insert(
        "clients".into(),
        json!(common.clients_or(DEFAULT_CLIENTS).max(2) & !1),
    );
    json.insert("rate".into(), json!(args.rate));
    json.insert("send_errors".into(), json!(run.sent.errors));
    super::add_quantiles(&mut json, "ack", &run.sent.ack_latency);
    json.insert("server".into(), json!(run.placement));
    let mut series = vec![("migration".into(), run.summary.latency.clone())];
    if let Some(base) = base {
        super::add_baseline(&mut json, &run.summary, &base.summary);
        json.insert("baseline_migrations".into(), json!(base.migrations));
        json.insert("baseline_reconnects".into(), json!(base.reconnects));
        series.push(("relay-baseline".into(), base.summary.latency));
    }
    Ok(Outcome {
        json,
        plots: vec![Plot::Latency {
            title: "migration: send → delivered while clients rebind".into(),
            series,
        }],
    })
}

/// Rebinds the clients round-robin so that each moves once per `every`; returns
/// (migrations, failures).
async fn migrate(
    clients: Vec<Arc<tern_client::Client>>,
    every: Duration,
    deadline: Instant,
) -> (u64, u64) {
    let mut tick = tokio::time::interval(every / clients.len().max(1) as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    let (mut done, mut failed) = (0, 0);
    for client in clients.iter().cycle() {
        tick.tick().await;
        if Instant::now() >= deadline {
            break;
        }
        match client.network_changed() {
            Ok(()) => done += 1,
            Err(e) => {
                tracing::warn!(error = %e, "network_changed failed");
                failed += 1;
            }
        }
    }
    (done, failed)
}
