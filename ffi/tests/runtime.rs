//! The bindings from Rust, against an in-process server: listener callbacks never block the
//! network, and dropped clients close their server sessions and free everything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_ffi::{
    ChatMessage, ConnectionState, ConversationEvent, Presence, Receipt, TernClient, TernConfig,
    TernError, TernErrorCode, TernListener, Typing, live_clients,
};
use tern_server::{Config, ServerState};

struct Server {
    port: u16,
    ca_pem: String,
    state: Arc<ServerState>,
    endpoint: quinn::Endpoint,
    _dir: tempfile::TempDir,
}

async fn start_server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        certs_dir: dir.path().join("certs"),
        ..Config::default()
    };
    let (endpoint, state) = tern_server::start(config).unwrap();
    let port = endpoint.local_addr().unwrap().port();
    let ca_pem = std::fs::read_to_string(dir.path().join("certs/ca.pem")).unwrap();
    tokio::spawn(tern_server::run(
        endpoint.clone(),
        state.clone(),
        std::future::pending(),
    ));
    Server {
        port,
        ca_pem,
        state,
        endpoint,
        _dir: dir,
    }
}

impl Server {
    fn config(&self, user: &str, device: &str) -> TernConfig {
        let token = self
            .state
            .auth
            .mint(user, device, Duration::from_secs(3600))
            .unwrap();
        TernConfig {
            server: format!("127.0.0.1:{}", self.port),
            token,
            ca_pem: Some(self.ca_pem.clone()),
            server_name: Some("localhost".into()),
            resume_from: None,
            background: false,
        }
    }
}

/// Forwards messages to a channel; can be made to block inside `on_message`.
struct Listener {
    messages: Mutex<Sender<String>>,
    /// While set, `on_message` waits for a unit on this channel before returning.
    gate: Mutex<Option<Receiver<()>>>,
}

impl Listener {
    fn new() -> (Arc<Self>, Receiver<String>) {
        let (tx, rx) = channel();
        let listener = Arc::new(Self {
            messages: Mutex::new(tx),
            gate: Mutex::new(None),
        });
        (listener, rx)
    }
}

impl TernListener for Listener {
    fn on_message(&self, message: ChatMessage, _inbox_seq: u64) {
        let _ = self.messages.lock().unwrap().send(message.text);
        if let Some(gate) = self.gate.lock().unwrap().as_ref() {
            let _ = gate.recv();
        }
    }
    fn on_receipt(&self, _: Receipt, _: u64) {}
    fn on_conversation_event(&self, _: ConversationEvent, _: u64) {}
    fn on_presence(&self, _: Presence) {}
    fn on_typing(&self, _: Typing) {}
    fn on_connection_state(&self, _: ConnectionState) {}
    fn on_sync_too_long(&self, _: u64) {}
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_listener_does_not_block_the_client() {
    let server = start_server().await;
    let (alice_listener, alice_messages) = Listener::new();
    let (release_alice, alice_gate) = channel();
    *alice_listener.gate.lock().unwrap() = Some(alice_gate);
    let alice = TernClient::connect(server.config("alice", "phone"), alice_listener)
        .await
        .unwrap();
    let (bob_listener, bob_messages) = Listener::new();
    let (release_bob, bob_gate) = channel();
    *bob_listener.gate.lock().unwrap() = Some(bob_gate);
    let bob = TernClient::connect(server.config("bob", "phone"), bob_listener)
        .await
        .unwrap();

    // Both listeners end up stuck inside on_message: as many blocked callbacks as the
    // runtime has workers, so callbacks run on a worker would stall everything.
    alice
        .send_to_user("bob".into(), "one".into(), None)
        .await
        .unwrap();
    bob.send_to_user("alice".into(), "two".into(), None)
        .await
        .unwrap();
    let (alice_messages, bob_messages) = tokio::task::spawn_blocking(move || {
        let wait = Duration::from_secs(10);
        assert_eq!(alice_messages.recv_timeout(wait).unwrap(), "two");
        assert_eq!(bob_messages.recv_timeout(wait).unwrap(), "one");
        (alice_messages, bob_messages)
    })
    .await
    .unwrap();
    // The clients still work: they answer pings, send, and receive (queued) pushes.
    bob.ping().await.unwrap();
    alice.ping().await.unwrap();
    for i in 0..5 {
        alice
            .send_to_user("bob".into(), format!("queued {i}"), None)
            .await
            .unwrap();
    }
    assert!(
        bob_messages.try_recv().is_err(),
        "callbacks run one at a time"
    );
    assert!(alice_messages.try_recv().is_err());
    release_alice.send(()).unwrap();
    for _ in 0..6 {
        release_bob.send(()).unwrap();
    }
    let rest = tokio::task::spawn_blocking(move || {
        (0..5)
            .map(|_| bob_messages.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let expected: Vec<String> = (0..5).map(|i| format!("queued {i}")).collect();
    assert_eq!(rest, expected, "in order, none lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_clients_close_their_server_sessions() {
    let server = start_server().await;
    for i in 0..30 {
        let (listener, _) = Listener::new();
        let client = TernClient::connect(server.config("churn", &format!("d{i}")), listener)
            .await
            .unwrap();
        client
            .send_to_user("bob".into(), format!("m{i}"), None)
            .await
            .unwrap();
        assert!(server.state.registry.is_online("churn"));
        drop(client);
    }
    wait_until("every session and connection to end", || {
        let live = live_clients();
        server.state.registry.is_empty()
            && server.endpoint.open_connections() == 0
            && live.objects == 0
            && live.sessions == 0
    })
    .await;

    // A bad token is refused with a typed error, and leaves nothing behind either.
    let mut config = server.config("mallory", "phone");
    config.token = "not.a.jwt".into();
    let (listener, _) = Listener::new();
    match TernClient::connect(config, listener).await {
        Err(TernError::Server { code, .. }) => assert_eq!(code, TernErrorCode::TokenInvalid),
        other => panic!("expected TOKEN_INVALID, got {other:?}"),
    }
    wait_until("the refused connection to end", || {
        server.endpoint.open_connections() == 0 && live_clients().sessions == 0
    })
    .await;
}
