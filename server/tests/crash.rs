//! Crash safety: the real `tern-server` binary is killed with SIGKILL right after acks arrive,
//! then restarted on the same data. Every acknowledged message is delivered exactly once and
//! in order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_client::{Client, ClientConfig, ConnectionState, Event, SendTarget, Trust};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server on `dir`, with `dir/tern.toml` as its configuration if there is one.
fn start(dir: &Path, port: u16) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tern-server"));
    let config = dir.join("tern.toml");
    if config.exists() {
        command.arg("--config").arg(config);
    }
    Server(
        command
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--data-dir", &dir.join("data").to_string_lossy()])
            .args(["--certs-dir", &dir.join("certs").to_string_lossy()])
            // Logs (RUST_LOG) go next to the data, one file per start.
            .stderr(log_file(dir))
            .spawn()
            .unwrap(),
    )
}

/// A UDP port nothing listens on now, for a server that is started and restarted on it.
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn log_file(dir: &Path) -> Stdio {
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    std::fs::File::create(dir.join(format!("server-{n}.log"))).map_or(Stdio::null(), Stdio::from)
}

fn token(dir: &Path, user: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tern-server"))
        .args([
            "token",
            "--user",
            user,
            "--data-dir",
            &dir.join("data").to_string_lossy(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn connect(dir: &Path, port: u16, user: &str) -> (Client, tern_client::Events) {
    connect_with(dir, port, user, false).await
}

async fn connect_with(
    dir: &Path,
    port: u16,
    user: &str,
    reconnect: bool,
) -> (Client, tern_client::Events) {
    let mut config = ClientConfig::new(
        format!("127.0.0.1:{port}"),
        token(dir, user),
        Trust::CaFile(dir.join("certs/ca.pem")),
    );
    config.server_name = Some("localhost".into());
    // In the crash test senders must stop when the server dies, not wait for it to return.
    config.auto_reconnect = reconnect;
    config.transport.backoff_base = Duration::from_millis(100);
    config.transport.backoff_max = Duration::from_secs(1);
    // The server may still be starting: retry for a while.
    for _ in 0..100 {
        if let Ok(connected) = Client::connect(config.clone()).await {
            return connected;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("could not connect to the server on port {port}");
}

#[tokio::test]
async fn acknowledged_messages_survive_sigkill() {
    survive_sigkill(None).await;
}

/// The same with room for one user and one conversation in the writer's caches, so they are
/// dropped and reloaded from disk around nearly every send up to the kill.
#[tokio::test]
async fn acknowledged_messages_survive_sigkill_with_a_writer_cache_of_one() {
    survive_sigkill(Some("store_cache_entries = 1\n")).await;
}

async fn survive_sigkill(config: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    if let Some(config) = config {
        std::fs::write(dir.path().join("tern.toml"), config).unwrap();
    }
    let port = free_port();
    let mut server = start(dir.path(), port);
    let (alice, _alice_events) = connect(dir.path(), port, "alice").await;
    let alice = Arc::new(alice);

    // Four senders pipeline messages into two conversations; each records what was acked.
    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let mut senders = Vec::new();
    for worker in 0..4 {
        let alice = alice.clone();
        let acked = acked.clone();
        let peer = if worker % 2 == 0 { "bob" } else { "carol" };
        senders.push(tokio::spawn(async move {
            for i in 0.. {
                match alice
                    .send(
                        SendTarget::User(peer.into()),
                        &format!("w{worker} m{i}"),
                        None,
                    )
                    .await
                {
                    Ok(sent) => acked.lock().unwrap().push((sent.conversation_id, sent.seq)),
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill the moment enough acks have arrived, with more sends in flight.
    while acked.lock().unwrap().len() < 300 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    server.0.kill().unwrap(); // SIGKILL
    let acked_at_kill = acked.lock().unwrap().len();
    server.0.wait().unwrap();
    // The client would only notice the dead server at its idle timeout; stop it now.
    alice
        .connection()
        .unwrap()
        .close(0u32.into(), b"server killed");
    for sender in senders {
        let _ = sender.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= acked_at_kill);

    let _server = start(dir.path(), port);
    for peer in ["bob", "carol"] {
        let acked_here: Vec<u64> = acked
            .iter()
            .filter(|(conv, _)| *conv == tern_protocol::ids::direct_conversation_id("alice", peer))
            .map(|(_, seq)| *seq)
            .collect();
        let highest = *acked_here.iter().max().unwrap();
        let (_client, mut events) = connect(dir.path(), port, peer).await;
        // Everything acked arrives, in order, once; messages stored but not yet acked when the
        // server died may follow, also in order.
        let mut seqs = Vec::new();
        while seqs.last().is_none_or(|last| *last < highest) {
            let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
                .await
                .unwrap()
                .unwrap();
            if let Event::Message { message, .. } = event {
                seqs.push(message.seq);
            }
        }
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(
            seqs, expected,
            "{peer}: every message once, in order, no gap"
        );
        for seq in acked_here {
            assert!(
                seqs.contains(&seq),
                "{peer}: acknowledged message {seq} was lost"
            );
        }
    }
}

#[tokio::test]
async fn clients_reconnect_by_themselves_after_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = start(dir.path(), port);
    let (alice, mut alice_events) = connect_with(dir.path(), port, "alice", true).await;
    let (bob, mut bob_events) = connect_with(dir.path(), port, "bob", true).await;
    let alice = Arc::new(alice);
    for i in 0..50 {
        alice
            .send(SendTarget::User("bob".into()), &format!("{i}"), None)
            .await
            .unwrap();
    }

    // Killed mid-conversation; Alice keeps sending while it is down.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let sender = {
        let alice = alice.clone();
        tokio::spawn(async move {
            for i in 50..100 {
                alice
                    .send(SendTarget::User("bob".into()), &format!("{i}"), None)
                    .await
                    .unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _server = start(dir.path(), port);
    sender.await.unwrap();

    // Bob gets all 100, in order, once: the first 50 live, the rest after reconnecting.
    let mut texts = Vec::new();
    while texts.len() < 100 {
        let event = tokio::time::timeout(Duration::from_secs(30), bob_events.recv())
            .await
            .unwrap()
            .unwrap();
        if let Event::Message { message, .. } = event {
            texts.push((message.seq, message.text));
        }
    }
    let expected: Vec<(u64, String)> = (0..100).map(|i| (i + 1, i.to_string())).collect();
    assert_eq!(texts, expected);
    let extra = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Some(Event::Message { message, .. }) = bob_events.recv().await {
                return message;
            }
        }
    })
    .await;
    assert!(extra.is_err(), "a message arrived twice: {extra:?}");

    // Nobody did anything: the clients reconnected by themselves and said so.
    assert!(alice.stats().reconnects >= 1 && bob.stats().reconnects >= 1);
    let mut states = Vec::new();
    while let Ok(event) = alice_events.try_recv() {
        if let Event::Connection(state) = event {
            states.push(state);
        }
    }
    if std::env::var_os("TERN_SHOW_SERVER_LOGS").is_some() {
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "log") {
                eprintln!(
                    "== {}\n{}",
                    path.display(),
                    std::fs::read_to_string(&path).unwrap()
                );
            }
        }
    }
    assert!(
        states
            .iter()
            .any(|s| matches!(s, ConnectionState::Reconnecting { .. }))
    );
    assert!(
        matches!(states.last(), Some(ConnectionState::Connected)),
        "{states:?}"
    );
}

/// A store restored from a backup (or one that lost its unsynced tail) has fewer inbox entries
/// than a connected device saw, and numbers its new entries from its own head. The device
/// must be told to rewind, not left to take the new entries for ones it had already seen.
#[tokio::test]
async fn a_device_ahead_of_a_restored_store_rewinds_and_gets_what_follows() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("data");
    let backup = dir.path().join("backup");
    let mut server = start(dir.path(), port);
    let (alice, mut alice_events) = connect_with(dir.path(), port, "alice", true).await;
    let (bob, mut bob_events) = connect_with(dir.path(), port, "bob", true).await;
    // The clients would notice a dead server at their next packet's loss or keep-alive
    // (up to 25 s idle); drop their connections when it dies, and they reconnect by themselves.
    let server_died = || {
        for client in [&alice, &bob] {
            if let Some(conn) = client.connection() {
                conn.close(0u32.into(), b"server killed");
            }
        }
    };
    let to_bob = |text: &'static str| {
        let alice = &alice;
        async move {
            alice
                .send(SendTarget::User("bob".into()), text, None)
                .await
                .unwrap()
        }
    };
    to_bob("kept").await;
    assert_eq!(next_message(&mut bob_events).await, (1, "kept".to_owned()));

    // The backup: Bob's inbox holds one entry.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    server_died();
    copy_dir(&data, &backup);
    server = start(dir.path(), port);
    reconnected(&mut alice_events).await;
    for text in ["lost 1", "lost 2", "lost 3"] {
        to_bob(text).await;
    }
    for _ in 0..3 {
        next_message(&mut bob_events).await;
    }

    // Restored: Bob's device has seen inbox entries 2 to 4, which the store no longer has.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    server_died();
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::rename(&backup, &data).unwrap();
    let _server = start(dir.path(), port);
    reconnected(&mut alice_events).await;
    // Bob's device reconnects by itself and is told to rewind to the store's head.
    let rewound_to = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match bob_events.recv().await.unwrap() {
                Event::SyncTooLong { inbox_head, .. } => return inbox_head,
                Event::Message { message, .. } => panic!("unexpected message {message:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the device was not told that the store went back");
    assert_eq!(rewound_to, 1);
    let sent = to_bob("after the restore").await;
    assert_eq!(sent.seq, 2, "the store numbers on from what it has");
    // Inbox entry 2 again, which the device had seen before the restore as "lost 1".
    assert_eq!(
        next_message(&mut bob_events).await,
        (2, "after the restore".to_owned())
    );
}

/// Waits for the client to have lost its connection and made a new one.
async fn reconnected(events: &mut tern_client::Events) {
    let mut lost = false;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.recv().await.unwrap() {
                Event::Connection(ConnectionState::Reconnecting { .. }) => lost = true,
                Event::Connection(ConnectionState::Connected) if lost => return,
                _ => {}
            }
        }
    })
    .await
    .expect("the client did not reconnect");
}

async fn next_message(events: &mut tern_client::Events) -> (u64, String) {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .unwrap()
            .unwrap();
        if let Event::Message { message, .. } = event {
            return (message.seq, message.text);
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
