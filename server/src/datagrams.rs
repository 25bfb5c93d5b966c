//! Datagrams: presence, typing and heartbeats. Best effort: nothing here is stored, and
//! nothing relies on a datagram arriving.
//!
//! Presence is per user: online if any device is online, away if any is away, offline when
//! none is connected (a device that falls silent is dropped at the QUIC idle timeout). Changes
//! fan out to every user who shares a conversation with the user, except devices in the
//! background, for which a presence or typing update is not worth a radio wake-up.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use dashmap::DashMap;
use prost::Message as _;
use tern_protocol::pb::{self, PresenceStatus, datagram};
use tracing::debug;

use crate::ServerState;
use crate::auth::unix_now_ms;
use crate::registry::Session;

/// Datagrams a connection may send per second on average, and in a burst. Presence and typing
/// need a few per minute; heartbeats one per 25 s. Above this a client is misbehaving.
const RATE_PER_SEC: f64 = 20.0;
const RATE_BURST: f64 = 40.0;
/// Typing indicators last at most this long unless renewed; a client asking for longer is
/// clamped, one asking for nothing gets the default.
const TYPING_MAX_MS: u32 = 10_000;
const TYPING_DEFAULT_MS: u32 = 5_000;

/// Datagram counters, for tests and metrics.
#[derive(Debug, Default)]
pub struct DatagramStats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub dropped_rate_limited: AtomicU64,
    pub dropped_too_large: AtomicU64,
    pub dropped_malformed: AtomicU64,
    pub dropped_send_failed: AtomicU64,
}

/// The last known presence of each user seen since the server started.
#[derive(Debug, Default)]
pub struct PresenceBook {
    users: DashMap<Arc<str>, (pb::Presence, Instant)>,
}

/// A device that republishes an unchanged presence gets it fanned out again at most this
/// often: a lost presence datagram is repaired by the next republish, without letting a
/// client turn its datagram budget into a fan-out storm.
const REPUBLISH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl PresenceBook {
    pub fn get(&self, user: &str) -> pb::Presence {
        self.users
            .get(user)
            .map(|p| p.0.clone())
            .unwrap_or_else(|| pb::Presence {
                user_id: user.to_owned(),
                status: PresenceStatus::Offline as i32,
                last_seen_ms: 0,
            })
    }

    /// Records `status`; returns the presence to fan out if it changed, or if `republish`
    /// and the last fan-out is older than [`REPUBLISH_INTERVAL`].
    fn set(
        &self,
        user: &Arc<str>,
        status: PresenceStatus,
        republish: bool,
    ) -> Option<pb::Presence> {
        let presence = pb::Presence {
            user_id: user.to_string(),
            status: status as i32,
            last_seen_ms: unix_now_ms(),
        };
        let now = Instant::now();
        let mut entry = self.users.entry(user.clone()).or_insert_with(|| {
            (
                pb::Presence::default(),
                now.checked_sub(REPUBLISH_INTERVAL).unwrap_or(now),
            )
        });
        let changed = entry.0.status != status as i32 || entry.0.user_id.is_empty();
        let due = republish && now.duration_since(entry.1) >= REPUBLISH_INTERVAL;
        entry.0 = presence.clone();
        if changed || due {
            entry.1 = now;
            Some(presence)
        } else {
            None
        }
    }
}

/// Users whose contacts were read, at most; past it the cache starts over (it holds the
/// users whose presence changed lately, and those are re-read on their next change).
const CONTACTS_CACHED: usize = 100_000;

/// Each user's contacts as last read from the store, with the store's counter for them
/// then ([`crate::store::Store::contacts_epoch`]): a presence change reads the store only
/// when the user's memberships changed since.
#[derive(Debug, Default)]
pub struct ContactsCache {
    users: DashMap<Arc<str>, (u64, Arc<[String]>)>,
}

/// Users who share a conversation with `user` that carries presence, in id order.
pub async fn contacts(state: &ServerState, user: &str) -> Arc<[String]> {
    // Taken before reading: a membership change committed during the read moves it after.
    let epoch = state.store.contacts_epoch(user);
    let cached = state
        .contacts
        .users
        .get(user)
        .filter(|entry| entry.0 == epoch)
        .map(|entry| entry.1.clone());
    if let Some(contacts) = cached {
        return contacts;
    }
    // A miss reads every conversation of the user and its members from fjall: off the
    // runtime thread, which serves every connection.
    let store = state.store.clone();
    let owner = user.to_owned();
    let max_group = state.config.presence_max_group_members as usize;
    let read = tokio::task::spawn_blocking(move || {
        let mut contacts = BTreeSet::new();
        for conversation in store.conversations_of(&owner).unwrap_or_default() {
            if let Ok(members) = store.members_at_most(&conversation, max_group.saturating_add(1))
                && relays_presence(&conversation, members.len(), max_group)
            {
                contacts.extend(
                    members
                        .into_iter()
                        .map(|m| m.user_id)
                        .filter(|m| *m != owner),
                );
            }
        }
        contacts.into_iter().collect::<Arc<[String]>>()
    });
    let Ok(contacts) = read.await else {
        // The blocking pool is shutting down with the server: nobody to tell.
        return Arc::from(Vec::new());
    };
    if state.contacts.users.len() >= CONTACTS_CACHED {
        state.contacts.users.clear();
    }
    state
        .contacts
        .users
        .insert(Arc::from(user), (epoch, contacts.clone()));
    contacts
}

/// Whether presence and typing go between the `members` members of `conversation`: always in
/// a direct conversation, in groups up to `max_group`
/// ([`crate::Config::presence_max_group_members`]).
fn relays_presence(conversation: &str, members: usize, max_group: usize) -> bool {
    tern_protocol::ids::direct_members(conversation).is_some() || members <= max_group
}

/// Recomputes `user`'s presence from their sessions and fans out a change.
pub async fn refresh_presence(state: &ServerState, user: &Arc<str>) {
    publish_presence(state, user, false).await;
}

/// Like [`refresh_presence`], and also fans out an unchanged presence that a device
/// republished (at most once per [`REPUBLISH_INTERVAL`]).
async fn publish_presence(state: &ServerState, user: &Arc<str>, republish: bool) {
    // Contacts first (this may wait for a read): from here to the last datagram nothing
    // waits, so two changes of one user cannot reach contacts in the wrong order.
    let contacts = contacts(state, user).await;
    let sessions = state.registry.sessions_of(user);
    let status = sessions
        .iter()
        .map(|s| s.presence())
        .max_by_key(|s| match s {
            PresenceStatus::Online => 2,
            PresenceStatus::Away => 1,
            _ => 0,
        })
        .unwrap_or(PresenceStatus::Offline);
    if let Some(presence) = state.presence.set(user, status, republish) {
        let datagram = pb::Datagram {
            body: Some(datagram::Body::Presence(presence)),
        };
        for contact in contacts.iter() {
            for session in state.registry.sessions_of(contact) {
                if !session.is_background() {
                    send(state, &session.conn, &datagram);
                }
            }
        }
    }
}

/// The presence of `user`'s contacts, for the snapshot after Welcome.
pub async fn snapshot(state: &ServerState, user: &str) -> pb::PresenceSnapshot {
    let mut contacts: Vec<pb::Presence> = contacts(state, user)
        .await
        .iter()
        .map(|c| state.presence.get(c))
        .collect();
    // Online contacts first, so that a snapshot cut to fit one frame keeps what matters.
    contacts.sort_by_key(|p| p.status != PresenceStatus::Online as i32);
    crate::streams::fit_to_budget(
        &mut contacts,
        (state.config.max_frame_bytes as usize).saturating_sub(4096),
    );
    pb::PresenceSnapshot { contacts }
}

/// Sends one datagram if it fits the path; counts what happens.
pub fn send(state: &ServerState, conn: &quinn::Connection, datagram: &pb::Datagram) -> bool {
    let stats = &state.datagram_stats;
    let Ok(bytes) = tern_protocol::encode_datagram(datagram) else {
        stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
        return false;
    };
    // The path's current maximum (it shrinks when a phone moves to a path with a smaller MTU).
    if conn.max_datagram_size().is_none_or(|max| bytes.len() > max) {
        stats.dropped_too_large.fetch_add(1, Ordering::Relaxed);
        return false;
    }
    match conn.send_datagram(bytes) {
        Ok(()) => {
            stats.sent.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(_) => {
            stats.dropped_send_failed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Token bucket over datagrams of one connection.
struct RateLimit {
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * RATE_PER_SEC)
            .min(RATE_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Reads the session's datagrams until the connection closes.
pub async fn datagram_loop(state: Arc<ServerState>, session: Arc<Session>) {
    let stats = &state.datagram_stats;
    let mut limit = RateLimit {
        tokens: RATE_BURST,
        last: Instant::now(),
    };
    while let Ok(bytes) = session.conn.read_datagram().await {
        stats.received.fetch_add(1, Ordering::Relaxed);
        if !limit.allow() {
            stats.dropped_rate_limited.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let Ok(datagram) = pb::Datagram::decode(bytes) else {
            stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match datagram.body {
            Some(datagram::Body::Presence(p)) => match PresenceStatus::try_from(p.status) {
                Ok(status @ (PresenceStatus::Online | PresenceStatus::Away)) => {
                    // A device in the background shows as away, whatever it says.
                    let status = if session.is_background() {
                        PresenceStatus::Away
                    } else {
                        status
                    };
                    session.set_presence(status);
                    // A device repeats its presence until it sees it took: an unchanged
                    // one is fanned out again (at most once per REPUBLISH_INTERVAL), so a
                    // fan-out datagram lost on the way to a contact is repaired.
                    publish_presence(&state, &session.user, true).await;
                }
                _ => {
                    stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
                }
            },
            Some(datagram::Body::Typing(t)) => typing(&state, &session, t),
            Some(datagram::Body::Heartbeat(h)) if !h.reply => {
                let reply = pb::Heartbeat {
                    nonce: h.nonce,
                    sent_at_us: h.sent_at_us,
                    rtt_us: session.conn.rtt().as_micros() as u64,
                    reply: true,
                };
                send(
                    &state,
                    &session.conn,
                    &pb::Datagram {
                        body: Some(datagram::Body::Heartbeat(reply)),
                    },
                );
            }
            _ => {}
        }
    }
    debug!("datagram loop ended");
}

fn typing(state: &ServerState, session: &Session, typing: pb::Typing) {
    // Only members type in a conversation; anything else is dropped silently (best effort).
    if !matches!(
        state.store.role(&typing.conversation_id, &session.user),
        Ok(Some(_))
    ) {
        state
            .datagram_stats
            .dropped_malformed
            .fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Not in dissolved groups, nor in groups too large to carry typing (read no further
    // than it takes to tell); else to every member (the full list, not a response's).
    if !matches!(
        state.store.is_dissolved(&typing.conversation_id),
        Ok(Some(false))
    ) {
        return;
    }
    let max_group = state.config.presence_max_group_members as usize;
    let Ok(members) = state
        .store
        .members_at_most(&typing.conversation_id, max_group.saturating_add(1))
    else {
        return;
    };
    if !relays_presence(&typing.conversation_id, members.len(), max_group) {
        return;
    }
    let expires_in_ms = match typing.expires_in_ms {
        0 => TYPING_DEFAULT_MS,
        ms => ms.min(TYPING_MAX_MS),
    };
    let datagram = pb::Datagram {
        body: Some(datagram::Body::Typing(pb::Typing {
            conversation_id: typing.conversation_id,
            user_id: session.user.to_string(),
            expires_in_ms,
        })),
    };
    for member in members.iter().filter(|m| *m.user_id != *session.user) {
        for other in state.registry.sessions_of(&member.user_id) {
            if !other.is_background() {
                send(state, &other.conn, &datagram);
            }
        }
    }
}
