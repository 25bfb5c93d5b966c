//! The `relay-baseline` server: the least a QUIC message relay can do, as a ceiling for tern.
//!
//! It speaks just enough of tern/1 for the unmodified `tern-client` to drive it (Hello and
//! Welcome, conversation streams with acks, one push stream per conversation, an empty sync),
//! with tern's own TLS, transport settings and UDP socket, so the only differences from
//! `direct` are what the baseline exists to leave out:
//! - no auth: the token is taken as the user id, unverified;
//! - no storage: sequences are in-memory counters, and a message is acknowledged and pushed as
//!   soon as it is read. Groups live in memory. A message to a user who is not connected is
//!   kept in memory until the user syncs (so `offline-sync` has a baseline); nothing is kept
//!   for connected users, so a sync returns only what arrived while offline.

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

/// Everyone connected, every inbox and every group.
#[derive(Debug, Default)]
struct Hub {
    users: Mutex<HashMap<String, Arc<Peer>>>,
    inboxes: Mutex<HashMap<String, Arc<Inbox>>>,
    conversations: Mutex<HashMap<String, u64>>,
    /// Group id → members (the creator included).
    groups: Mutex<HashMap<String, Arc<[String]>>>,
    groups_created: AtomicU64,
}

impl Hub {
    fn inbox(&self, user: &str) -> Arc<Inbox> {
        lock(&self.inboxes)
            .entry(user.to_owned())
            .or_default()
            .clone()
    }
}

/// A user's inbox: its sequence, and what arrived while the user was offline.
#[derive(Debug, Default)]
struct Inbox {
    head: AtomicU64,
    offline: Mutex<Vec<pb::InboxEntry>>,
}

/// One connected user (one device).
#[derive(Debug)]
struct Peer {
    conn: quinn::Connection,
    inbox: Arc<Inbox>,
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
        inbox: hub.inbox(&user),
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
                let target = match (open.direct_peer.is_empty(), open.conversation_id.is_empty()) {
                    (false, _) => Target::Direct(&open.direct_peer),
                    (true, false) => Target::Group(&open.conversation_id),
                    // Multiplexed (the `hol` comparison): each send names its target.
                    (true, true) if !msg.direct_peer.is_empty() => Target::Direct(&msg.direct_peer),
                    (true, true) => Target::Group(&msg.conversation_id),
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
            body: Some(request::Body::Sync(sync)),
        })) => {
            let _ = answer_sync(&peer.inbox, &sync, &mut send).await;
            let _ = send.finish();
        }
        Some(client_frame::Body::Request(pb::Request {
            body: Some(request::Body::CreateGroup(create)),
        })) => {
            let conversation = create_group(&hub, &user, create);
            let body = server_frame::Body::Response(pb::Response {
                body: Some(response::Body::Conversation(conversation)),
            });
            let _ = write(&mut send, body).await;
            let _ = send.finish();
        }
        _ => {
            let _ = send.finish();
        }
    }
}

/// Sends what arrived while the user was offline after `since`, in pages.
async fn answer_sync(
    inbox: &Inbox,
    sync: &pb::SyncRequest,
    send: &mut quinn::SendStream,
) -> anyhow::Result<()> {
    let page_size = match sync.page_size {
        0 => tern_server::MAX_SYNC_PAGE,
        n => n.min(tern_server::MAX_SYNC_PAGE),
    } as usize;
    let entries: Vec<pb::InboxEntry> = lock(&inbox.offline)
        .iter()
        .filter(|e| e.inbox_seq > sync.since_inbox_seq)
        .cloned()
        .collect();
    let inbox_head = inbox.head.load(Ordering::Relaxed);
    let mut pages = entries.chunks(page_size.max(1)).peekable();
    if pages.peek().is_none() {
        let page = pb::SyncPage {
            entries: Vec::new(),
            complete: true,
            inbox_head,
        };
        return write(send, sync_page(page)).await;
    }
    while let Some(chunk) = pages.next() {
        let page = pb::SyncPage {
            entries: chunk.to_vec(),
            complete: pages.peek().is_none(),
            inbox_head,
        };
        write(send, sync_page(page)).await?;
    }
    Ok(())
}

fn sync_page(page: pb::SyncPage) -> server_frame::Body {
    server_frame::Body::Response(pb::Response {
        body: Some(response::Body::SyncPage(page)),
    })
}

fn create_group(hub: &Hub, creator: &str, create: pb::CreateGroup) -> pb::Conversation {
    let n = hub.groups_created.fetch_add(1, Ordering::Relaxed) + 1;
    let conversation_id = format!("g{n}");
    let mut members = vec![creator.to_owned()];
    for member in create.members {
        if !members.contains(&member) {
            members.push(member);
        }
    }
    let listed = members
        .iter()
        .map(|user_id| pb::Member {
            user_id: user_id.clone(),
            role: pb::MemberRole::Member as i32,
        })
        .collect();
    let conversation = pb::Conversation {
        conversation_id: conversation_id.clone(),
        kind: pb::ConversationKind::Group as i32,
        name: create.name,
        members: listed,
        created_at_ms: tern_server::auth::unix_now_ms(),
        member_count: members.len() as u32,
        ..Default::default()
    };
    lock(&hub.groups).insert(conversation_id, members.into());
    conversation
}

/// Where a send goes.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    Direct(&'a str),
    Group(&'a str),
}

/// Numbers the message, pushes it to each recipient (or keeps it for one who is offline), and
/// returns the sender's ack.
fn forward(
    hub: &Hub,
    sender: &Peer,
    user: &str,
    target: Target<'_>,
    msg: pb::SendMessage,
) -> pb::SendAck {
    let (conversation_id, members) = match target {
        Target::Direct(to) => (tern_protocol::ids::direct_conversation_id(user, to), None),
        Target::Group(id) => (id.to_owned(), lock(&hub.groups).get(id).cloned()),
    };
    let seq = {
        let mut conversations = lock(&hub.conversations);
        let seq = conversations.entry(conversation_id.clone()).or_insert(0);
        *seq += 1;
        *seq
    };
    let sent_at_ms = tern_server::auth::unix_now_ms();
    let ack = pb::SendAck {
        client_message_id: msg.client_message_id.clone(),
        message_id: tern_protocol::ids::message_id(&conversation_id, seq),
        conversation_id: conversation_id.clone(),
        seq,
        sent_at_ms,
        duplicate: false,
        inbox_seq: sender.inbox.head.fetch_add(1, Ordering::Relaxed) + 1,
    };
    let message = pb::Message {
        message_id: ack.message_id.clone(),
        conversation_id,
        seq,
        sender: user.to_owned(),
        sender_device: "bench".into(),
        client_message_id: msg.client_message_id,
        sent_at_ms,
        text: msg.text,
        payload: msg.payload,
    };
    match (target, members) {
        (Target::Direct(to), _) => deliver(hub, to, message),
        (Target::Group(_), Some(members)) => {
            for member in members.iter().filter(|m| *m != user) {
                deliver(hub, member, message.clone());
            }
        }
        // An unknown group: acknowledged and dropped, as nothing here checks membership.
        (Target::Group(_), None) => {}
    }
    ack
}

fn deliver(hub: &Hub, to: &str, message: pb::Message) {
    let recipient = lock(&hub.users).get(to).cloned();
    match recipient {
        Some(recipient) => push(&recipient, message),
        None => {
            let inbox = hub.inbox(to);
            let entry = pb::InboxEntry {
                inbox_seq: inbox.head.fetch_add(1, Ordering::Relaxed) + 1,
                body: Some(pb::inbox_entry::Body::Message(message)),
            };
            lock(&inbox.offline).push(entry);
        }
    }
}

fn push(recipient: &Arc<Peer>, message: pb::Message) {
    let conversation_id = message.conversation_id.clone();
    let entry = pb::InboxEntry {
        inbox_seq: recipient.inbox.head.fetch_add(1, Ordering::Relaxed) + 1,
        body: Some(pb::inbox_entry::Body::Message(message)),
    };
    let Ok(bytes) = server_bytes(server_frame::Body::Entry(entry)) else {
        return;
    };
    let mut pushes = lock(&recipient.pushes);
    let queue = pushes.entry(conversation_id.clone()).or_insert_with(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(push_stream(recipient.conn.clone(), conversation_id, rx));
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
