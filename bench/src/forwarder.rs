//! The `relay-baseline` server: the least a QUIC message relay can do, as a ceiling for tern.
//!
//! It speaks just enough of tern/1 for the unmodified `tern-client` to drive it (Hello and
//! Welcome, conversation streams with acks, one push stream per conversation, an empty sync),
//! with tern's own TLS, transport settings and UDP socket, so the only differences from
//! `direct` are what the baseline exists to leave out:
//! - no auth: the token is taken as the user id, unverified;
//! - no storage: sequences are in-memory counters, and a message is acknowledged and pushed as
//!   soon as it is read. Messages to a user who is not connected are dropped (and counted).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Context as _;
use bytes::Bytes;
use tern_protocol::pb::{self, client_frame, request, response, server_frame};
use tokio::sync::mpsc;

use crate::frames::{MAX_FRAME, Reader, server_bytes};

/// Everyone connected.
#[derive(Debug, Default)]
struct Hub {
    users: Mutex<HashMap<String, Arc<Peer>>>,
    conversations: Mutex<HashMap<String, u64>>,
    dropped: AtomicU64,
}

/// One connected user (one device).
#[derive(Debug)]
struct Peer {
    conn: quinn::Connection,
    inbox: AtomicU64,
    /// Per conversation, the queue of the task writing its push stream.
    pushes: Mutex<HashMap<String, mpsc::UnboundedSender<Bytes>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Binds a forwarder endpoint on `listen` with tern's server TLS and transport configuration
/// (development certificates from `certs_dir`). Must run inside a tokio runtime.
pub fn bind(listen: SocketAddr, certs_dir: &Path) -> anyhow::Result<quinn::Endpoint> {
    let config = tern_server::Config {
        listen,
        certs_dir: certs_dir.to_owned(),
        ..tern_server::Config::default()
    };
    let (certs, key) = tern_server::endpoint::load_certificates(&config)?;
    let server = tern_server::endpoint::server_config(&config, certs, key)?;
    let socket = tern_server::endpoint::bind_socket(listen, config.udp_buffer_bytes)?;
    let runtime = quinn::default_runtime().context("no async runtime")?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        runtime,
    )?)
}

/// Serves `endpoint` until `shutdown` completes.
pub async fn run(endpoint: quinn::Endpoint, shutdown: impl std::future::Future<Output = ()>) {
    let hub = Arc::new(Hub::default());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => {
                    tokio::spawn(serve(hub.clone(), incoming));
                }
                None => break,
            },
        }
    }
    endpoint.close(0u32.into(), b"bye");
}

async fn serve(hub: Arc<Hub>, incoming: quinn::Incoming) {
    let Ok(conn) = incoming.await else { return };
    let Ok((mut control, recv)) = conn.accept_bi().await else {
        return;
    };
    let mut reader = Reader::new(recv);
    let Some(client_frame::Body::Hello(hello)) = reader.client().await else {
        return;
    };
    let user = hello.token;
    let peer = Arc::new(Peer {
        conn: conn.clone(),
        inbox: AtomicU64::new(0),
        pushes: Mutex::default(),
    });
    lock(&hub.users).insert(user.clone(), peer.clone());
    let welcome = server_frame::Body::Welcome(pb::Welcome {
        user_id: user.clone(),
        device_id: "bench".into(),
        server_time_ms: tern_server::auth::unix_now_ms(),
        session_id: "1".into(),
        limits: Some(pb::ServerLimits {
            max_frame_bytes: MAX_FRAME as u32,
            max_message_bytes: 64 * 1024,
            max_group_members: 0,
            max_sync_page: tern_server::MAX_SYNC_PAGE,
        }),
        ..Default::default()
    });
    if write(&mut control, welcome).await.is_err() {
        return;
    }
    let acceptor = {
        let (hub, peer, user) = (hub.clone(), peer.clone(), user.clone());
        tokio::spawn(async move {
            while let Ok((send, recv)) = peer.conn.accept_bi().await {
                tokio::spawn(serve_stream(
                    hub.clone(),
                    peer.clone(),
                    user.clone(),
                    send,
                    Reader::new(recv),
                ));
            }
        })
    };
    // The control stream: answer pings, ignore acknowledgements.
    while let Some(body) = reader.client().await {
        if let client_frame::Body::Ping(ping) = body {
            let pong = server_frame::Body::Pong(pb::Pong {
                nonce: ping.nonce,
                sent_at_us: ping.sent_at_us,
                server_time_ms: tern_server::auth::unix_now_ms(),
            });
            if write(&mut control, pong).await.is_err() {
                break;
            }
        }
    }
    let _ = conn.closed().await;
    acceptor.abort();
    let mut users = lock(&hub.users);
    if users.get(&user).is_some_and(|p| Arc::ptr_eq(p, &peer)) {
        users.remove(&user);
    }
}

async fn serve_stream(
    hub: Arc<Hub>,
    peer: Arc<Peer>,
    user: String,
    mut send: quinn::SendStream,
    mut reader: Reader,
) {
    match reader.client().await {
        Some(client_frame::Body::OpenConversation(open)) => {
            while let Some(client_frame::Body::Send(msg)) = reader.client().await {
                let target = if open.direct_peer.is_empty() {
                    &msg.direct_peer
                } else {
                    &open.direct_peer
                };
                let ack = forward(&hub, &peer, &user, target, msg.clone());
                if write(&mut send, server_frame::Body::SendAck(ack))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = send.finish();
        }
        Some(client_frame::Body::Request(pb::Request {
            body: Some(request::Body::Sync(_)),
        })) => {
            // Nothing is stored, so there is nothing to catch up on.
            let page = pb::SyncPage {
                entries: Vec::new(),
                complete: true,
                inbox_head: peer.inbox.load(Ordering::Relaxed),
            };
            let body = server_frame::Body::Response(pb::Response {
                body: Some(response::Body::SyncPage(page)),
            });
            let _ = write(&mut send, body).await;
            let _ = send.finish();
        }
        _ => {
            let _ = send.finish();
        }
    }
}

/// Numbers the message, pushes it to the recipient if connected, and returns the sender's ack.
fn forward(hub: &Hub, sender: &Peer, user: &str, to: &str, msg: pb::SendMessage) -> pb::SendAck {
    let conversation_id = tern_protocol::ids::direct_conversation_id(user, to);
    let seq = {
        let mut conversations = lock(&hub.conversations);
        let seq = conversations.entry(conversation_id.clone()).or_insert(0);
        *seq += 1;
        *seq
    };
    let sent_at_ms = tern_server::auth::unix_now_ms();
    let message = pb::Message {
        message_id: tern_protocol::ids::message_id(&conversation_id, seq),
        conversation_id: conversation_id.clone(),
        seq,
        sender: user.to_owned(),
        sender_device: "bench".into(),
        client_message_id: msg.client_message_id.clone(),
        sent_at_ms,
        text: msg.text,
        payload: msg.payload,
    };
    let recipient = lock(&hub.users).get(to).cloned();
    match recipient {
        Some(recipient) => push(&recipient, &conversation_id, message),
        None => {
            hub.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    pb::SendAck {
        client_message_id: msg.client_message_id,
        message_id: tern_protocol::ids::message_id(&conversation_id, seq),
        conversation_id,
        seq,
        sent_at_ms,
        duplicate: false,
        inbox_seq: sender.inbox.fetch_add(1, Ordering::Relaxed) + 1,
    }
}

fn push(recipient: &Arc<Peer>, conversation_id: &str, message: pb::Message) {
    let entry = pb::InboxEntry {
        inbox_seq: recipient.inbox.fetch_add(1, Ordering::Relaxed) + 1,
        body: Some(pb::inbox_entry::Body::Message(message)),
    };
    let Ok(bytes) = server_bytes(server_frame::Body::Entry(entry)) else {
        return;
    };
    let mut pushes = lock(&recipient.pushes);
    let queue = pushes.entry(conversation_id.to_owned()).or_insert_with(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(push_stream(
            recipient.conn.clone(),
            conversation_id.to_owned(),
            rx,
        ));
        tx
    });
    let _ = queue.send(bytes);
}

/// Writes one conversation's entries to its own push stream, as tern does.
async fn push_stream(
    conn: quinn::Connection,
    conversation_id: String,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
) {
    let Ok(mut send) = conn.open_uni().await else {
        return;
    };
    let header = server_frame::Body::PushHeader(pb::PushStreamHeader { conversation_id });
    if write(&mut send, header).await.is_err() {
        return;
    }
    while let Some(bytes) = rx.recv().await {
        if send.write_chunk(bytes).await.is_err() {
            return;
        }
    }
}

async fn write(send: &mut quinn::SendStream, body: server_frame::Body) -> anyhow::Result<()> {
    send.write_chunk(server_bytes(body)?).await?;
    Ok(())
}
