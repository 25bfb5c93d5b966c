//! `TernClient`: one device's session, as the app sees it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_client::{Client, ClientConfig, SendTarget, Trust};

use crate::TernError;
use crate::listener::{self, TernListener};
use crate::runtime::{on_runtime, runtime};
use crate::types::{
    Conversation, HistoryPage, InboxItem, MemberRole, PresenceStatus, SentMessage, SessionInfo,
    SyncResult, TernConfig,
};

/// `TernClient` objects the app still holds.
static LIVE_CLIENTS: AtomicUsize = AtomicUsize::new(0);

/// What the bindings hold now, for leak checks in tests and in apps' debug screens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Record)]
pub struct LiveClients {
    /// `TernClient` objects not yet dropped.
    pub objects: u64,
    /// Clients whose connection, tasks and listener thread are still alive. Reaches
    /// `objects` shortly after a drop: the connection closes in the background.
    pub sessions: u64,
}

/// Counts of live clients (see `LiveClients`).
#[uniffi::export]
pub fn live_clients() -> LiveClients {
    LiveClients {
        objects: LIVE_CLIENTS.load(Ordering::SeqCst) as u64,
        sessions: listener::live_listener_threads() as u64,
    }
}

/// A tern client: one device's session, kept alive across network changes and reconnects.
/// Dropping it (or `close()` in Kotlin, the last reference in Swift) closes the connection.
#[derive(Debug, uniffi::Object)]
pub struct TernClient {
    client: Arc<Client>,
}

impl Drop for TernClient {
    fn drop(&mut self) {
        LIVE_CLIENTS.fetch_sub(1, Ordering::SeqCst);
    }
}

impl TernClient {
    /// Runs `call` with the client on the bindings' runtime.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, TernError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Client>) -> Fut,
        Fut: Future<Output = Result<T, tern_client::ClientError>> + Send + 'static,
    {
        let work = call(self.client.clone());
        on_runtime(async move { work.await.map_err(TernError::from) }).await
    }
}

#[uniffi::export]
impl TernClient {
    /// Connects and authenticates, then syncs what this device missed and keeps the session
    /// alive, reporting everything to `listener`. Fails with `TernError.Server` for a bad
    /// token; later connection problems are reported as connection states.
    #[uniffi::constructor]
    pub async fn connect(
        config: TernConfig,
        listener: Arc<dyn TernListener>,
    ) -> Result<Arc<Self>, TernError> {
        let trust = match config.ca_pem {
            Some(pem) => Trust::CaPem(pem),
            None => Trust::SystemRoots,
        };
        let mut client_config = ClientConfig::new(config.server, config.token, trust);
        client_config.server_name = config.server_name;
        client_config.resume_from = config.resume_from;
        client_config.background = config.background;
        client_config.client_agent = format!("tern-ffi/{}", env!("CARGO_PKG_VERSION"));
        let (client, events) = on_runtime(async move {
            Client::connect(client_config)
                .await
                .map_err(TernError::from)
        })
        .await?;
        listener::spawn(events, listener)?;
        LIVE_CLIENTS.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(Self {
            client: Arc::new(client),
        }))
    }

    /// Acknowledges what was received and closes the session. Later calls fail with
    /// `TernError.Closed`; the listener gets a final `Disconnected` state.
    pub async fn disconnect(&self) -> Result<(), TernError> {
        self.call(|c| async move {
            c.disconnect().await;
            Ok(())
        })
        .await
    }

    /// The authenticated session.
    pub fn session(&self) -> SessionInfo {
        let s = self.client.session();
        SessionInfo {
            user: s.user,
            device: s.device,
            session_id: s.session_id,
            server_time_ms: s.server_time_ms,
        }
    }

    /// The inbox sequence up to which the listener has been given every event. Save it and
    /// pass it as `TernConfig.resume_from` to resume exactly there. It can move back after
    /// `on_sync_too_long` (a server whose store was restored): save the latest value.
    pub fn inbox_cursor(&self) -> u64 {
        self.client.inbox_cursor()
    }

    /// Sends to a conversation. The returned message is stored durably. Pass a
    /// `client_message_id` to make a retry (after a crash, say) store nothing twice.
    #[uniffi::method(default(client_message_id = None))]
    pub async fn send(
        &self,
        conversation_id: String,
        text: String,
        client_message_id: Option<String>,
    ) -> Result<SentMessage, TernError> {
        self.call(|c| async move {
            let target = SendTarget::Conversation(conversation_id);
            c.send(target, &text, client_message_id)
                .await
                .map(Into::into)
        })
        .await
    }

    /// Sends to the direct conversation with `user_id`, created on first send.
    #[uniffi::method(default(client_message_id = None))]
    pub async fn send_to_user(
        &self,
        user_id: String,
        text: String,
        client_message_id: Option<String>,
    ) -> Result<SentMessage, TernError> {
        self.call(|c| async move {
            let target = SendTarget::User(user_id);
            c.send(target, &text, client_message_id)
                .await
                .map(Into::into)
        })
        .await
    }

    /// Every inbox entry after `since` (the listener already gets them live; this is for
    /// apps that page themselves).
    pub async fn sync(&self, since: u64) -> Result<SyncResult, TernError> {
        self.call(|c| async move {
            let result = c.sync(since).await?;
            Ok(SyncResult {
                entries: result
                    .entries
                    .into_iter()
                    .filter_map(InboxItem::from_entry)
                    .collect(),
                inbox_head: result.inbox_head,
                too_long: result.too_long.is_some(),
            })
        })
        .await
    }

    /// A page of messages before `before_seq` (0: the newest), newest first.
    #[uniffi::method(default(before_seq = 0, limit = 50))]
    pub async fn history(
        &self,
        conversation_id: String,
        before_seq: u64,
        limit: u32,
    ) -> Result<HistoryPage, TernError> {
        self.call(|c| async move {
            let page = c.history(&conversation_id, before_seq, limit).await?;
            Ok(HistoryPage {
                messages: page.messages.into_iter().map(Into::into).collect(),
                has_more: page.has_more,
            })
        })
        .await
    }

    /// Marks a conversation read up to `up_to_seq`; the senders get read receipts.
    pub async fn mark_read(
        &self,
        conversation_id: String,
        up_to_seq: u64,
    ) -> Result<(), TernError> {
        self.call(|c| async move { c.mark_read(&conversation_id, up_to_seq).await })
            .await
    }

    /// Publishes this device's presence to everyone who shares a conversation with it.
    pub async fn set_presence(&self, status: PresenceStatus) -> Result<(), TernError> {
        self.call(|c| async move { c.set_presence(status.into()).await })
            .await
    }

    /// Shows "typing…" to the other members of a conversation for a few seconds.
    pub async fn typing(&self, conversation_id: String) -> Result<(), TernError> {
        self.call(|c| async move { c.typing(&conversation_id).await })
            .await
    }

    /// Creates a group owned by this user, with `members` besides.
    pub async fn create_group(
        &self,
        name: String,
        members: Vec<String>,
    ) -> Result<Conversation, TernError> {
        self.call(|c| async move { c.create_group(&name, &members).await.map(Into::into) })
            .await
    }

    pub async fn add_members(
        &self,
        conversation_id: String,
        user_ids: Vec<String>,
    ) -> Result<Conversation, TernError> {
        self.call(|c| async move {
            c.add_members(&conversation_id, &user_ids)
                .await
                .map(Into::into)
        })
        .await
    }

    pub async fn remove_member(
        &self,
        conversation_id: String,
        user_id: String,
    ) -> Result<Conversation, TernError> {
        self.call(|c| async move {
            c.remove_member(&conversation_id, &user_id)
                .await
                .map(Into::into)
        })
        .await
    }

    pub async fn leave_group(&self, conversation_id: String) -> Result<Conversation, TernError> {
        self.call(|c| async move { c.leave_group(&conversation_id).await.map(Into::into) })
            .await
    }

    pub async fn dissolve_group(&self, conversation_id: String) -> Result<Conversation, TernError> {
        self.call(|c| async move { c.dissolve_group(&conversation_id).await.map(Into::into) })
            .await
    }

    pub async fn set_role(
        &self,
        conversation_id: String,
        user_id: String,
        role: MemberRole,
    ) -> Result<Conversation, TernError> {
        self.call(|c| async move {
            c.set_role(&conversation_id, &user_id, role.into())
                .await
                .map(Into::into)
        })
        .await
    }

    /// One conversation, with its members.
    pub async fn conversation(&self, conversation_id: String) -> Result<Conversation, TernError> {
        self.call(|c| async move { c.conversation(&conversation_id).await.map(Into::into) })
            .await
    }

    /// Every conversation this user is in.
    pub async fn conversations(&self) -> Result<Vec<Conversation>, TernError> {
        self.call(|c| async move {
            Ok(c.conversations()
                .await?
                .into_iter()
                .map(Into::into)
                .collect())
        })
        .await
    }

    /// The OS reported a network change (Wi-Fi to cellular): the connection moves to a new
    /// socket and path without a new handshake; nothing in flight is lost.
    pub fn network_changed(&self) -> Result<(), TernError> {
        // Rebinding registers the new socket with the runtime's reactor.
        let _guard = runtime()?.enter();
        self.client.network_changed().map_err(TernError::from)
    }

    /// Foreground (false) or background (true): in the background the server stops sending
    /// presence and typing, and this device shows as away. Messages still arrive.
    pub async fn set_background(&self, background: bool) -> Result<(), TernError> {
        self.call(|c| async move { c.set_background(background).await })
            .await
    }

    /// Round trip to the server, in milliseconds.
    pub async fn ping(&self) -> Result<f64, TernError> {
        self.call(|c| async move { c.ping().await.map(|d| d.as_secs_f64() * 1000.0) })
            .await
    }
}
