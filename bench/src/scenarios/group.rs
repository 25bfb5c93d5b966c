//! `group`: one sender, groups of each size, messages at a rate; the figure that matters is
//! the latency until the last member has a message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde_json::json;
use tern_client::SendTarget;

use crate::cli::{Common, GroupArgs};
use crate::clients::{self, PoolOptions};
use crate::output::{Outcome, Plot, Summary, round};
use crate::probe::{self, Probe};
use crate::server::{Kind, Server};
use crate::traffic::{self, Flow, OnDelivery, Plan, Receivers};

/// Per message: (members that have it, latest arrival latency µs).
type Arrivals = Arc<Mutex<HashMap<(u32, u64), (u64, u64)>>>;

pub async fn run(common: &Common, args: &GroupArgs) -> anyhow::Result<Outcome> {
    let server = Server::start(Kind::Tern, &common.server_options())?;
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
    let mut plots = Vec::new();
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
        };
        let sent = traffic::send(std::slice::from_ref(&flow), plan).await;
        expected_so_far += sent.expected;
        receivers
            .wait_for(expected_so_far, super::direct::PATIENCE)
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
        groups.push(serde_json::Value::Object(entry));
        plots.push((format!("{size} members"), last_member));
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
    let summary = Summary::of(&sent, &seen);
    let mut json = summary.json("group", rss_kb);
    // Per-delivery figures above; the last member's, per size, here.
    for (group, (_, hist)) in groups.iter().zip(&plots) {
        let size = group["members"].as_u64().unwrap_or(0);
        json.insert(
            format!("last_member_p99_ms_{size}"),
            json!(round(probe::quantile_ms(hist, 0.99))),
        );
    }
    json.insert("groups".into(), json!(groups));
    json.insert("rate".into(), json!(args.rate));
    json.insert("messages_per_group".into(), json!(args.messages));
    json.insert("send_errors".into(), json!(sent.errors));
    json.insert("server".into(), json!(server.placement));
    drop(sender);
    super::close_all(member_clients).await;
    Ok(Outcome {
        json,
        plots: vec![
            Plot::Latency {
                title: "group: send → last member".into(),
                series: plots,
            },
            Plot::Latency {
                title: "group: send → each member".into(),
                series: vec![("all deliveries".into(), summary.latency)],
            },
        ],
    })
}
