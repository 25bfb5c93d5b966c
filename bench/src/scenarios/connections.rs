//! `connections`: N idle sessions (handshake, Hello, sync, then silence) on a fresh server
//! process; handshakes per second and server RSS per connection. Then a reconnect storm: every
//! client disconnects, each is sent one message while offline, and all reconnect at once and
//! sync; each must get its message exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;
use tern_client::SendTarget;
use tokio::sync::Semaphore;

use crate::cli::{Common, ConnectionsArgs};
use crate::clients::{self, PoolOptions};
use crate::lean;
use crate::output::{Outcome, Plot, Summary, ratio, round};
use crate::probe::{self, Probe, Tracker};
use crate::server::{Kind, Server};
use crate::traffic::{self, Flow, Sent};

const DEFAULT_CLIENTS: usize = 10_000;
/// Time allowed for one session to connect and sync, even at the back of a storm.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Sends in flight while giving every offline user its message.
const FILL_CONCURRENCY: usize = 64;
/// Attempts per session. Like tern-client, a lean client whose attempt fails (a handshake
/// packet dropped at a full socket buffer, the server's auth timeout in a storm) tries again
/// after a full-jitter backoff; failed attempts are reported, never hidden.
const ATTEMPTS: u32 = 6;
/// First backoff ceiling (tern-client's default); doubles per attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(250);

pub async fn run(common: &Common, args: &ConnectionsArgs) -> anyhow::Result<Outcome> {
    let kind = if args.forwarder {
        Kind::Forwarder
    } else {
        Kind::Tern
    };
    let server = Server::start(kind, &common.server_options())?;
    let n = common.clients_or(DEFAULT_CLIENTS);
    let users = super::users("c", n);
    let tokens = users
        .iter()
        .map(|u| server.token(u, "phone"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = lean::client_config(&server.ca_pem, n + 1)?;
    let endpoints = (0..n.div_ceil(args.per_endpoint.max(1)).max(1))
        .map(|_| {
            let endpoint = clients::endpoint(&server, &Default::default())?;
            let mut endpoint = endpoint;
            endpoint.set_default_client_config(config.clone());
            Ok(endpoint)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let endpoint_of = |i: usize| &endpoints[i / args.per_endpoint.max(1) % endpoints.len()];

    // One session first: what the first connection allocates once (TLS, tables, caches) is
    // not a per-connection cost.
    let warmup = lean::open(
        &endpoints[0],
        server.addr,
        &server.token("warmup", "phone")?,
        0,
        OPEN_TIMEOUT,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = server.rss_kb();
    let drops_before = crate::procfs::udp_rcvbuf_errors();

    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let (sessions, connect_latency, connect_retries) =
        open_all(&server, &tokens, &endpoint_of, Some(gate)).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(probe::secs(args.settle)).await;
    let rss_after = server.rss_kb();
    let fds = server.open_fds();
    let per_conn = match (rss_before, rss_after) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 / n as f64),
        _ => None,
    };
    tracing::info!(n, connect_secs, ?per_conn, "idle connections open");

    if args.forwarder {
        // The forwarder stores nothing, so there is no storm to check: RSS only.
        let summary = Summary::of(&Sent::nothing(), &Tracker::default());
        let mut json = summary.json("connections", rss_after);
        json.insert("connections".into(), json!(n));
        json.insert("server_rss_kb_before".into(), json!(rss_before));
        json.insert("server_rss_kb_per_conn".into(), json!(per_conn.map(round)));
        json.insert("server".into(), json!("relay-baseline forwarder"));
        drop((sessions, warmup));
        return Ok(Outcome {
            json,
            plots: Vec::new(),
        });
    }
    // The storm: everyone offline, a message for each, everyone back at once.
    for session in &sessions {
        session.conn.close(0u32.into(), b"storm");
    }
    drop(sessions);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = fill_inboxes(&server, &users).await?;
    let storm_started = Instant::now();
    let (storm, storm_latency, storm_retries) =
        open_all(&server, &tokens, &endpoint_of, None).await?;
    let drops_after = crate::procfs::udp_rcvbuf_errors();
    let storm_secs = storm_started.elapsed().as_secs_f64();
    let mut seen = Tracker::default();
    for (i, session) in storm.iter().enumerate() {
        for message in &session.synced {
            match Probe::parse(&message.payload) {
                Some(probe) if probe.flow as usize == i => {
                    seen.record(message);
                }
                _ => {}
            }
        }
    }
    // Latency here is per client: reconnect, authenticate and sync, during the storm.
    seen.latency = storm_latency.clone();
    seen.last_arrival = Some(Instant::now());
    let mut summary = Summary::of(&sent, &seen);
    summary.msgs_per_s = seen.delivered as f64 / storm_secs.max(1e-9);
    let mut json = summary.json("connections", rss_after);
    json.insert("connections".into(), json!(n));
    json.insert(
        "handshakes_per_s".into(),
        json!(round(n as f64 / connect_secs)),
    );
    super::add_quantiles(&mut json, "connect", &connect_latency);
    json.insert("server_rss_kb_before".into(), json!(rss_before));
    json.insert("server_rss_kb_per_conn".into(), json!(per_conn.map(round)));
    json.insert("server_fds".into(), json!(fds));
    json.insert("connect_retries".into(), json!(connect_retries));
    json.insert("storm_secs".into(), json!(round(storm_secs)));
    json.insert("storm_retries".into(), json!(storm_retries));
    json.insert(
        "udp_rcvbuf_errors".into(),
        json!(
            drops_after
                .zip(drops_before)
                .map(|(a, b)| a.saturating_sub(b))
        ),
    );
    json.insert(
        "storm_reconnects_per_s".into(),
        ratio(storm.len() as f64, storm_secs),
    );
    json.insert("send_errors".into(), json!(sent.errors));
    json.insert("server".into(), json!(server.placement));
    drop(warmup);
    Ok(Outcome {
        json,
        plots: vec![Plot::Latency {
            title: "connections: connect + Hello + sync, per client".into(),
            series: vec![
                (
                    format!("{n} connecting, {} at a time", args.concurrency),
                    connect_latency,
                ),
                (format!("storm: {n} at once"), storm_latency),
            ],
        }],
    })
}

/// Opens a session per token (at most `gate` at a time, else all at once), each syncing from
/// the start of its inbox; returns them in token order, the distribution of their open times
/// (retries included) and the number of failed attempts.
async fn open_all<'a>(
    server: &Server,
    tokens: &[String],
    endpoint_of: &impl Fn(usize) -> &'a quinn::Endpoint,
    gate: Option<Arc<Semaphore>>,
) -> anyhow::Result<(Vec<lean::Session>, hdrhistogram::Histogram<u64>, u64)> {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, token) in tokens.iter().enumerate() {
        let (endpoint, token, gate) = (endpoint_of(i).clone(), token.clone(), gate.clone());
        let addr = server.addr;
        tasks.spawn(async move {
            let _permit = match gate {
                Some(gate) => Some(gate.acquire_owned().await),
                None => None,
            };
            let start = Instant::now();
            let mut failed = 0;
            let session = loop {
                match lean::open(&endpoint, addr, &token, 0, OPEN_TIMEOUT).await {
                    Ok(session) => break Ok(session),
                    Err(e) if failed + 1 >= ATTEMPTS => break Err(e),
                    Err(e) => {
                        tracing::debug!(i, error = %e, "attempt failed");
                        let ceiling = BACKOFF_BASE * 2u32.pow(failed);
                        failed += 1;
                        tokio::time::sleep(ceiling.mul_f64(rand::random::<f64>())).await;
                    }
                }
            };
            (i, session, start.elapsed(), failed)
        });
    }
    let mut sessions: Vec<Option<lean::Session>> = (0..tokens.len()).map(|_| None).collect();
    let mut latency = probe::histogram();
    let mut retries = 0;
    while let Some(joined) = tasks.join_next().await {
        let (i, session, took, failed) = joined?;
        sessions[i] = Some(session.with_context(|| format!("session {i}"))?);
        probe::record(&mut latency, took.as_micros() as u64);
        retries += u64::from(failed);
    }
    let sessions = sessions.into_iter().flatten().collect();
    Ok((sessions, latency, retries))
}

/// Sends message 0 of flow `i` to `users[i]`, for every user.
async fn fill_inboxes(server: &Server, users: &[String]) -> anyhow::Result<Sent> {
    let pool = clients::connect_all(
        server,
        &["storm-sender".to_owned()],
        PoolOptions::default(),
        |c| {
            // One conversation per user: finish each stream soon, within the server's stream limit.
            c.transport.conversation_idle = Duration::from_millis(50);
        },
    )
    .await?;
    let (sender, _events) = pool.into_iter().next().context("sender did not connect")?;
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(FILL_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, user) in users.iter().enumerate() {
        let flow = Flow {
            id: i as u32,
            client: sender.clone(),
            target: SendTarget::User(user.clone()),
            recipients: 1,
            size: 100,
        };
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let mut hist = probe::histogram();
            let ok = traffic::send_one(&flow, 0, &mut hist).await;
            (ok, hist)
        });
    }
    let mut sent = Sent::nothing();
    sent.started = started;
    while let Some(joined) = tasks.join_next().await {
        let (ok, hist) = joined?;
        if ok {
            sent.acked += 1;
            sent.expected += 1;
        } else {
            sent.errors += 1;
        }
        let _ = sent.ack_latency.add(&hist);
    }
    Ok(sent)
}
