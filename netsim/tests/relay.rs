//! End-to-end tests of the relay against a UDP echo server, all on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_netsim::{Impairment, Relay, RelayConfig};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

/// How long without a datagram before a receiver decides nothing more is coming.
const QUIET: Duration = Duration::from_millis(300);

/// A UDP echo server that records how many datagrams it got and from whom.
struct Echo {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_server() -> Echo {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let task = tokio::spawn({
        let received = Arc::clone(&received);
        let peers = Arc::clone(&peers);
        async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let (len, peer) = socket.recv_from(&mut buf).await.unwrap();
                received.fetch_add(1, Ordering::Relaxed);
                {
                    let mut peers = peers.lock().unwrap();
                    if !peers.contains(&peer) {
                        peers.push(peer);
                    }
                }
                let _ = socket.send_to(&buf[..len], peer).await;
            }
        }
    });
    Echo {
        addr,
        received,
        peers,
        task,
    }
}

async fn relay_to(echo: &Echo, to_server: Impairment, to_client: Impairment) -> Relay {
    let mut config = RelayConfig::new(echo.addr);
    config.to_server = to_server;
    config.to_client = to_client;
    config.seed = Some(0x7e27);
    Relay::start(config).await.unwrap()
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Sends `n` numbered datagrams to `to` in small paced bursts (so no socket buffer overflows)
/// while collecting echoes; returns the numbers that came back, in arrival order.
async fn round_trips(socket: &UdpSocket, to: SocketAddr, n: u32) -> Vec<u32> {
    let send = async {
        for i in 0..n {
            socket.send_to(&i.to_be_bytes(), to).await.unwrap();
            if i % 20 == 19 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    let receive = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while got.len() < n as usize {
            match timeout(QUIET, socket.recv_from(&mut buf)).await {
                Ok(Ok((4, _))) => got.push(u32::from_be_bytes(buf[..4].try_into().unwrap())),
                Ok(other) => panic!("unexpected receive: {other:?}"),
                Err(_) => break,
            }
        }
        got
    };
    let ((), got) = tokio::join!(send, receive);
    got
}

/// Waits up to `QUIET` for one datagram.
async fn receive_one(socket: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = [0u8; 64];
    match timeout(QUIET, socket.recv_from(&mut buf)).await {
        Ok(Ok((len, _))) => Some(buf[..len].to_vec()),
        Ok(Err(error)) => panic!("receive failed: {error}"),
        Err(_) => None,
    }
}

#[tokio::test]
async fn unimpaired_relay_delivers_every_datagram() {
    let echo = echo_server().await;
    let relay = relay_to(&echo, Impairment::none(), Impairment::none()).await;
    let socket = client().await;

    let mut got = round_trips(&socket, relay.local_addr(), 1_000).await;
    got.sort_unstable();
    assert_eq!(got, (0..1_000).collect::<Vec<_>>());

    let stats = relay.stats();
    assert_eq!(stats.to_server_forwarded, 1_000);
    assert_eq!(stats.to_client_forwarded, 1_000);
    assert_eq!(
        stats.to_server_dropped + stats.to_client_dropped + stats.send_errors,
        0
    );
    assert_eq!(stats.clients, 1);
    relay.stop().await;
}

#[tokio::test]
async fn seeded_loss_drops_a_plausible_fraction_and_counts_it() {
    let echo = echo_server().await;
    let relay = relay_to(&echo, Impairment::lossy(0.2), Impairment::lossy(0.2)).await;
    let socket = client().await;

    let got = round_trips(&socket, relay.local_addr(), 1_000).await;
    // Expected 0.8 * 0.8 = 0.64 of round trips; the seed makes this deterministic.
    let fraction = got.len() as f64 / 1_000.0;
    assert!(
        (0.5..0.75).contains(&fraction),
        "delivered fraction {fraction}"
    );

    // Every datagram is accounted for exactly once in each direction.
    let stats = relay.stats();
    assert!(
        stats.to_server_dropped > 0 && stats.to_client_dropped > 0,
        "{stats:?}"
    );
    assert_eq!(
        stats.to_server_forwarded + stats.to_server_dropped,
        1_000,
        "{stats:?}"
    );
    assert_eq!(
        echo.received.load(Ordering::Relaxed),
        stats.to_server_forwarded
    );
    assert_eq!(
        stats.to_client_forwarded + stats.to_client_dropped,
        stats.to_server_forwarded,
        "{stats:?}"
    );
    assert_eq!(stats.to_client_forwarded, got.len() as u64);
    assert_eq!(stats.send_errors, 0);
}

#[tokio::test]
async fn delay_applies_each_way_and_can_change_at_runtime() {
    let echo = echo_server().await;
    let relay = relay_to(&echo, Impairment::none(), Impairment::none()).await;
    let socket = client().await;

    socket.send_to(b"warm", relay.local_addr()).await.unwrap();
    assert_eq!(receive_one(&socket).await.as_deref(), Some(&b"warm"[..]));

    let delayed = Impairment {
        delay: Duration::from_millis(50),
        ..Impairment::none()
    };
    relay.set_to_server(delayed);
    relay.set_to_client(delayed);
    let started = Instant::now();
    socket.send_to(b"slow", relay.local_addr()).await.unwrap();
    let reply = timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 16];
        let (len, _) = socket.recv_from(&mut buf).await.unwrap();
        buf[..len].to_vec()
    })
    .await
    .expect("delayed reply never came");
    let rtt = started.elapsed();
    assert_eq!(reply, b"slow");
    assert!(
        rtt >= Duration::from_millis(100),
        "round trip took only {rtt:?}"
    );
}

#[tokio::test]
async fn blackhole_drops_both_ways_including_in_flight() {
    let echo = echo_server().await;
    let relay = relay_to(&echo, Impairment::none(), Impairment::none()).await;
    let socket = client().await;

    // Client → server: nothing reaches the server.
    relay.set_blackhole(true);
    for i in 0u32..50 {
        socket
            .send_to(&i.to_be_bytes(), relay.local_addr())
            .await
            .unwrap();
    }
    assert_eq!(receive_one(&socket).await, None);
    assert_eq!(echo.received.load(Ordering::Relaxed), 0);
    assert_eq!(relay.stats().to_server_dropped, 50);

    // Server → client: a reply already in flight when the blackhole starts is swallowed too.
    relay.set_blackhole(false);
    relay.set_to_client(Impairment {
        delay: Duration::from_millis(200),
        ..Impairment::none()
    });
    socket.send_to(b"late", relay.local_addr()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while echo.received.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "server never got the datagram");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    relay.set_blackhole(true);
    assert_eq!(receive_one(&socket).await, None);
    let stats = relay.stats();
    assert_eq!(
        (stats.to_client_forwarded, stats.to_client_dropped),
        (0, 1),
        "{stats:?}"
    );

    // And switching it off restores the link.
    relay.set_blackhole(false);
    relay.set_to_client(Impairment::none());
    socket.send_to(b"back", relay.local_addr()).await.unwrap();
    assert_eq!(receive_one(&socket).await.as_deref(), Some(&b"back"[..]));
}

#[tokio::test]
async fn each_client_address_gets_its_own_upstream_port() {
    let echo = echo_server().await;
    let relay = relay_to(&echo, Impairment::none(), Impairment::none()).await;
    let first = client().await;
    let second = client().await;

    for socket in [&first, &second] {
        socket.send_to(b"hi", relay.local_addr()).await.unwrap();
        assert_eq!(receive_one(socket).await.as_deref(), Some(&b"hi"[..]));
    }
    // Again from the first: it must reuse its mapping, not get a third one.
    first.send_to(b"again", relay.local_addr()).await.unwrap();
    assert_eq!(receive_one(&first).await.as_deref(), Some(&b"again"[..]));

    let peers = echo.peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 2, "server saw {peers:?}");
    assert_ne!(peers[0].port(), peers[1].port());
    for peer in &peers {
        assert!(peer.ip().is_loopback());
        assert_ne!(*peer, relay.local_addr());
        assert_ne!(*peer, first.local_addr().unwrap());
        assert_ne!(*peer, second.local_addr().unwrap());
    }
    assert_eq!(relay.stats().clients, 2);
}

#[tokio::test]
async fn reorder_lets_later_datagrams_overtake() {
    let echo = echo_server().await;
    let reordering = Impairment {
        reorder: 0.3,
        reorder_extra: Duration::from_millis(20),
        ..Impairment::none()
    };
    let relay = relay_to(&echo, reordering, Impairment::none()).await;
    let socket = client().await;

    let got = round_trips(&socket, relay.local_addr(), 100).await;
    assert_eq!(got.len(), 100, "reordering must not lose anything");
    let inversions = got.windows(2).filter(|pair| pair[0] > pair[1]).count();
    assert!(inversions > 0, "arrived in order: {got:?}");
}

#[tokio::test]
async fn stopped_relay_forwards_nothing() {
    let echo = echo_server().await;
    let relay = relay_to(&echo, Impairment::none(), Impairment::none()).await;
    let relay_addr = relay.local_addr();
    let socket = client().await;

    socket.send_to(b"up", relay_addr).await.unwrap();
    assert_eq!(receive_one(&socket).await.as_deref(), Some(&b"up"[..]));

    timeout(Duration::from_secs(1), relay.stop())
        .await
        .expect("stop hung");
    // The listening socket is closed; on Linux the send may fail with "connection refused" from
    // an earlier ICMP, which is fine either way.
    let _ = socket.send_to(b"gone", relay_addr).await;
    assert_eq!(receive_one(&socket).await, None);
    assert_eq!(echo.received.load(Ordering::Relaxed), 1);
}
