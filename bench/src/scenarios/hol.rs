//! `hol`: head-of-line blocking, the headline figure. Through the lossy relay (tern-netsim),
//! a sender keeps conversation A busy with maximum-size messages while sending small messages
//! in conversation B; the figure is B's latency, sender to recipient. Run twice on one server,
//! with fresh users and the same relay seed: once as tern sends (a stream per conversation),
//! once with the sender's client forced onto one stream for every conversation (the switch
//! exists for this comparison only). Every user connects through the relay.
//!
//! The switch changes the sender's uploads only (the server pushes one stream per
//! conversation either way), so by default A and B go to different recipients and B's
//! latency shows what the sender's streams do. `--same-recipient` sends both to one device,
//! which adds that device's receive path to B's latency.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde_json::json;
use tern_client::SendTarget;
use tern_netsim::{Impairment, Relay, RelayConfig};

use crate::cli::{Common, HolArgs};
use crate::clients::{self, PoolOptions};
use crate::output::{Outcome, Plot, Summary, ratio, round};
use crate::probe::{self, Probe};
use crate::server::{Kind, Server};
use crate::traffic::{self, Flow, OnDelivery, Plan, Receivers};

const DEFAULT_SECS: f64 = 10.0;
const BULK: u32 = 0;
const SMALL: u32 = 1;

/// One mode's figures.
struct ModeRun {
    summary: Summary,
    small: Histogram<u64>,
    bulk_bytes_per_s: f64,
    relay_dropped: u64,
}

pub async fn run(common: &Common, args: &HolArgs) -> anyhow::Result<Outcome> {
    // The baseline: the forwarder through the same relay, a stream per conversation.
    let base = if common.no_baseline {
        None
    } else {
        let forwarder = Server::start(Kind::Forwarder, &common.server_options())?;
        Some(mode(&forwarder, common, args, false).await?)
    };
    let server = Server::start(Kind::Tern, &common.server_options())?;
    let streams = mode(&server, common, args, false).await?;
    let single = mode(&server, common, args, true).await?;
    let p99 = |h: &Histogram<u64>| probe::quantile_ms(h, 0.99);
    // The common latency figures are conversation B's with streams, the figure that matters.
    let mut summary = streams.summary.clone();
    summary.latency = streams.small.clone();
    let mut json = summary.json("hol", server.rss_kb());
    // The common counts cover both modes: nothing may be lost or duplicated in either.
    for key in ["sent", "delivered", "lost", "duplicated", "out_of_order"] {
        let both = json[key].as_u64().unwrap_or(0) + count(&single.summary, key);
        json.insert(key.into(), json!(both));
    }
    json.insert("p99_ms_streams".into(), json!(round(p99(&streams.small))));
    json.insert(
        "p99_ms_single_stream".into(),
        json!(round(p99(&single.small))),
    );
    json.insert(
        "hol_ratio".into(),
        ratio(p99(&streams.small), p99(&single.small)),
    );
    let p50 = |h: &Histogram<u64>| round(probe::quantile_ms(h, 0.5));
    json.insert("p50_ms_streams".into(), json!(p50(&streams.small)));
    json.insert("p50_ms_single_stream".into(), json!(p50(&single.small)));
    json.insert(
        "p999_ms_streams".into(),
        json!(round(probe::quantile_ms(&streams.small, 0.999))),
    );
    json.insert(
        "p999_ms_single_stream".into(),
        json!(round(probe::quantile_ms(&single.small, 0.999))),
    );
    json.insert(
        "bulk_mb_per_s_streams".into(),
        json!(round(streams.bulk_bytes_per_s / 1e6)),
    );
    json.insert(
        "bulk_mb_per_s_single_stream".into(),
        json!(round(single.bulk_bytes_per_s / 1e6)),
    );
    json.insert("small_messages_streams".into(), json!(streams.small.len()));
    json.insert(
        "small_messages_single_stream".into(),
        json!(single.small.len()),
    );
    json.insert("loss".into(), json!(args.loss));
    json.insert("same_recipient".into(), json!(args.same_recipient));
    json.insert("delay_ms".into(), json!(args.delay_ms));
    json.insert("bulk_size".into(), json!(args.bulk_size));
    json.insert(
        "relay_dropped".into(),
        json!(streams.relay_dropped + single.relay_dropped),
    );
    json.insert("server".into(), json!(server.placement));
    let mut series = vec![
        ("stream per conversation".into(), streams.small.clone()),
        ("one stream".into(), single.small),
    ];
    if let Some(base) = base {
        // Conversation B with streams, tern against the forwarder.
        let mut base_summary = base.summary.clone();
        base_summary.latency = base.small.clone();
        super::add_baseline(&mut json, &summary, &base_summary);
        json.insert(
            "baseline_bulk_mb_per_s".into(),
            json!(round(base.bulk_bytes_per_s / 1e6)),
        );
        json.insert(
            "bulk_ratio_to_baseline".into(),
            ratio(streams.bulk_bytes_per_s, base.bulk_bytes_per_s),
        );
        series.push(("relay-baseline, stream per conversation".into(), base.small));
    }
    Ok(Outcome {
        json,
        plots: vec![Plot::Latency {
            title: format!(
                "hol: conversation B latency, {}% loss, {} ms each way",
                args.loss * 100.0,
                args.delay_ms
            ),
            series,
        }],
    })
}

fn count(summary: &Summary, key: &str) -> u64 {
    match key {
        "sent" => summary.sent,
        "delivered" => summary.delivered,
        "lost" => summary.lost,
        "duplicated" => summary.duplicated,
        _ => summary.out_of_order,
    }
}

async fn mode(
    server: &Server,
    common: &Common,
    args: &HolArgs,
    single: bool,
) -> anyhow::Result<ModeRun> {
    let impairment = Impairment {
        loss: args.loss,
        delay: Duration::from_millis(args.delay_ms),
        ..Impairment::none()
    };
    let relay = Relay::start(RelayConfig {
        to_server: impairment,
        to_client: impairment,
        seed: Some(args.seed),
        ..RelayConfig::new(server.addr)
    })
    .await?;
    let tag = if single { "single" } else { "streams" };
    let users = [
        format!("hol-{tag}-sender"),
        format!("hol-{tag}-bulk"),
        format!("hol-{tag}-chat"),
    ];
    let relay_addr = relay.local_addr().to_string();
    // Own sockets: the relay gives each client address its own path to the server.
    let pool = clients::connect_all(server, &users, PoolOptions { per_endpoint: 0 }, |c| {
        c.server.clone_from(&relay_addr);
        c.single_stream_for_bench = single;
    })
    .await?;
    let mut pool = pool.into_iter();
    let (sender, _sender_events) = pool.next().context("sender")?;
    let (bulk_recipient, bulk_events) = pool.next().context("bulk recipient")?;
    let (chat_recipient, chat_events) = pool.next().context("chat recipient")?;
    let chat_peer = if args.same_recipient {
        &users[1]
    } else {
        &users[2]
    };
    // B is a group, so that with --same-recipient it is still a second conversation.
    let group = sender
        .create_group("hol-b", std::slice::from_ref(chat_peer))
        .await?;

    let small = Arc::new(Mutex::new(probe::histogram()));
    let hook: OnDelivery = {
        let small = small.clone();
        Arc::new(move |_, p: &Probe, now| {
            if p.flow == SMALL {
                let mut hist = small
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                probe::record(&mut hist, now.saturating_sub(p.sent_us));
            }
        })
    };
    let receivers = Receivers::spawn(vec![bulk_events, chat_events], Some(hook));
    let duration = common.duration_or(DEFAULT_SECS);
    let bulk = Flow {
        id: BULK,
        client: sender.clone(),
        target: SendTarget::User(users[1].clone()),
        recipients: 1,
        size: args.bulk_size,
    };
    let chat = Flow {
        id: SMALL,
        client: sender.clone(),
        target: SendTarget::Conversation(group.conversation_id),
        recipients: 1,
        size: args.size,
    };
    // Open loop: a small message every interval whether or not earlier ones were answered
    // (up to 256 outstanding), as a person typing does not wait for the previous message.
    let chat_plan = Plan {
        rate: Some(1000.0 / args.interval_ms.max(1) as f64),
        ..Plan::flat_out(duration, 256)
    };
    let (bulk_sent, chat_sent) = tokio::join!(
        traffic::send(
            std::slice::from_ref(&bulk),
            Plan::flat_out(duration, args.bulk_in_flight)
        ),
        traffic::send(std::slice::from_ref(&chat), chat_plan),
    );
    let mut sent = bulk_sent;
    let bulk_bytes_per_s = (sent.acked * args.bulk_size as u64) as f64 / duration.as_secs_f64();
    sent.acked += chat_sent.acked;
    sent.expected += chat_sent.expected;
    sent.errors += chat_sent.errors;
    receivers
        .wait_for(sent.expected, Duration::from_secs(20))
        .await;
    let seen = receivers.finish().await;
    let small = small
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let stats = relay.stats();
    drop((bulk, chat, bulk_recipient, chat_recipient));
    if let Ok(sender) = Arc::try_unwrap(sender) {
        sender.close().await;
    }
    relay.stop().await;
    Ok(ModeRun {
        summary: Summary::of(&sent, &seen),
        small,
        bulk_bytes_per_s,
        relay_dropped: stats.to_server_dropped + stats.to_client_dropped,
    })
}
