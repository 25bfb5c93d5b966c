//! The pairs driver of `direct` and `relay-baseline`: users in 1:1 conversations, both ways,
//! with the clients split over several client threads.
//!
//! Each thread runs its own current-thread runtime (the flavour that drove quinn fastest here,
//! shared/BASELINES.md) with its share of the pairs: their clients, endpoints, senders and
//! receivers. One thread for every client left a 2-core machine partly idle: acknowledgements
//! come back in bursts (a server's group commit answers a whole fsync's worth at once), and
//! one thread works off each burst alone while the server waits for the sends it releases.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clients::{self, PoolOptions};
use crate::output::Summary;
use crate::probe::Tracker;
use crate::procfs::{CpuFigures, CpuSample};
use crate::server::Server;
use crate::traffic::{self, PATIENCE, Plan, Receivers, Sent};

/// One run of the pairs driver.
#[derive(Debug)]
pub struct PairsRun {
    pub summary: Summary,
    pub sent: Sent,
    pub rss_kb: Option<u64>,
    pub placement: &'static str,
    /// CPU over the sending, per acknowledged message.
    pub cpu: CpuFigures,
    /// Client threads the pairs ran on.
    pub threads: usize,
}

/// Client threads when none are asked for: one per core the bench may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Splits `users` (an even number, partners adjacent) into at most `threads` shares of whole
/// pairs, as even as they go.
fn shares(users: &[String], threads: usize) -> Vec<Vec<String>> {
    let pairs = users.len() / 2;
    let threads = threads.clamp(1, pairs.max(1));
    let mut out = Vec::with_capacity(threads);
    let mut start = 0;
    for t in 0..threads {
        let take = (pairs * (t + 1) / threads - pairs * t / threads) * 2;
        out.push(users[start..start + take].to_vec());
        start += take;
    }
    out
}

/// Connects `users` in pairs on `threads` client threads and runs `plan` against `server`.
/// `plan.rate`, if any, is over all threads.
pub async fn run(
    server: Server,
    users: &[String],
    size: usize,
    plan: Plan,
    threads: usize,
) -> anyhow::Result<PairsRun> {
    let server = Arc::new(server);
    let shares = shares(users, threads);
    let threads = shares.len();
    // Every runtime first, so that no thread has started when building one fails.
    let runtimes = (0..threads)
        .map(|_| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        })
        .collect::<Result<Vec<_>, _>>()
        .context("client thread runtime")?;
    let (phase_tx, phase) = watch::channel(Phase::Connecting);
    let (milestone_tx, milestones) = mpsc::unbounded_channel();
    let mut progress = Progress::new(milestones);
    let mut results = Vec::with_capacity(threads);
    let mut first_flow = 0;
    for (share, runtime) in shares.into_iter().zip(runtimes) {
        let (tx, rx) = oneshot::channel();
        let mut plan = plan;
        plan.rate = plan
            .rate
            .map(|r| r * share.len() as f64 / users.len() as f64);
        let job = Share {
            server: server.clone(),
            first_flow,
            users: share,
            size,
            plan,
            phase: phase.clone(),
            milestones: Milestones::new(milestone_tx.clone()),
        };
        first_flow += job.users.len() as u32;
        // If this fails, the job is dropped (its milestones all sent) and so is `phase_tx`
        // on return: the threads already started see the run end, and stop.
        std::thread::Builder::new()
            .name("tern-bench-clients".into())
            .spawn(move || {
                let _ = tx.send(runtime.block_on(job.drive()));
            })
            .context("starting a client thread")?;
        results.push(rx);
    }
    drop(milestone_tx);
    // Everyone connected before the clock starts; every sender done before CPU is read; every
    // delivery in before the server's memory is read, with the clients still connected.
    let all_connected = progress.all(Milestone::Connected, threads).await;
    let _ = phase_tx.send(if all_connected {
        Phase::Sending
    } else {
        Phase::Stopping
    });
    let before = CpuSample::take(server.pid());
    progress.all(Milestone::Sent, threads).await;
    let after = CpuSample::take(server.pid());
    progress.all(Milestone::Drained, threads).await;
    let rss_kb = server.rss_kb();
    let _ = phase_tx.send(Phase::Stopping);
    let mut total_sent: Option<Sent> = None;
    let mut seen = Tracker::default();
    let mut failure = None;
    for rx in results {
        match rx.await.context("a client thread panicked") {
            Ok(Ok((s, t))) => {
                seen.merge(&t);
                match &mut total_sent {
                    Some(total) => total.merge(s),
                    None => total_sent = Some(s),
                }
            }
            Ok(Err(e)) | Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let sent = total_sent.context("no client thread ran")?;
    Ok(PairsRun {
        summary: Summary::of(&sent, &seen),
        cpu: before.to(&after, sent.acked),
        rss_kb,
        placement: server.placement,
        sent,
        threads,
    })
}

/// What the client threads may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Sending,
    /// Close the clients and return (the run is over, or a thread could not connect).
    Stopping,
}

/// How far a client thread got. Each is reported once per thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Milestone {
    /// Connected; `Failed` instead if it could not.
    Connected,
    Failed,
    /// Its senders are done.
    Sent,
    /// Every delivery its sends owe arrived, or patience ran out.
    Drained,
}

/// The main task's view of the threads' milestones.
struct Progress {
    rx: mpsc::UnboundedReceiver<Milestone>,
    /// How many threads reported each milestone so far (`Failed` counts as `Connected`).
    counts: [usize; 3],
    failed: bool,
}

impl Progress {
    fn new(rx: mpsc::UnboundedReceiver<Milestone>) -> Self {
        Self {
            rx,
            counts: [0; 3],
            failed: false,
        }
    }

    /// Waits until `threads` threads reached `milestone` (or every thread has stopped);
    /// whether none of them failed to connect. A thread may be a milestone ahead of
    /// another, so every report is counted, whichever is awaited.
    async fn all(&mut self, milestone: Milestone, threads: usize) -> bool {
        let slot = |m| ORDER.iter().position(|&o| o == m).unwrap_or(0);
        while self.counts[slot(milestone)] < threads {
            match self.rx.recv().await {
                Some(Milestone::Failed) => {
                    self.failed = true;
                    self.counts[0] += 1;
                }
                Some(m) => self.counts[slot(m)] += 1,
                None => break,
            }
        }
        !self.failed
    }
}

/// Reports a thread's milestones to the main task, each exactly once, in order: those not
/// reached are reported when it is dropped (the thread failed, or panicked), so the main
/// task never waits for a thread that has stopped.
struct Milestones {
    tx: mpsc::UnboundedSender<Milestone>,
    next: usize,
}

const ORDER: [Milestone; 3] = [Milestone::Connected, Milestone::Sent, Milestone::Drained];

impl Milestones {
    fn new(tx: mpsc::UnboundedSender<Milestone>) -> Self {
        Self { tx, next: 0 }
    }

    /// Reports everything up to and including `milestone`.
    fn reach(&mut self, milestone: Milestone) {
        while let Some(&m) = ORDER.get(self.next) {
            let _ = self.tx.send(m);
            self.next += 1;
            if m == milestone {
                break;
            }
        }
    }

    fn failed(&mut self) {
        if self.next == 0 {
            let _ = self.tx.send(Milestone::Failed);
            self.next = 1;
        }
    }
}

impl Drop for Milestones {
    fn drop(&mut self) {
        self.failed();
        self.reach(Milestone::Drained);
    }
}

/// One client thread's pairs.
struct Share {
    server: Arc<Server>,
    /// Flow id of its first user. Flow ids are unique over all threads: each payload's header
    /// and each bench-chosen client message id (`--app-ids`) carries one.
    first_flow: u32,
    users: Vec<String>,
    size: usize,
    plan: Plan,
    phase: watch::Receiver<Phase>,
    milestones: Milestones,
}

impl Share {
    async fn drive(mut self) -> anyhow::Result<(Sent, Tracker)> {
        let pool =
            clients::connect_all(&self.server, &self.users, PoolOptions::default(), |_| {}).await;
        let pool = match pool {
            Ok(pool) => pool,
            Err(e) => {
                self.milestones.failed();
                return Err(e);
            }
        };
        let (clients, events): (Vec<_>, Vec<_>) = pool.into_iter().unzip();
        let mut flows = super::pair_flows(&clients, &self.users, self.size);
        for flow in &mut flows {
            flow.id += self.first_flow;
        }
        let receivers = Receivers::spawn(events, None);
        self.milestones.reach(Milestone::Connected);
        // Copied out at once: a `watch::Ref` held on would block the main task's next send.
        let go = self
            .phase
            .wait_for(|p| *p != Phase::Connecting)
            .await
            .map(|p| *p);
        let sent = if go.is_ok_and(|p| p == Phase::Sending) {
            let sent = traffic::send(&flows, self.plan).await;
            self.milestones.reach(Milestone::Sent);
            receivers.wait_for(sent.expected, PATIENCE).await;
            self.milestones.reach(Milestone::Drained);
            let _ = self.phase.wait_for(|p| *p == Phase::Stopping).await;
            sent
        } else {
            // Another thread could not connect: its error is the run's.
            Sent::nothing()
        };
        let seen = receivers.finish().await;
        drop(flows);
        super::close_all(clients).await;
        Ok((sent, seen))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    fn users(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("u{i}")).collect()
    }

    #[test]
    fn shares_keep_partners_together_and_every_user_once() {
        for (n, threads, sizes) in [
            (100, 2, vec![50, 50]),
            (10, 3, vec![2, 4, 4]),
            (6, 4, vec![2, 2, 2]),
            (2, 8, vec![2]),
            (8, 1, vec![8]),
        ] {
            let all = users(n);
            let split = shares(&all, threads);
            let got: Vec<usize> = split.iter().map(Vec::len).collect();
            assert_eq!(got, sizes, "{n} users on {threads} threads");
            // In order and whole: user 2k and its partner 2k+1 land in the same share.
            assert_eq!(split.concat(), all);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_thread_that_stops_early_never_leaves_the_main_task_waiting() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut progress = Progress::new(rx);
        let mut healthy = Milestones::new(tx.clone());
        let mut failed = Milestones::new(tx.clone());
        let panicked = Milestones::new(tx.clone());
        drop(tx);
        healthy.reach(Milestone::Connected);
        failed.failed();
        // The panicking thread's milestones are dropped while it unwinds; the failed one
        // returns (dropped) after reporting.
        drop(panicked);
        drop(failed);
        let patience = Duration::from_secs(5);
        let all_connected =
            tokio::time::timeout(patience, progress.all(Milestone::Connected, 3)).await;
        assert_eq!(all_connected.ok(), Some(false), "a failure is reported");
        healthy.reach(Milestone::Sent);
        assert!(
            tokio::time::timeout(patience, progress.all(Milestone::Sent, 3))
                .await
                .is_ok()
        );
        drop(healthy);
        assert!(
            tokio::time::timeout(patience, progress.all(Milestone::Drained, 3))
                .await
                .is_ok()
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_thread_ahead_of_another_is_counted_for_the_milestone_awaited_later() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut progress = Progress::new(rx);
        let mut fast = Milestones::new(tx.clone());
        let mut slow = Milestones::new(tx.clone());
        fast.reach(Milestone::Connected);
        slow.reach(Milestone::Connected);
        assert!(progress.all(Milestone::Connected, 2).await);
        // The fast thread is drained before the slow one has sent: its `Drained` arrives
        // while the main task waits for `Sent`, and must still count later.
        fast.reach(Milestone::Drained);
        slow.reach(Milestone::Sent);
        progress.all(Milestone::Sent, 2).await;
        slow.reach(Milestone::Drained);
        let patience = Duration::from_secs(5);
        let drained = tokio::time::timeout(patience, progress.all(Milestone::Drained, 2));
        assert!(drained.await.is_ok(), "{:?}", progress.counts);
        // Reported once each: dropping them now adds nothing.
        drop((fast, slow, tx));
        assert_eq!(progress.rx.recv().await, None);
    }
}
