//! Live sessions: user → device → the one connection serving it.
//!
//! A second connection of the same user and device replaces the first, which is closed with
//! `SESSION_REPLACED`. Lookups by user are what delivery needs; they take one shard lock.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use tern_protocol::pb::PresenceStatus;

/// One authenticated connection.
#[derive(Debug)]
pub struct Session {
    /// Unique for the server process, never reused.
    pub id: u64,
    pub user: Arc<str>,
    pub device: Arc<str>,
    pub conn: quinn::Connection,
    /// Where delivery records this user's inbox growth for this session's pusher.
    pub push: crate::delivery::PushState,
    /// This device's presence (`PresenceStatus` as i32).
    pub presence: AtomicI32,
    /// In the background: no presence or typing datagrams for it.
    pub background: AtomicBool,
}

impl Session {
    pub fn presence(&self) -> PresenceStatus {
        PresenceStatus::try_from(self.presence.load(Ordering::Relaxed))
            .unwrap_or(PresenceStatus::Offline)
    }

    pub fn set_presence(&self, status: PresenceStatus) {
        self.presence.store(status as i32, Ordering::Relaxed);
    }

    pub fn is_background(&self) -> bool {
        self.background.load(Ordering::Relaxed)
    }

    /// The user's inbox head as this session last heard it.
    pub fn push_head(&self) -> u64 {
        self.push.head()
    }
}

/// Every live session, by user and device.
#[derive(Debug, Default)]
pub struct Registry {
    users: crate::FastDashMap<Arc<str>, HashMap<Arc<str>, Arc<Session>>>,
}

impl Registry {
    /// Adds `session`, returning the session it replaced, if any.
    pub fn register(&self, session: Arc<Session>) -> Option<Arc<Session>> {
        let mut devices = self.users.entry(session.user.clone()).or_default();
        devices.insert(session.device.clone(), session)
    }

    /// Removes the session of `user`/`device` if it is still `session_id` (a replacement may
    /// already have taken its place). Returns whether it was removed.
    pub fn unregister(&self, user: &str, device: &str, session_id: u64) -> bool {
        let mut removed = false;
        self.users.remove_if_mut(user, |_, devices| {
            if devices.get(device).is_some_and(|s| s.id == session_id) {
                devices.remove(device);
                removed = true;
            }
            devices.is_empty()
        });
        removed
    }

    /// The live sessions of `user`.
    pub fn sessions_of(&self, user: &str) -> Vec<Arc<Session>> {
        self.users
            .get(user)
            .map(|d| d.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `user` has at least one live session.
    pub fn is_online(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// Every live session (for shutdown and metrics).
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.users
            .iter()
            .flat_map(|e| e.value().values().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.users.iter().map(|e| e.value().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}
