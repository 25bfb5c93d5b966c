//! `group`: one sender, groups of each size, messages at a rate; the figure that matters is
//! the latency until the last member has a message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::json;
use tern_client::SendTarget;

use crate::cli::{Common, GroupArgs};
use crate::clients::{self, PoolOptions};
use crate::output::{Outcome, Plot, Summary, ratio, round};
use crate::probe::{self, Probe};
use crate::server::{Kind, Server};
use crate::traffic::{self, Flow, OnDelivery, Plan, Receivers};

/// Per message: (members that have it, latest arrival latency µs).
type Arrivals = Arc<Mutex<HashMap<(u32, u64), (u64, u64)>>>;

/// One server's figures.
struct GroupRun {
    summary: Summary,
    sent: traffic::Sent,
    /// Per size: the per-size JSON entry, and the last member's latencies.
    groups: Vec<(serde_json::Value, usize, Histogram<u64>)>,
    rss_kb: Option<u64>,
    placement: &'static str,
}

/// Runs against the relay-baseline forwarder (groups in memory), then tern, and reports
/// tern's figures with their ratios to the baseline's.
pub async fn run(common: &Common, args: &GroupArgs) -> anyhow::Result<Outcome> {
    let base = if common.no_baseline {
        None
    } else {
        Some(measure(common, args, Kind::Forwarder).await?)
    };
    let run = measure(common, args, Kind::Tern).await?;
    let mut json = run.summary.json("group", run.rss_kb);
    // Per-delivery figures above; the last member's, per size, here.
    for (_, size, hist) in &run.groups {
        json.insert(
            format!("last_member_p99_ms_{size}"),
            json!(round(probe::quantile_ms(hist, 0.99))),
        );
    }
    json.insert(
        "groups".into(),
        json!(run.groups.iter().map(|g| g.0.clone()).collect::<Vec<_>>()),
    );
    json.insert("rate".into(), json!(args.rate));
    json.insert("messages_per_group".into(), json!(args.messages));
    json.insert("send_errors".into(), json!(run.sent.errors));
    json.insert("server".into(), json!(run.placement));
    let mut last_member: Vec<(String, Histogram<u64>)> = run
        .groups
        .iter()
        .map(|(_, size, hist)| (format!("{size} members"), hist.clone()))
        .collect();
    let mut each = vec![("all deliveries".to_owned(), run.summary.latency.clone())];
    if let Some(base) = base {
        super::add_baseline(&mut json, &run.summary, &base.summary);
        for ((_, size, tern), (_, _, baseline)) in run.groups.iter().zip(&base.groups) {
            let p99 = |h| probe::quantile_ms(h, 0.99);
            json.insert(
                format!("baseline_last_member_p99_ms_{size}"),
                json!(round(p99(baseline))),
            );
            json.insert(
                format!("last_member_p99_ratio_to_baseline_{size}"),
                ratio(p99(tern), p99(baseline)),
            );
            last_member.push((format!("{size} members, relay-baseline"), baseline.clone()));
        }
        each.push(("relay-baseline".into(), base.summary.latency));
    }
    Ok(Outcome {
        json,
        plots: vec![
            Plot::Latency {
                title: "group: send → last member".into(),
                series: last_member,
            },
            Plot::Latency {
                title: "group: send → each member".into(),
                series: each,
            },
        ],
    })
}

async fn measure(common: &Common, args: &GroupArgs, kind: Kind) -> anyhow::Result<GroupRun> {
    let server = Server::start(kind, &common.server_options())?;
    let largest = args
        .sizes
        .iter()
        .copied()
        .max()
        .context("--sizes is empty")?;
    let members = super::users("m", largest);
    let pool = clients::connect_all(&server, &members, PoolOptions::default(), |_| {}).await?;
    let (member_clients, events): (Vec<_>, Vec<_>) = pool.into_iter().unzip();
    let sender_pool = clients::connect_all(
        &server,
        &["gsender".to_owned()],
        PoolOptions::default(),
        |_| {},
    )
    .await?;
    let (sender, _sender_events) = sender_pool
        .into_iter()
        .next()
        .context("sender did not connect")?;

    let arrivals: Arrivals = Arc::default();
    let hook: OnDelivery = {
        let arrivals = arrivals.clone();
        Arc::new(move |_, probe: &Probe, now| {
            let mut map = arrivals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let entry = map.entry((probe.flow, probe.n)).or_insert((0, 0));
            entry.0 += 1;
            entry.1 = entry.1.max(now.saturating_sub(probe.sent_us));
        })
    };
    let receivers = Receivers::spawn(events, Some(hook));

    let mut groups = Vec::new();
    let mut total_sent = None::<traffic::Sent>;
    let mut expected_so_far = 0;
    for (index, &size) in args.sizes.iter().enumerate() {
        let conv = sender
            .create_group(&format!("bench-{size}"), &members[..size])
            .await?;
        let flow = Flow {
            id: index as u32,
            client: sender.clone(),
            target: SendTarget::Conversation(conv.conversation_id),
            recipients: size as u64,
            size: args.size,
        };
        let plan = Plan {
            duration: probe::secs(args.messages as f64 / args.rate.max(0.001) + 5.0),
            rate: Some(args.rate),
            in_flight: 4,
            limit: Some(args.messages),
            app_ids: false,
        };
        let sent = traffic::send(std::slice::from_ref(&flow), plan).await;
        expected_so_far += sent.expected;
        receivers
            .wait_for(expected_so_far, crate::traffic::PATIENCE)
            .await;
        let mut last_member = probe::histogram();
        let mut complete = 0;
        {
            let map = arrivals
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (&(flow, _), &(count, latest)) in map.iter() {
                if flow == index as u32 && count == size as u64 {
                    complete += 1;
                    probe::record(&mut last_member, latest);
                }
            }
        }
        let mut entry = serde_json::Map::new();
        entry.insert("members".into(), json!(size));
        entry.insert("sent".into(), json!(sent.acked));
        entry.insert("complete".into(), json!(complete));
        super::add_quantiles(&mut entry, "last_member", &last_member);
        super::add_quantiles(&mut entry, "ack", &sent.ack_latency);
        groups.push((serde_json::Value::Object(entry), size, last_member));
        total_sent = Some(match total_sent {
            None => sent,
            Some(mut total) => {
                total.acked += sent.acked;
                total.errors += sent.errors;
                total.expected += sent.expected;
                let _ = total.ack_latency.add(&sent.ack_latency);
                total
            }
        });
    }
    let rss_kb = server.rss_kb();
    let seen = receivers.finish().await;
    let sent = total_sent.context("no group size")?;
    drop(sender);
    super::close_all(member_clients).await;
    Ok(GroupRun {
        summary: Summary::of(&sent, &seen),
        sent,
        groups,
        rss_kb,
        placement: server.placement,
    })
}
