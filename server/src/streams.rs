//! Streams a client opens after the control stream: conversation and request streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tern_protocol::ErrorCode;
use tern_protocol::pb::{
    self, ClientFrame, ServerFrame, client_frame, request, response, server_frame,
};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::ServerState;
use crate::framed::{FrameReader, error_frame, error_frame_retry, write_frame};
use crate::registry::Session;
use crate::store::{GroupOp, SendOutcome, StoreError, Target};

/// Sends in flight on one conversation stream; beyond this the stream stops reading.
const PIPELINE_DEPTH: usize = 256;
/// Most acks written at once.
const ACK_BATCH: usize = 64;
/// Default sync page size, entries.
const DEFAULT_SYNC_PAGE: usize = 200;
/// Largest history page, messages.
const MAX_HISTORY_PAGE: usize = 500;

/// Streams a connection may have open at first: the control stream, a few conversations and
/// requests. quinn keeps bookkeeping for every stream it allows (about 90 bytes each), so an
/// idle phone costs about 5 KB less than with the full allowance; a busy one is granted more
/// as it opens streams (see `StreamCredit`), up to `max_client_bidi_streams`.
pub const INITIAL_BIDI_STREAMS: u32 = 8;
/// Credit is raised while at least this many allowed streams are still unopened, so a client
/// opening streams one after another does not wait for credit.
const CREDIT_HEADROOM: u32 = 3;

/// Accepts the session's streams until the connection closes, each served in its own task so
/// one stalled conversation never delays another.
pub async fn accept_streams(state: Arc<ServerState>, session: Arc<Session>) {
    let mut credit = StreamCredit::new(state.config.max_client_bidi_streams);
    while let Ok((send, recv)) = session.conn.accept_bi().await {
        let open = credit.opened(&session.conn);
        let (state, session) = (state.clone(), session.clone());
        tokio::spawn(async move {
            serve_stream(state, session, send, recv).await;
            drop(open);
        });
    }
}

/// How many bidirectional streams a connection may have open: starts at
/// [`INITIAL_BIDI_STREAMS`] and doubles, up to the configured maximum, whenever the client
/// gets within [`CREDIT_HEADROOM`] of it. Never lowered: quinn keeps the bookkeeping anyway.
struct StreamCredit {
    /// Streams open now, the control stream included.
    open: Arc<AtomicU32>,
    granted: u32,
    max: u32,
}

/// Counts a stream as open until dropped.
struct OpenStream(Arc<AtomicU32>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StreamCredit {
    fn new(max: u32) -> Self {
        Self {
            open: Arc::new(AtomicU32::new(1)),
            granted: INITIAL_BIDI_STREAMS.min(max),
            max,
        }
    }

    fn opened(&mut self, conn: &quinn::Connection) -> OpenStream {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if open + CREDIT_HEADROOM > self.granted && self.granted < self.max {
            self.granted = (self.granted * 2).min(self.max);
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(self.granted));
            debug!(granted = self.granted, open, "more stream credit");
        }
        OpenStream(self.open.clone())
    }
}

async fn serve_stream(
    state: Arc<ServerState>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let max = state.config.max_frame_bytes as usize;
    let mut reader = FrameReader::new(recv, max);
    match reader.next::<ClientFrame>().await {
        Ok(Some(ClientFrame {
            body: Some(client_frame::Body::OpenConversation(open)),
        })) => {
            conversation_stream(state, session, send, reader, open).await;
        }
        Ok(Some(ClientFrame {
            body: Some(client_frame::Body::Request(req)),
        })) => {
            if let Err(e) = request_stream(&state, &session, &mut send, req).await {
                let frame = error_frame_retry(e.code(), e.to_string(), e.retry_after_ms());
                let _ = write_frame(&mut send, &frame, max).await;
            }
            let _ = send.finish();
        }
        Ok(None) => {}
        Ok(Some(_)) => {
            refuse(
                &mut send,
                &mut reader,
                ErrorCode::ProtocolViolation,
                "unexpected first frame",
                max,
            )
            .await
        }
        Err(e) => refuse(&mut send, &mut reader, e.code(), &e.to_string(), max).await,
    }
}

/// Ends a stream the client broke: an error frame, then reset both directions with the code.
async fn refuse(
    send: &mut quinn::SendStream,
    reader: &mut FrameReader,
    code: ErrorCode,
    why: &str,
    max: usize,
) {
    debug!(%code, why, "refusing stream");
    let _ = write_frame(send, &error_frame(code, why), max).await;
    let _ = send.finish();
    reader.stop(code);
}

type PendingAck = (String, oneshot::Receiver<Result<SendOutcome, StoreError>>);

/// A conversation stream: `SendMessage` frames in, one `SendAck` or `Error` each, in order.
/// Sends are pipelined: the next is queued to the writer while earlier ones await their fsync.
async fn conversation_stream(
    state: Arc<ServerState>,
    session: Arc<Session>,
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    open: pb::OpenConversation,
) {
    let max = state.config.max_frame_bytes as usize;
    // `None`: a multiplexed stream (benchmark only), where each send names its target.
    let target = if open.multiplexed {
        None
    } else if !open.conversation_id.is_empty() {
        if let Err(e) = state
            .store
            .check_member(&open.conversation_id, &session.user)
        {
            return refuse(&mut send, &mut reader, e.code(), &e.to_string(), max).await;
        }
        Some(Target::Conversation(open.conversation_id))
    } else if !open.direct_peer.is_empty() {
        Some(Target::Direct(open.direct_peer))
    } else {
        return refuse(
            &mut send,
            &mut reader,
            ErrorCode::InvalidArgument,
            "conversation_id or direct_peer is required",
            max,
        )
        .await;
    };

    let (ack_tx, mut ack_rx) = mpsc::channel::<PendingAck>(PIPELINE_DEPTH);
    let acks = async move {
        // An ack taken from the queue whose answer had not arrived yet.
        let mut carried: Option<PendingAck> = None;
        loop {
            let (client_message_id, rx) = match carried.take() {
                Some(pending) => pending,
                None => match ack_rx.recv().await {
                    Some(pending) => pending,
                    None => break,
                },
            };
            let mut bytes = bytes::BytesMut::new();
            let mut frame = ack_frame(client_message_id, rx.await.ok());
            // One group commit answers many sends at once: write every answer already here
            // in one go, in order, instead of waking the connection once per ack. Every answer
            // taken from the queue is encoded before the batch may end: the client pairs
            // answers with its sends by position, so a dropped one would shift all later ones.
            let mut batched = 0;
            loop {
                if tern_protocol::frame::encode_frame(&frame, max, &mut bytes).is_err() {
                    return;
                }
                batched += 1;
                if batched == ACK_BATCH {
                    break;
                }
                let Ok((client_message_id, mut rx)) = ack_rx.try_recv() else {
                    break;
                };
                frame = match rx.try_recv() {
                    Err(oneshot::error::TryRecvError::Empty) => {
                        carried = Some((client_message_id, rx));
                        break;
                    }
                    Ok(result) => ack_frame(client_message_id, Some(result)),
                    Err(oneshot::error::TryRecvError::Closed) => ack_frame(client_message_id, None),
                };
            }
            if send.write_chunk(bytes.freeze()).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    };
    let writer = state.store.writer().clone();
    let reads = async move {
        loop {
            let msg = match reader.next::<ClientFrame>().await {
                Ok(Some(ClientFrame {
                    body: Some(client_frame::Body::Send(msg)),
                })) => msg,
                Ok(None) => break,
                Ok(Some(_)) => {
                    reader.stop(ErrorCode::ProtocolViolation);
                    break;
                }
                Err(e) => {
                    reader.stop(e.code());
                    break;
                }
            };
            let client_message_id = msg.client_message_id.clone();
            // The writer checks membership, so a per-message target needs no check here.
            let this_target = match &target {
                Some(target) => Ok(target.clone()),
                None => multiplexed_target(&msg),
            };
            let rx = match this_target {
                Ok(this_target) => match writer
                    .send_pipelined(
                        session.user.clone(),
                        session.device.clone(),
                        this_target,
                        msg,
                    )
                    .await
                {
                    Ok(rx) => rx,
                    Err(_) => break,
                },
                Err(e) => {
                    // Answered in order, like any other send's error.
                    let (tx, rx) = oneshot::channel();
                    let _ = tx.send(Err(e));
                    rx
                }
            };
            if ack_tx.send((client_message_id, rx)).await.is_err() {
                break;
            }
        }
    };
    // The answers are written by their own task: joined in one task, every packet of sends
    // also polled the answer queue, and every answer polled the stream for more sends (a
    // lock of the connection each), which showed in the runtime's profile.
    let acks = tokio::spawn(acks);
    reads.await;
    let _ = acks.await;
}

/// The answer to one send: its `SendAck`, or an `Error` (`None`: the writer is gone).
fn ack_frame(
    client_message_id: String,
    result: Option<Result<SendOutcome, StoreError>>,
) -> ServerFrame {
    match result {
        Some(Ok(outcome)) => ServerFrame {
            body: Some(server_frame::Body::SendAck(pb::SendAck {
                client_message_id,
                message_id: outcome.message.message_id,
                conversation_id: outcome.message.conversation_id,
                seq: outcome.message.seq,
                sent_at_ms: outcome.message.sent_at_ms,
                duplicate: outcome.duplicate,
                inbox_seq: outcome.sender_inbox_seq,
            })),
        },
        Some(Err(e)) => error_frame_retry(e.code(), e.to_string(), e.retry_after_ms()),
        None => error_frame(ErrorCode::Internal, "storage writer stopped"),
    }
}

/// The target a send on a multiplexed stream names.
fn multiplexed_target(msg: &pb::SendMessage) -> Result<Target, StoreError> {
    match (msg.conversation_id.is_empty(), msg.direct_peer.is_empty()) {
        (false, true) => Ok(Target::Conversation(msg.conversation_id.clone())),
        (true, false) => Ok(Target::Direct(msg.direct_peer.clone())),
        _ => Err(StoreError::InvalidArgument(
            "a send on a multiplexed stream needs exactly one of conversation_id, direct_peer"
                .into(),
        )),
    }
}

/// Serves one request; its responses are written to `send`.
async fn request_stream(
    state: &ServerState,
    session: &Session,
    send: &mut quinn::SendStream,
    req: pb::Request,
) -> Result<(), StreamError> {
    let max = state.config.max_frame_bytes as usize;
    let store = &state.store;
    let user = &session.user;
    let reply = |body| ServerFrame {
        body: Some(server_frame::Body::Response(pb::Response {
            body: Some(body),
        })),
    };
    let group = |op| async {
        store
            .writer()
            .group(user.clone(), op)
            .await
            .map(response::Body::Conversation)
    };
    let body = match req.body.ok_or(StreamError::Invalid("empty request"))? {
        request::Body::Sync(sync) => return sync_stream(state, session, send, sync).await,
        request::Body::History(h) => {
            store.check_member(&h.conversation_id, user)?;
            let limit = (h.limit as usize).clamp(1, MAX_HISTORY_PAGE);
            let (mut messages, mut has_more) =
                store.history(&h.conversation_id, h.before_seq, limit)?;
            if fit_to_budget(&mut messages, page_budget(max)) {
                has_more = true;
            }
            response::Body::HistoryPage(pb::HistoryPage { messages, has_more })
        }
        request::Body::MarkRead(m) => {
            store
                .writer()
                .mark_read(user.clone(), m.conversation_id, m.up_to_seq)
                .await?;
            response::Body::Done(pb::Done {})
        }
        request::Body::CreateGroup(c) => {
            group(GroupOp::Create {
                name: c.name,
                members: c.members,
            })
            .await?
        }
        request::Body::AddMembers(a) => {
            group(GroupOp::Add {
                conversation: a.conversation_id,
                users: a.user_ids,
            })
            .await?
        }
        request::Body::RemoveMember(r) => {
            group(GroupOp::Remove {
                conversation: r.conversation_id,
                user: r.user_id,
            })
            .await?
        }
        request::Body::LeaveGroup(l) => {
            group(GroupOp::Leave {
                conversation: l.conversation_id,
            })
            .await?
        }
        request::Body::DissolveGroup(d) => {
            group(GroupOp::Dissolve {
                conversation: d.conversation_id,
            })
            .await?
        }
        request::Body::SetRole(s) => {
            let role = pb::MemberRole::try_from(s.role)
                .map_err(|_| StreamError::Invalid("unknown role"))?;
            group(GroupOp::SetRole {
                conversation: s.conversation_id,
                user: s.user_id,
                role,
            })
            .await?
        }
        request::Body::GetConversation(g) => {
            store.check_member(&g.conversation_id, user)?;
            response::Body::Conversation(store.conversation(&g.conversation_id)?)
        }
        request::Body::ListConversations(_) => {
            let mut conversations = store
                .conversations_of(user)?
                .iter()
                .map(|id| store.conversation(id))
                .collect::<Result<Vec<_>, _>>()?;
            for conv in &mut conversations {
                conv.members.clear();
            }
            let truncated = fit_to_budget(&mut conversations, page_budget(max));
            response::Body::ConversationList(pb::ConversationList {
                conversations,
                truncated,
            })
        }
    };
    write_frame(send, &reply(body), max)
        .await
        .map_err(StreamError::from_write)
}

/// Streams the inbox after `since` in pages, then makes the session live, so that pushes
/// continue exactly where the last page ended: no gap, no duplicate. The session was
/// registered (subscribed) before this reads anything.
async fn sync_stream(
    state: &ServerState,
    session: &Session,
    send: &mut quinn::SendStream,
    sync: pb::SyncRequest,
) -> Result<(), StreamError> {
    let max = state.config.max_frame_bytes as usize;
    let store = &state.store;
    let page = match sync.page_size as usize {
        0 => DEFAULT_SYNC_PAGE,
        n => n.min(crate::MAX_SYNC_PAGE as usize),
    };
    let head = store.inbox_head(&session.user)?;
    let respond = |body| ServerFrame {
        body: Some(server_frame::Body::Response(pb::Response {
            body: Some(body),
        })),
    };
    // A cursor above the head: the device saw entries this store does not have (it was
    // restored from a backup, or lost its unsynced tail with `buffered` durability), and the
    // inbox's sequence goes on below the cursor. Paging from the head would let the device
    // take the new entries there for ones it has already seen and drop them; the answer
    // "too long" makes it rewind to the head and resynchronise from conversation heads.
    let device_ahead = sync.since_inbox_seq > head;
    if device_ahead {
        // Not a warning: any client can claim a cursor, and its log lines are not ours to flood.
        debug!(
            user = %session.user,
            since = sync.since_inbox_seq,
            head,
            "a device's inbox cursor is ahead of the inbox: the store lost entries it had seen"
        );
    }
    if device_ahead || head.saturating_sub(sync.since_inbox_seq) > state.config.sync_limit {
        let mut heads = store.heads_of(&session.user)?;
        // Heads need ids and sequences, not member lists; and they must fit one frame.
        for head in &mut heads {
            if let Some(conv) = &mut head.conversation {
                conv.members.clear();
            }
        }
        fit_to_budget(&mut heads, page_budget(max));
        let frame = respond(response::Body::SyncTooLong(pb::SyncTooLong {
            inbox_head: head,
            heads,
            device_ahead,
        }));
        write_frame(send, &frame, max)
            .await
            .map_err(StreamError::from_write)?;
        session.push.go_live(head);
        return Ok(());
    }
    let mut after = sync.since_inbox_seq;
    loop {
        let mut entries = store.read_inbox(&session.user, after, page)?;
        let mut complete = entries.len() < page;
        // Pages are capped in bytes too: a page of large messages must still fit one frame.
        if fit_to_budget(&mut entries, page_budget(max)) {
            complete = false;
        }
        if let Some(last) = entries.last() {
            after = last.inbox_seq;
        }
        let inbox_head = store.inbox_head(&session.user)?;
        let frame = respond(response::Body::SyncPage(pb::SyncPage {
            entries,
            complete,
            inbox_head,
        }));
        write_frame(send, &frame, max)
            .await
            .map_err(StreamError::from_write)?;
        if complete {
            let started = session.push.go_live(after);
            debug!(
                since = sync.since_inbox_seq,
                up_to = after,
                inbox_head,
                started,
                "sync complete"
            );
            return Ok(());
        }
    }
}

/// Bytes of items one response may carry, leaving room for the envelope.
fn page_budget(max_frame: usize) -> usize {
    max_frame.saturating_sub(4096)
}

/// Keeps the longest prefix of `items` whose encoding fits `budget` (at least one item, which
/// the message size limit keeps under any frame cap). Returns whether it cut anything.
pub(crate) fn fit_to_budget<M: prost::Message>(items: &mut Vec<M>, budget: usize) -> bool {
    let mut used = 0;
    let keep = items
        .iter()
        .position(|item| {
            used += item.encoded_len() + 4;
            used > budget
        })
        .map_or(items.len(), |i| i.max(1));
    let cut = keep < items.len();
    items.truncate(keep);
    cut
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error("stream closed")]
    Gone,
    #[error("response could not be encoded: {0}")]
    Encode(String),
}

impl StreamError {
    fn from_write(e: crate::framed::WriteFrameError) -> Self {
        match e {
            crate::framed::WriteFrameError::Encode(e) => {
                tracing::error!(error = %e, "response too large for a frame");
                StreamError::Encode(e.to_string())
            }
            crate::framed::WriteFrameError::Stream(_) => StreamError::Gone,
        }
    }
}

impl StreamError {
    fn code(&self) -> ErrorCode {
        match self {
            StreamError::Store(e) => e.code(),
            StreamError::Invalid(_) => ErrorCode::InvalidArgument,
            StreamError::Gone => ErrorCode::Ok,
            StreamError::Encode(_) => ErrorCode::Internal,
        }
    }

    fn retry_after_ms(&self) -> u64 {
        match self {
            StreamError::Store(e) => e.retry_after_ms(),
            _ => 0,
        }
    }
}
