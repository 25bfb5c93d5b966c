//! `offline-sync`: a backlog is stored for a user who is offline; then fresh devices of that
//! user connect one after another and each syncs the whole backlog. Reports how long that
//! takes (median over the devices); the latency figures are the arrival times of the
//! backlog's messages, counted from the moment the device starts connecting.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::json;
use tern_client::{Client, Event, SendTarget};

use crate::cli::{Common, OfflineSyncArgs};
use crate::clients::{self, PoolOptions};
use crate::output::{Outcome, Plot, Summary, ratio, round};
use crate::probe::{self, Tracker};
use crate::server::{Kind, Server};
use crate::traffic::{self, Flow, Plan};

/// Pipelined sends while storing the backlog (one conversation stream).
const FILL_IN_FLIGHT: usize = 64;
/// A sync that stalls this long counts the rest as lost.
const STALL: Duration = Duration::from_secs(15);

/// One server's figures.
struct SyncRun {
    summary: Summary,
    sent: traffic::Sent,
    times_ms: Vec<f64>,
    median_ms: f64,
    fill_secs: f64,
    arrivals: Histogram<u64>,
    rss_kb: Option<u64>,
    placement: &'static str,
}

/// Runs against the relay-baseline forwarder (which keeps an offline user's messages in
/// memory), then tern, and reports tern's figures with their ratios to the baseline's.
pub async fn run(common: &Common, args: &OfflineSyncArgs) -> anyhow::Result<Outcome> {
    let base = if common.no_baseline {
        None
    } else {
        Some(measure(common, args, Kind::Forwarder).await?)
    };
    let run = measure(common, args, Kind::Tern).await?;
    let mut json = run.summary.json("offline-sync", run.rss_kb);
    json.insert("backlog".into(), json!(run.sent.acked));
    json.insert("sync_ms".into(), json!(round(run.median_ms)));
    json.insert(
        "sync_ms_runs".into(),
        json!(run.times_ms.iter().map(|t| round(*t)).collect::<Vec<_>>()),
    );
    json.insert(
        "fill_msgs_per_s".into(),
        json!(round(run.sent.acked as f64 / run.fill_secs)),
    );
    json.insert("send_errors".into(), json!(run.sent.errors));
    json.insert("server".into(), json!(run.placement));
    let mut series = vec![(format!("{} messages", args.backlog), run.arrivals.clone())];
    if let Some(base) = base {
        super::add_baseline(&mut json, &run.summary, &base.summary);
        json.insert("baseline_sync_ms".into(), json!(round(base.median_ms)));
        json.insert(
            "sync_ms_ratio_to_baseline".into(),
            ratio(run.median_ms, base.median_ms),
        );
        let fill = |r: &SyncRun| r.sent.acked as f64 / r.fill_secs;
        json.insert("baseline_fill_msgs_per_s".into(), json!(round(fill(&base))));
        json.insert(
            "fill_ratio_to_baseline".into(),
            ratio(fill(&run), fill(&base)),
        );
        series.push((
            format!("{} messages, relay-baseline", args.backlog),
            base.arrivals,
        ));
    }
    Ok(Outcome {
        json,
        plots: vec![Plot::Latency {
            title: "offline-sync: connect → message synced (first device)".into(),
            series,
        }],
    })
}

async fn measure(common: &Common, args: &OfflineSyncArgs, kind: Kind) -> anyhow::Result<SyncRun> {
    let server = Server::start(kind, &common.server_options())?;
    let pool = clients::connect_all(
        &server,
        &["os-sender".to_owned()],
        PoolOptions::default(),
        |_| {},
    )
    .await?;
    let (sender, _sender_events) = pool.into_iter().next().context("sender did not connect")?;
    let flow = Flow {
        id: 0,
        client: sender.clone(),
        target: SendTarget::User("os-reader".into()),
        recipients: 1,
        size: args.size,
    };
    let plan = Plan {
        limit: Some(args.backlog),
        ..Plan::flat_out(Duration::from_secs(3600), FILL_IN_FLIGHT)
    };
    let fill_started = Instant::now();
    let sent = traffic::send(std::slice::from_ref(&flow), plan).await;
    let fill_secs = fill_started.elapsed().as_secs_f64();

    let mut times_ms = Vec::new();
    let mut arrivals = probe::histogram();
    let mut worst = Tracker::default();
    let mut duplicated = 0;
    for run in 0..args.runs.max(1) {
        let mut config = clients::config(&server, "os-reader", &format!("device{run}"))?;
        config.resume_from = Some(0);
        let started = Instant::now();
        let start_us = probe::now_us();
        let (client, mut events) = Client::connect(config).await?;
        let mut seen = Tracker::default();
        while seen.delivered < sent.acked {
            match tokio::time::timeout(STALL, events.recv()).await {
                Ok(Some(Event::Message { message, .. })) => {
                    if seen.record(&message).is_some() && run == 0 {
                        probe::record(&mut arrivals, probe::now_us().saturating_sub(start_us));
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        times_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        duplicated += seen.duplicated;
        if run == 0 || seen.delivered < worst.delivered {
            worst = seen;
        }
        client.close().await;
    }
    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = sorted[sorted.len() / 2];
    worst.duplicated = duplicated;
    worst.latency = arrivals.clone();
    let mut summary = Summary::of(&sent, &worst);
    summary.msgs_per_s = sent.acked as f64 / (median_ms / 1000.0).max(1e-9);
    let rss_kb = server.rss_kb();
    drop(flow);
    drop(sender);
    Ok(SyncRun {
        summary,
        sent,
        times_ms,
        median_ms,
        fill_secs,
        arrivals,
        rss_kb,
        placement: server.placement,
    })
}
