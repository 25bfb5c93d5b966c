//! The pairs driver of `direct` and `relay-baseline`: users in 1:1 conversations, both ways,
//! with the clients split over several client threads.
//!
//! Each thread runs its own current-thread runtime (the flavour that drove quinn fastest here,
//! shared/BASELINES.md) with its share of the pairs: their clients, one endpoint, senders and
//! receivers. One thread for every client left a 2-core machine partly idle: acknowledgements
//! come back in bursts (a server's group commit answers a whole fsync's worth at once), and
//! one thread works off each burst alone while the server waits for the sends it releases.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{Barrier, oneshot};

use crate::clients::{self, PoolOptions};
use crate::output::Summary;
use crate::probe::Tracker;
use crate::procfs::{CpuFigures, CpuSample};
use crate::server::Server;
use crate::traffic::{self, Plan, Receivers, Sent};

/// How long receivers may go without progress before the rest counts as lost.
pub const PATIENCE: Duration = Duration::from_secs(10);

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
    out.retain(|share| !share.is_empty());
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
    // Everyone connected before the clock starts; every sender done before CPU is read.
    let connected = Arc::new(Barrier::new(threads + 1));
    let sent = Arc::new(Barrier::new(threads + 1));
    let mut results = Vec::with_capacity(threads);
    let mut first_flow = 0;
    for share in shares {
        let (tx, rx) = oneshot::channel();
        let mut plan = plan;
        plan.rate = plan
            .rate
            .map(|r| r * share.len() as f64 / users.len() as f64);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("client thread runtime")?;
        let job = Share {
            server: server.clone(),
            first_flow,
            users: share,
            size,
            plan,
            connected: connected.clone(),
            sent: sent.clone(),
        };
        first_flow += job.users.len() as u32;
        std::thread::Builder::new()
            .name("tern-bench-clients".into())
            .spawn(move || {
                let _ = tx.send(runtime.block_on(job.drive()));
            })
            .context("starting a client thread")?;
        results.push(rx);
    }
    connected.wait().await;
    let before = CpuSample::take(server.pid());
    sent.wait().await;
    let after = CpuSample::take(server.pid());
    let mut total_sent: Option<Sent> = None;
    let mut seen = Tracker::default();
    let mut failure = None;
    for rx in results {
        match rx.await.context("a client thread panicked")? {
            Ok((s, t)) => {
                seen.merge(&t);
                match &mut total_sent {
                    Some(total) => total.merge(s),
                    None => total_sent = Some(s),
                }
            }
            Err(e) => failure = Some(e),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let sent = total_sent.context("no client thread ran")?;
    Ok(PairsRun {
        summary: Summary::of(&sent, &seen),
        cpu: before.to(&after, sent.acked),
        rss_kb: server.rss_kb(),
        placement: server.placement,
        sent,
        threads,
    })
}

/// One client thread's pairs.
struct Share {
    server: Arc<Server>,
    /// Flow id of the first user: ids are unique over all threads.
    first_flow: u32,
    users: Vec<String>,
    size: usize,
    plan: Plan,
    connected: Arc<Barrier>,
    sent: Arc<Barrier>,
}

impl Share {
    async fn drive(self) -> anyhow::Result<(Sent, Tracker)> {
        let pool =
            clients::connect_all(&self.server, &self.users, PoolOptions::default(), |_| {}).await;
        let pool = match pool {
            Ok(pool) => pool,
            Err(e) => {
                self.connected.wait().await;
                self.sent.wait().await;
                return Err(e);
            }
        };
        let (clients, events): (Vec<_>, Vec<_>) = pool.into_iter().unzip();
        let mut flows = super::pair_flows(&clients, &self.users, self.size);
        for flow in &mut flows {
            flow.id += self.first_flow;
        }
        let receivers = Receivers::spawn(events, None);
        self.connected.wait().await;
        let sent = traffic::send(&flows, self.plan).await;
        self.sent.wait().await;
        receivers.wait_for(sent.expected, PATIENCE).await;
        let seen = receivers.finish().await;
        drop(flows);
        super::close_all(clients).await;
        Ok((sent, seen))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

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
}
