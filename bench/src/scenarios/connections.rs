//! `connections`: N idle sessions (handshake, Hello, sync, then silence) on a fresh server
//! process; handshakes per second and server RSS per connection. Then a reconnect storm: every
//! client disconnects, each is sent one message while offline, and all reconnect at once and
//! sync; each must get its message exactly once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
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
/// Offline users each storm sender messages: under the server's default burst of
/// conversation starts (200), so the fill is not rate limited.
const STARTS_PER_SENDER: usize = 150;
/// Attempts per session. Like tern-client, a lean client whose attempt fails (a handshake
/// packet dropped at a full socket buffer, the server's auth timeout in a storm) tries again
/// after a full-jitter backoff; failed attempts are reported, never hidden.
const ATTEMPTS: u32 = 6;
/// First backoff ceiling (tern-client's default); doubles per attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(250);

/// One server's figures.
struct ConnRun {
    summary: Summary,
    n: usize,
    connect_secs: f64,
    connect_latency: Histogram<u64>,
    connect_retries: u64,
    rss_before: Option<u64>,
    rss_after: Option<u64>,
    per_conn: Option<f64>,
    fds: Option<u64>,
    storm_secs: f64,
    storm_latency: Histogram<u64>,
    storm_retries: u64,
    storm_sessions: usize,
    udp_rcvbuf_errors: Option<u64>,
    send_errors: u64,
    placement: &'static str,
}

impl ConnRun {
    fn handshakes_per_s(&self) -> f64 {
        self.n as f64 / self.connect_secs.max(1e-9)
    }
}

/// Runs against the relay-baseline forwarder, then tern (each in a fresh process), and
/// reports tern's figures with their ratios to the baseline's; `--forwarder` measures the
/// forwarder alone.
pub async fn run(common: &Common, args: &ConnectionsArgs) -> anyhow::Result<Outcome> {
    if args.forwarder {
        let base = measure(common, args, Kind::Forwarder).await?;
        let mut outcome = describe(&base, args);
        outcome
            .json
            .insert("server".into(), json!("relay-baseline forwarder"));
        return Ok(outcome);
    }
    let base = if common.no_baseline {
        None
    } else {
        Some(measure(common, args, Kind::Forwarder).await?)
    };
    let run = measure(common, args, Kind::Tern).await?;
    let mut outcome = describe(&run, args);
    if let Some(base) = base {
        let json = &mut outcome.json;
        super::add_baseline(json, &run.summary, &base.summary);
        json.insert(
            "baseline_handshakes_per_s".into(),
            json!(round(base.handshakes_per_s())),
        );
        json.insert(
            "handshakes_ratio_to_baseline".into(),
            ratio(run.handshakes_per_s(), base.handshakes_per_s()),
        );
        json.insert(
            "baseline_server_rss_kb_per_conn".into(),
            json!(base.per_conn.map(round)),
        );
        if let (Some(t), Some(b)) = (run.per_conn, base.per_conn) {
            json.insert("rss_per_conn_ratio_to_baseline".into(), ratio(t, b));
        }
        json.insert("baseline_storm_secs".into(), json!(round(base.storm_secs)));
        json.insert(
            "storm_secs_ratio_to_baseline".into(),
            ratio(run.storm_secs, base.storm_secs),
        );
        let baselines = [
            ("relay-baseline: connecting", base.connect_latency),
            ("relay-baseline: storm", base.storm_latency),
        ];
        for (plot, (name, latency)) in outcome.plots.iter_mut().zip(baselines) {
            if let Plot::Latency { series, .. } = plot {
                series.push((name.into(), latency));
            }
        }
    }
    Ok(outcome)
}

fn describe(run: &ConnRun, args: &ConnectionsArgs) -> Outcome {
    let n = run.n;
    let mut json = run.summary.json("connections", run.rss_after);
    json.insert("connections".into(), json!(n));
    json.insert(
        "handshakes_per_s".into(),
        json!(round(run.handshakes_per_s())),
    );
    super::add_quantiles(&mut json, "connect", &run.connect_latency);
    json.insert("server_rss_kb_before".into(), json!(run.rss_before));
    json.insert(
        "server_rss_kb_per_conn".into(),
        json!(run.per_conn.map(round)),
    );
    json.insert("server_fds".into(), json!(run.fds));
    json.insert("connect_retries".into(), json!(run.connect_retries));
    json.insert("storm_secs".into(), json!(round(run.storm_secs)));
    json.insert("storm_retries".into(), json!(run.storm_retries));
    json.insert("udp_rcvbuf_errors".into(), json!(run.udp_rcvbuf_errors));
    json.insert(
        "storm_reconnects_per_s".into(),
        ratio(run.storm_sessions as f64, run.storm_secs),
    );
    json.insert("send_errors".into(), json!(run.send_errors));
    json.insert("server".into(), json!(run.placement));
    Outcome {
        json,
        // Two charts: on one shared axis the storm's seconds flatten the connecting
        // milliseconds into the floor.
        plots: vec![
            Plot::Latency {
                title: "connecting: connect + Hello + sync, per client".into(),
                series: vec![(
                    format!("{n} connecting, {} at a time", args.concurrency),
                    run.connect_latency.clone(),
                )],
            },
            Plot::Latency {
                title: "reconnect storm: reconnect + sync, per client".into(),
                series: vec![(format!("storm: {n} at once"), run.storm_latency.clone())],
            },
        ],
    }
}

async fn measure(common: &Common, args: &ConnectionsArgs, kind: Kind) -> anyhow::Result<ConnRun> {
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
    drop(warmup);
    Ok(ConnRun {
        summary,
        n,
        connect_secs,
        connect_latency,
        connect_retries,
        rss_before,
        rss_after,
        per_conn,
        fds,
        storm_secs,
        storm_latency,
        storm_retries,
        storm_sessions: storm.len(),
        udp_rcvbuf_errors: drops_after
            .zip(drops_before)
            .map(|(a, b)| a.saturating_sub(b)),
        send_errors: sent.errors,
        placement: server.placement,
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

/// Sends message 0 of flow `i` to `users[i]`, for every user, from several senders: each
/// message starts a conversation, and the server lets one user start at most
/// `conversation_starts_burst` (200 by default) at once.
async fn fill_inboxes(server: &Server, users: &[String]) -> anyhow::Result<Sent> {
    let names: Vec<String> = (0..users.len().div_ceil(STARTS_PER_SENDER))
        .map(|k| format!("storm-sender{k}"))
        .collect();
    let pool = clients::connect_all(server, &names, PoolOptions::default(), |c| {
        // One conversation per user: finish each stream soon, within the server's stream limit.
        c.transport.conversation_idle = Duration::from_millis(50);
    })
    .await?;
    let (senders, _events): (Vec<_>, Vec<_>) = pool.into_iter().unzip();
    anyhow::ensure!(!senders.is_empty(), "no sender connected");
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(FILL_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, user) in users.iter().enumerate() {
        let flow = Flow {
            id: i as u32,
            client: senders[i % senders.len()].clone(),
            target: SendTarget::User(user.clone()),
            recipients: 1,
            size: 100,
        };
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let mut hist = probe::histogram();
            let ok = traffic::send_one(&flow, 0, false, &mut hist).await;
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
