//! Sending and receiving bench messages: flows of sends (flat out or at a rate, with a window
//! of sends in flight), receivers that track what arrived, and the wait for stragglers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tern_client::{Client, Event, Events, SendTarget};
use tern_protocol::pb;
use tokio::sync::watch;
use tracing::warn;

use crate::probe::{self, Probe, Tracker};

/// One sender writing to one conversation.
#[derive(Debug, Clone)]
pub struct Flow {
    pub id: u32,
    pub client: Arc<Client>,
    pub target: SendTarget,
    /// Devices each message is delivered to (and tracked on).
    pub recipients: u64,
    /// Payload bytes per message.
    pub size: usize,
}

/// How hard to send.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub duration: Duration,
    /// Messages per second over all flows; `None` sends flat out.
    pub rate: Option<f64>,
    /// Sends in flight per flow (each waits for its durable ack).
    pub in_flight: usize,
    /// Messages per flow at most (the duration still applies).
    pub limit: Option<u64>,
    /// Messages carry the bench's own client message ids, as an app's own ids would be
    /// (indexed by the server for resends at any time); otherwise the client library makes
    /// them, as for an app that passes none.
    pub app_ids: bool,
}

impl Plan {
    /// Flat out for `duration`, `in_flight` sends per flow.
    pub fn flat_out(duration: Duration, in_flight: usize) -> Self {
        Self {
            duration,
            rate: None,
            in_flight,
            limit: None,
            app_ids: false,
        }
    }
}

/// What the senders did.
#[derive(Debug)]
pub struct Sent {
    /// Sends acknowledged by the server.
    pub acked: u64,
    pub errors: u64,
    /// Deliveries the acknowledged sends owe (acked × recipients, per flow).
    pub expected: u64,
    pub started: Instant,
    /// Send → acknowledgement, microseconds.
    pub ack_latency: Histogram<u64>,
}

impl Sent {
    /// Nothing sent yet, starting now.
    pub fn nothing() -> Self {
        Self {
            acked: 0,
            errors: 0,
            expected: 0,
            started: Instant::now(),
            ack_latency: probe::histogram(),
        }
    }

    /// Adds what other senders of the same run did.
    pub fn merge(&mut self, other: Sent) {
        self.acked += other.acked;
        self.errors += other.errors;
        self.expected += other.expected;
        self.started = self.started.min(other.started);
        // Both histograms have the same bounds (probe::histogram), so adding cannot fail.
        let _ = self.ack_latency.add(&other.ack_latency);
    }
}

/// Runs `plan` over `flows` and returns when every send has been answered.
pub async fn send(flows: &[Flow], plan: Plan) -> Sent {
    let started = Instant::now();
    let deadline = started + plan.duration;
    let workers = (flows.len() * plan.in_flight.max(1)).max(1);
    // Each worker sends one message per period, so together they offer `rate`.
    let period = plan
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(workers as f64 / r));
    let mut tasks = tokio::task::JoinSet::new();
    let mut counters = Vec::new();
    for flow in flows {
        let next = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        counters.push((flow.recipients, acked.clone()));
        for worker in 0..plan.in_flight.max(1) {
            let (flow, next, acked) = (flow.clone(), next.clone(), acked.clone());
            // Spread the workers' first sends over one period instead of a burst.
            let offset = period.map_or(Duration::ZERO, |p| {
                p.mul_f64(worker as f64 / plan.in_flight.max(1) as f64)
            });
            let pace = Pace {
                deadline,
                period,
                offset,
                limit: plan.limit,
                app_ids: plan.app_ids,
            };
            tasks.spawn(send_loop(flow, next, acked, pace));
        }
    }
    let mut errors = 0;
    let mut ack_latency = probe::histogram();
    while let Some(done) = tasks.join_next().await {
        if let Ok((hist, errs)) = done {
            let _ = ack_latency.add(&hist);
            errors += errs;
        }
    }
    let acked = counters
        .iter()
        .map(|(_, a)| a.load(Ordering::Relaxed))
        .sum();
    let expected = counters
        .iter()
        .map(|(r, a)| r * a.load(Ordering::Relaxed))
        .sum();
    Sent {
        acked,
        errors,
        expected,
        started,
        ack_latency,
    }
}

/// When one send worker sends.
struct Pace {
    deadline: Instant,
    period: Option<Duration>,
    offset: Duration,
    limit: Option<u64>,
    app_ids: bool,
}

async fn send_loop(
    flow: Flow,
    next: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    pace: Pace,
) -> (Histogram<u64>, u64) {
    let mut hist = probe::histogram();
    let mut errors = 0;
    let mut tick = pace.period.map(|p| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + pace.offset, p);
        // Behind schedule (an overloaded machine), skip the missed sends rather than burst.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        tick
    });
    loop {
        if let Some(tick) = &mut tick {
            tick.tick().await;
        }
        if Instant::now() >= pace.deadline {
            break;
        }
        let n = next.fetch_add(1, Ordering::Relaxed);
        if pace.limit.is_some_and(|limit| n >= limit) {
            break;
        }
        if send_one(&flow, n, pace.app_ids, &mut hist).await {
            acked.fetch_add(1, Ordering::Relaxed);
        } else {
            errors += 1;
        }
    }
    (hist, errors)
}

/// Sends message `n` of `flow`; whether it was acknowledged.
pub async fn send_one(
    flow: &Flow,
    n: u64,
    app_ids: bool,
    ack_latency: &mut Histogram<u64>,
) -> bool {
    let probe = Probe {
        flow: flow.id,
        n,
        sent_us: probe::now_us(),
    };
    let msg = pb::SendMessage {
        // Either way, the library's retries after a lost connection repeat the id, so the
        // message is stored once.
        client_message_id: if app_ids {
            format!("b{}-{n}", flow.id)
        } else {
            String::new()
        },
        payload: probe.payload(flow.size),
        ..Default::default()
    };
    match flow.client.send_message(flow.target.clone(), msg).await {
        Ok(_) => {
            probe::record(ack_latency, probe::now_us().saturating_sub(probe.sent_us));
            true
        }
        Err(e) => {
            warn!(flow = flow.id, n, error = %e, "send failed");
            false
        }
    }
}

/// How long receivers may go without progress before the rest counts as lost.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Called for each new message a receiver records: (receiver index, probe, arrival µs).
pub type OnDelivery = Arc<dyn Fn(usize, &Probe, u64) + Send + Sync>;

/// Receiving tasks, one per device.
#[derive(Debug)]
pub struct Receivers {
    tasks: Vec<tokio::task::JoinHandle<Tracker>>,
    stop: watch::Sender<bool>,
    delivered: Arc<AtomicU64>,
}

impl Receivers {
    /// Starts one receiving task per `Events`; `on_delivery` sees each new message.
    pub fn spawn(events: Vec<Events>, on_delivery: Option<OnDelivery>) -> Self {
        let (stop, _) = watch::channel(false);
        let delivered = Arc::new(AtomicU64::new(0));
        let tasks = events
            .into_iter()
            .enumerate()
            .map(|(i, events)| {
                tokio::spawn(receive(
                    i,
                    events,
                    stop.subscribe(),
                    delivered.clone(),
                    on_delivery.clone(),
                ))
            })
            .collect();
        Self {
            tasks,
            stop,
            delivered,
        }
    }

    /// New messages received so far, over all receivers.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Waits until `expected` messages arrived or `patience` passed without progress.
    pub async fn wait_for(&self, expected: u64, patience: Duration) {
        let mut last = self.delivered();
        let mut last_progress = Instant::now();
        while self.delivered() < expected && last_progress.elapsed() < patience {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = self.delivered();
            if now != last {
                last = now;
                last_progress = Instant::now();
            }
        }
    }

    /// Stops the receivers and merges what they saw.
    pub async fn finish(self) -> Tracker {
        let _ = self.stop.send(true);
        let mut total = Tracker::default();
        for task in self.tasks {
            if let Ok(tracker) = task.await {
                total.merge(&tracker);
            }
        }
        total
    }
}

async fn receive(
    index: usize,
    mut events: Events,
    mut stop: watch::Receiver<bool>,
    delivered: Arc<AtomicU64>,
    on_delivery: Option<OnDelivery>,
) -> Tracker {
    let mut tracker = Tracker::default();
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            event = events.recv() => match event {
                Some(event) => event,
                None => break,
            },
        };
        if let Event::Message { message, .. } = event
            && let Some(probe) = tracker.record(&message)
        {
            delivered.fetch_add(1, Ordering::Relaxed);
            if let Some(hook) = &on_delivery {
                hook(index, &probe, probe::now_us());
            }
        }
    }
    tracker
}
