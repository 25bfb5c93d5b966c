//! A user-space lossy UDP relay for tests and benches.
//!
//! The machines tern is tested on have no `netem` (and tests should not need root anyway), so bad
//! networks are simulated here instead: clients talk to [`Relay::local_addr`], and the relay
//! forwards their datagrams to the real server and back, dropping, delaying, jittering and
//! reordering them per direction as its [`Impairment`]s say.
//!
//! Each distinct client source address gets its own upstream socket, so the server sees one
//! distinct peer address per client address. A client that rebinds to a new local port therefore
//! shows up at the server as a new address, which is exactly what QUIC connection migration looks
//! like through a NAT; tests rely on this.
//!
//! ```no_run
//! # async fn demo(server: std::net::SocketAddr) -> std::io::Result<()> {
//! use std::time::Duration;
//! use tern_netsim::{Impairment, Relay, RelayConfig};
//!
//! let mut config = RelayConfig::new(server);
//! config.to_server = Impairment::lossy(0.1);
//! config.to_client = Impairment { delay: Duration::from_millis(40), ..Impairment::none() };
//! config.seed = Some(7);
//! let relay = Relay::start(config).await?;
//! // Point the client at `relay.local_addr()` instead of `server`.
//! relay.set_blackhole(true); // the phone went into a tunnel
//! relay.stop().await;
//! # Ok(())
//! # }
//! ```

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Large enough for any UDP payload, so nothing is ever truncated by the relay itself.
const MAX_DATAGRAM: usize = 65_536;

/// How one direction of the relay mistreats datagrams.
///
/// Out-of-range values never panic: a `loss` or `reorder` of 0 or less (or NaN) never triggers,
/// 1 or more always does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairment {
    /// Probability in `0.0..=1.0` that a datagram is dropped.
    pub loss: f64,
    /// Fixed one-way delay added to every delivered datagram.
    pub delay: Duration,
    /// Extra delay drawn uniformly from `0..=jitter` per datagram. Because each datagram draws
    /// its own value, jitter larger than the gap between datagrams also reorders them.
    pub jitter: Duration,
    /// Probability that a datagram is additionally held back by `reorder_extra`, so it lands
    /// after datagrams sent later.
    pub reorder: f64,
    /// Hold-back applied to the datagrams picked by `reorder`.
    pub reorder_extra: Duration,
}

impl Impairment {
    /// A perfect link: nothing dropped, nothing delayed.
    pub fn none() -> Self {
        Self {
            loss: 0.0,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: 0.0,
            reorder_extra: Duration::ZERO,
        }
    }

    /// A link that only drops, with probability `loss`.
    pub fn lossy(loss: f64) -> Self {
        Self {
            loss,
            ..Self::none()
        }
    }
}

impl Default for Impairment {
    fn default() -> Self {
        Self::none()
    }
}

/// Where the relay listens, where it forwards to, and how it impairs traffic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RelayConfig {
    /// Address clients send to, e.g. `127.0.0.1:0` for an ephemeral port.
    pub listen: SocketAddr,
    /// The real server. Replies are accepted only from exactly this address, so give the address
    /// the server sends from (not a wildcard).
    pub upstream: SocketAddr,
    /// Impairment of client → server datagrams.
    pub to_server: Impairment,
    /// Impairment of server → client datagrams.
    pub to_client: Impairment,
    /// Seed for the random decisions; `None` seeds from the OS. With a seed, each direction's
    /// decisions are a fixed sequence in the order that direction's datagrams arrive.
    pub seed: Option<u64>,
}

impl RelayConfig {
    /// An unimpaired, unseeded relay to `upstream`, listening on an ephemeral port of the
    /// loopback address of the same family.
    pub fn new(upstream: SocketAddr) -> Self {
        let loopback = match upstream {
            SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        };
        Self {
            listen: SocketAddr::new(loopback, 0),
            upstream,
            to_server: Impairment::none(),
            to_client: Impairment::none(),
            seed: None,
        }
    }
}

/// Counters since the relay started.
///
/// Every datagram the relay reads ends up, once its delay has passed, in exactly one of
/// `*_forwarded`, `*_dropped` or `send_errors`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// Client → server datagrams handed to the kernel.
    pub to_server_forwarded: u64,
    /// Client → server datagrams dropped by loss or blackhole.
    pub to_server_dropped: u64,
    /// Server → client datagrams handed to the kernel.
    pub to_client_forwarded: u64,
    /// Server → client datagrams dropped by loss or blackhole.
    pub to_client_dropped: u64,
    /// Datagrams whose `send_to` failed, or that had no upstream socket, in either direction.
    pub send_errors: u64,
    /// Distinct client addresses seen, i.e. upstream sockets opened.
    pub clients: u64,
}

/// A running relay. Dropping it aborts all of its tasks; [`Relay::stop`] also waits for them.
pub struct Relay {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("local_addr", &self.local_addr)
            .field("upstream", &self.shared.upstream)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Binds the listening socket and starts forwarding.
    ///
    /// Fails only if the listening socket cannot be bound or, without a seed, the OS cannot
    /// provide randomness.
    pub async fn start(config: RelayConfig) -> io::Result<Relay> {
        let (rng_to_server, rng_to_client) = match config.seed {
            // Two streams from one seed, so one direction's traffic does not shift the other's
            // decisions.
            Some(seed) => (
                StdRng::seed_from_u64(seed),
                StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
            ),
            None => (os_rng()?, os_rng()?),
        };
        let listener = Arc::new(UdpSocket::bind(config.listen).await?);
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: config.upstream,
            to_server: Lane::new(config.to_server, rng_to_server),
            to_client: Lane::new(config.to_client, rng_to_client),
            blackhole: AtomicBool::new(false),
            send_errors: AtomicU64::new(0),
            clients: AtomicU64::new(0),
            seq: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let tasks = vec![
            tokio::spawn(deliver_loop(Arc::clone(&shared), rx)),
            // This task owns the per-client upstream readers (in a JoinSet), so aborting it
            // aborts them too.
            tokio::spawn(client_loop(Arc::clone(&shared), listener, tx)),
        ];
        tracing::debug!(%local_addr, upstream = %config.upstream, "netsim relay started");
        Ok(Relay {
            local_addr,
            shared,
            tasks,
        })
    }

    /// The address clients should send to instead of the server.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Replaces the client → server impairment; applies to datagrams read from now on.
    pub fn set_to_server(&self, impairment: Impairment) {
        self.shared.to_server.lock().impairment = impairment;
    }

    /// Replaces the server → client impairment; applies to datagrams read from now on.
    pub fn set_to_client(&self, impairment: Impairment) {
        self.shared.to_client.lock().impairment = impairment;
    }

    /// While on, every datagram in both directions is dropped, including ones already delayed
    /// in flight: the peer simply vanished. Turning it off resumes normal forwarding.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::Relaxed);
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RelayStats {
        let s = &self.shared;
        RelayStats {
            to_server_forwarded: s.to_server.forwarded.load(Ordering::Relaxed),
            to_server_dropped: s.to_server.dropped.load(Ordering::Relaxed),
            to_client_forwarded: s.to_client.forwarded.load(Ordering::Relaxed),
            to_client_dropped: s.to_client.dropped.load(Ordering::Relaxed),
            send_errors: s.send_errors.load(Ordering::Relaxed),
            clients: s.clients.load(Ordering::Relaxed),
        }
    }

    /// Stops forwarding and waits until every task has ended, so all sockets are closed when
    /// this returns. Datagrams still in flight are discarded.
    pub async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // Cancellation is the expected outcome; a panic in a task has nothing left to do.
            let _ = task.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Which way a datagram is going; selects the impairment and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// State shared by the relay handle and its tasks.
#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    to_server: Lane,
    to_client: Lane,
    blackhole: AtomicBool,
    send_errors: AtomicU64,
    clients: AtomicU64,
    /// Tie-breaker so datagrams due at the same instant leave in arrival order.
    seq: AtomicU64,
}

/// One direction: its impairment, its random stream and its counters.
#[derive(Debug)]
struct Lane {
    state: Mutex<LaneState>,
    forwarded: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct LaneState {
    impairment: Impairment,
    rng: StdRng,
}

impl Lane {
    fn new(impairment: Impairment, rng: StdRng) -> Self {
        Self {
            state: Mutex::new(LaneState { impairment, rng }),
            forwarded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LaneState> {
        // Nothing that holds this lock can leave the state half-updated, so a poisoned lock is
        // still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Decides a datagram's fate: `None` to drop it, otherwise how long to hold it.
    fn fate(&self) -> Option<Duration> {
        let mut guard = self.lock();
        let LaneState {
            impairment: imp,
            rng,
        } = &mut *guard;
        // Written as `p > 0 && x < p` so NaN never drops and no rand call can panic on a bad p.
        if imp.loss > 0.0 && rng.random::<f64>() < imp.loss {
            return None;
        }
        let mut hold = imp.delay;
        if !imp.jitter.is_zero() {
            let max = u64::try_from(imp.jitter.as_nanos()).unwrap_or(u64::MAX);
            hold = hold.saturating_add(Duration::from_nanos(rng.random_range(0..=max)));
        }
        if imp.reorder > 0.0 && rng.random::<f64>() < imp.reorder {
            hold = hold.saturating_add(imp.reorder_extra);
        }
        Some(hold)
    }
}

impl Shared {
    fn lane(&self, direction: Direction) -> &Lane {
        match direction {
            Direction::ToServer => &self.to_server,
            Direction::ToClient => &self.to_client,
        }
    }

    fn count_drop(&self, direction: Direction) {
        self.lane(direction).dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies the impairment to one datagram and queues it for delivery. Never blocks, so the
    /// receive loops keep draining their sockets whatever the delay.
    fn submit(
        &self,
        tx: &mpsc::UnboundedSender<Pending>,
        direction: Direction,
        from: &Arc<UdpSocket>,
        to: SocketAddr,
        payload: &[u8],
    ) {
        if self.blackhole.load(Ordering::Relaxed) {
            self.count_drop(direction);
            return;
        }
        // A hold so long that the deadline overflows would never arrive anyway: count it lost.
        let Some(at) = self
            .lane(direction)
            .fate()
            .and_then(|hold| Instant::now().checked_add(hold))
        else {
            self.count_drop(direction);
            return;
        };
        let pending = Pending {
            at,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            direction,
            from: Arc::clone(from),
            to,
            payload: payload.to_vec(),
        };
        if tx.send(pending).is_err() {
            // Only when the delivery task is gone, i.e. the relay is stopping.
            self.count_drop(direction);
        }
    }
}

/// A datagram waiting for its delivery time.
#[derive(Debug)]
struct Pending {
    at: Instant,
    seq: u64,
    direction: Direction,
    from: Arc<UdpSocket>,
    to: SocketAddr,
    payload: Vec<u8>,
}

// Ordered by (deadline, seq) reversed, so `BinaryHeap` pops the earliest datagram first.
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Pending {}

/// Reads datagrams from clients and forwards each through that client's own upstream socket.
async fn client_loop(
    shared: Arc<Shared>,
    listener: Arc<UdpSocket>,
    tx: mpsc::UnboundedSender<Pending>,
) {
    let upstream = shared.upstream;
    let mut mappings: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    // Dropped together with this future, which aborts every upstream reader.
    let mut readers = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, client) = match listener.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                // E.g. an ICMP error surfaced on some platforms; the socket stays usable. Yield
                // so a persistent error cannot starve the runtime.
                tracing::debug!(%error, "netsim: recv from clients failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let socket = match mappings.get(&client) {
            Some(socket) => Arc::clone(socket),
            None => match UdpSocket::bind(SocketAddr::new(loopback_like(upstream.ip()), 0)).await {
                Ok(socket) => {
                    let socket = Arc::new(socket);
                    if let Ok(addr) = socket.local_addr() {
                        tracing::debug!(%client, upstream_source = %addr, "netsim: new client");
                    }
                    readers.spawn(server_loop(
                        Arc::clone(&shared),
                        Arc::clone(&socket),
                        Arc::clone(&listener),
                        client,
                        tx.clone(),
                    ));
                    mappings.insert(client, Arc::clone(&socket));
                    shared.clients.fetch_add(1, Ordering::Relaxed);
                    socket
                }
                Err(error) => {
                    // Out of ports or descriptors: lose this datagram, try again on the next.
                    tracing::debug!(%client, %error, "netsim: cannot open upstream socket");
                    shared.send_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
        };
        shared.submit(&tx, Direction::ToServer, &socket, upstream, &buf[..len]);
    }
}

/// Reads the server's replies on one client's upstream socket and sends them back to that client
/// from the listening socket.
async fn server_loop(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    tx: mpsc::UnboundedSender<Pending>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                tracing::debug!(%client, %error, "netsim: recv from server failed");
                tokio::task::yield_now().await;
                continue;
            }
        };
        // Like a port-restricted NAT: only the server may reach the client through this mapping.
        if from != shared.upstream {
            continue;
        }
        shared.submit(&tx, Direction::ToClient, &listener, client, &buf[..len]);
    }
}

/// Holds queued datagrams until they are due, then sends them. One task for both directions keeps
/// delivery in deadline order without a sleeping task per datagram.
async fn deliver_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut queue: BinaryHeap<Pending> = BinaryHeap::new();
    loop {
        let next_due = queue.peek().map(|pending| pending.at);
        tokio::select! {
            received = rx.recv() => match received {
                Some(pending) => queue.push(pending),
                // Every sender is gone: the relay is shutting down.
                None => return,
            },
            () = sleep_until_or_forever(next_due) => {
                let now = Instant::now();
                while queue.peek().is_some_and(|pending| pending.at <= now) {
                    if let Some(pending) = queue.pop() {
                        deliver(&shared, pending).await;
                    }
                }
            }
        }
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn deliver(shared: &Shared, pending: Pending) {
    // Checked again here so a blackhole also swallows datagrams that were already in flight.
    if shared.blackhole.load(Ordering::Relaxed) {
        shared.count_drop(pending.direction);
        return;
    }
    match pending.from.send_to(&pending.payload, pending.to).await {
        Ok(_) => {
            shared
                .lane(pending.direction)
                .forwarded
                .fetch_add(1, Ordering::Relaxed);
        }
        Err(error) => {
            tracing::trace!(to = %pending.to, %error, "netsim: send failed");
            shared.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The loopback address of `ip`'s family if `ip` is loopback, else the unspecified address of
/// that family, so upstream sockets can always reach the server.
fn loopback_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) if v4.is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(v6) if v6.is_loopback() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

fn os_rng() -> io::Result<StdRng> {
    StdRng::try_from_os_rng().map_err(|error| io::Error::other(error.to_string()))
}
