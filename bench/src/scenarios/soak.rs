//! `soak`: steady mixed load (1:1 pairs at a rate, plus a group of every client) for the
//! duration, sampling the server's RSS and open file descriptors. A leak shows as a slope.

use std::time::{Duration, Instant};

use serde_json::json;
use tern_client::SendTarget;

use crate::cli::{Common, SoakArgs};
use crate::clients::{self, PoolOptions};
use crate::output::{Outcome, Plot, Summary};
use crate::server::{Kind, Server};
use crate::traffic::{self, Flow, Plan, Receivers};

const DEFAULT_CLIENTS: usize = 50;
const DEFAULT_SECS: f64 = 30.0;
/// Flow id of the group messages (pairs use 0..clients).
const GROUP_FLOW: u32 = u32::MAX;

/// One server's figures.
struct SoakRun {
    summary: Summary,
    sent: traffic::Sent,
    samples: Vec<Sample>,
    rss_kb: Option<u64>,
    placement: &'static str,
}

/// Runs against the relay-baseline forwarder, then tern, and reports tern's figures with
/// their ratios to the baseline's.
pub async fn run(common: &Common, args: &SoakArgs) -> anyhow::Result<Outcome> {
    let base = if common.no_baseline {
        None
    } else {
        Some(measure(common, args, Kind::Forwarder).await?)
    };
    let run = measure(common, args, Kind::Tern).await?;
    let (summary, samples) = (&run.summary, &run.samples);
    let n = common.clients_or(DEFAULT_CLIENTS).max(2) & !1;
    let mut json = summary.json("soak", run.rss_kb);
    let column = |f: fn(&Sample) -> Option<u64>| samples.iter().filter_map(f).collect::<Vec<_>>();
    let rss = column(|s| s.rss_kb);
    let fds = column(|s| s.fds);
    json.insert("rss_kb_start".into(), json!(rss.first()));
    json.insert("rss_kb_end".into(), json!(rss.last()));
    json.insert("rss_kb_max".into(), json!(rss.iter().max()));
    json.insert("fds_start".into(), json!(fds.first()));
    json.insert("fds_end".into(), json!(fds.last()));
    json.insert("fds_max".into(), json!(fds.iter().max()));
    json.insert(
        "samples".into(),
        json!(
            samples
                .iter()
                .map(|s| json!([crate::output::round(s.secs), s.rss_kb, s.fds]))
                .collect::<Vec<_>>()
        ),
    );
    json.insert("clients".into(), json!(n));
    json.insert("send_errors".into(), json!(run.sent.errors));
    json.insert("server".into(), json!(run.placement));
    let over = |samples: &[Sample], f: fn(&Sample) -> Option<u64>| {
        samples
            .iter()
            .filter_map(|s| f(s).map(|v| (s.secs, v as f64)))
            .collect::<Vec<_>>()
    };
    let mut rss_series = vec![("VmRSS".to_owned(), over(samples, |s| s.rss_kb))];
    let mut latency = vec![("soak".into(), summary.latency.clone())];
    if let Some(base) = &base {
        super::add_baseline(&mut json, summary, &base.summary);
        let rss = |r: &SoakRun| {
            r.samples
                .iter()
                .filter_map(|s| s.rss_kb)
                .collect::<Vec<_>>()
        };
        json.insert("baseline_rss_kb_start".into(), json!(rss(base).first()));
        json.insert("baseline_rss_kb_end".into(), json!(rss(base).last()));
        latency.push(("relay-baseline".into(), base.summary.latency.clone()));
        rss_series.push((
            "VmRSS, relay-baseline".into(),
            over(&base.samples, |s| s.rss_kb),
        ));
    }
    let plots = vec![
        Plot::Latency {
            title: "soak: send → delivered".into(),
            series: latency,
        },
        Plot::Over {
            title: "soak: server RSS".into(),
            unit: "KB".into(),
            series: rss_series,
        },
        Plot::Over {
            title: "soak: server open file descriptors".into(),
            unit: "fds".into(),
            series: vec![("fds".into(), over(samples, |s| s.fds))],
        },
    ];
    Ok(Outcome { json, plots })
}

async fn measure(common: &Common, args: &SoakArgs, kind: Kind) -> anyhow::Result<SoakRun> {
    let server = Server::start(kind, &common.server_options())?;
    let n = common.clients_or(DEFAULT_CLIENTS).max(2) & !1;
    let users = super::users("soak", n);
    let pool = clients::connect_all(&server, &users, PoolOptions::default(), |_| {}).await?;
    let (clients, events): (Vec<_>, Vec<_>) = pool.into_iter().unzip();
    let group = clients[0].create_group("soak", &users[1..]).await?;
    let mut pairs = super::pair_flows(&clients, &users, args.size);
    let group_flow = Flow {
        id: GROUP_FLOW,
        client: clients[0].clone(),
        target: SendTarget::Conversation(group.conversation_id),
        recipients: n as u64 - 1,
        size: args.size,
    };
    let receivers = Receivers::spawn(events, None);
    let duration = common.duration_or(DEFAULT_SECS);
    let sampler = {
        let pid = server.pid();
        let every = Duration::from_millis(args.sample_ms.max(10));
        tokio::spawn(sample(pid, every, Instant::now() + duration))
    };
    let (mut sent, group_sent) = tokio::join!(
        traffic::send(
            &pairs,
            Plan {
                rate: Some(args.rate),
                ..Plan::flat_out(duration, 2)
            }
        ),
        traffic::send(
            std::slice::from_ref(&group_flow),
            Plan {
                rate: Some(args.group_rate),
                ..Plan::flat_out(duration, 1)
            }
        ),
    );
    sent.acked += group_sent.acked;
    sent.expected += group_sent.expected;
    sent.errors += group_sent.errors;
    let samples = sampler.await.unwrap_or_default();
    receivers
        .wait_for(sent.expected, crate::traffic::PATIENCE)
        .await;
    let seen = receivers.finish().await;
    let summary = Summary::of(&sent, &seen);
    let rss_kb = server.rss_kb();
    pairs.clear();
    drop(group_flow);
    super::close_all(clients).await;
    Ok(SoakRun {
        summary,
        sent,
        samples,
        rss_kb,
        placement: server.placement,
    })
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    secs: f64,
    rss_kb: Option<u64>,
    fds: Option<u64>,
}

async fn sample(pid: Option<u32>, every: Duration, deadline: Instant) -> Vec<Sample> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        out.push(Sample {
            secs: start.elapsed().as_secs_f64(),
            rss_kb: pid.and_then(crate::procfs::rss_kb),
            fds: pid.and_then(crate::procfs::open_fds),
        });
        if Instant::now() >= deadline {
            return out;
        }
    }
}
