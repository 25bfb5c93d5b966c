//! Server configuration: every default is chosen for a phone-facing server and says why.
//!
//! Configuration comes from an optional TOML file (`--config`), then command-line flags, which
//! win. Every field has a default, so an empty file (or none) is a working configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// UDP address to listen on. `[::]:4433` is dual-stack: IPv6 and IPv4-mapped clients both
    /// arrive on one socket, because mobile networks hand out either.
    pub listen: SocketAddr,
    /// Where the JWT secret (and later the inbox) live.
    pub data_dir: PathBuf,
    /// A real certificate chain (PEM). With `key`; when absent, development certificates are
    /// generated into `certs_dir` on first start and reused afterwards.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Where development certificates are generated.
    pub certs_dir: PathBuf,
    /// HS256 secret for client tokens. When absent, one is generated into `data_dir/jwt.secret`
    /// on first start. Also read from `TERN_JWT_SECRET`.
    pub jwt_secret: Option<String>,
    /// Seconds a new connection has to open its control stream and present a valid token.
    /// 5 s covers a slow 3G handshake plus one retransmission, while idle sockets from scanners
    /// are dropped quickly.
    pub auth_timeout_secs: u64,
    /// Seconds without any packet before a connection is dropped. Must exceed the client's
    /// keep-alive interval; 60 s tolerates a background phone that keeps alive every 25–30 s.
    pub idle_timeout_secs: u64,
    /// Maximum bytes of one stream frame (length prefix excluded).
    pub max_frame_bytes: u32,
    /// Maximum bytes of one message (text plus payload). 64 KiB: chat text and attachment
    /// references, not the attachments themselves.
    pub max_message_bytes: u32,
    /// Maximum members of a group.
    pub max_group_members: u32,
    /// Requested UDP socket send and receive buffer, bytes. The kernel default (208 KiB) drops
    /// handshake packets once ~100 handshakes are in flight; 4 MiB removes the drops (see
    /// shared/BASELINES.md). The kernel caps it at `net.core.rmem_max`.
    pub udp_buffer_bytes: usize,
    /// Most concurrent bidirectional streams a client may open: the control stream, one per
    /// active conversation and a few requests. quinn pre-allocates per allowed stream (about
    /// 115 KB per connection at 1,024), so this stays small; a connection starts with 8 and is
    /// granted more as it opens streams, up to this. A client with more conversations active
    /// reuses streams (they close when idle).
    pub max_client_bidi_streams: u32,
    /// UDP segmentation offload (GSO): several datagrams of one connection per send call.
    /// Off by default: quinn keeps each connection's send buffer at the size of its largest
    /// batch, which measured about 7 KB more per idle connection (`tern-bench connections`,
    /// 10,000 connections), while tern's small messages rarely fill a batch (`tern-bench
    /// direct` showed no difference in throughput). Turn it on for bulk-heavy deployments.
    pub segmentation_offload: bool,
    /// Path MTU discovery: probe for packets larger than QUIC's 1,200-byte minimum. Off by
    /// default: quinn keeps each connection's send buffer at the size of its largest packet
    /// (1.3 KB more per idle connection with it on), chat messages fit 1,200 bytes anyway, and
    /// mobile paths change MTU under a moving phone. Turn it on when most traffic is large
    /// messages: they then take up to 17% fewer packets.
    pub mtu_discovery: bool,
    /// TLS session tickets issued per connection. One: a phone resumes with it and gets a
    /// new one on every connection, and each ticket costs server memory (the session cache is
    /// stateful, for 0-RTT), so the 20,000-entry cache then covers 20,000 phones.
    pub session_tickets: usize,
    /// Tokio worker threads. 1 runs a current-thread runtime, which drove quinn 1.5–3× faster
    /// than a multi-thread runtime on this project's 2-core machines (shared/BASELINES.md).
    pub worker_threads: usize,
    /// When a message is acknowledged: `sync` (after fsync, the default: an acknowledged
    /// message survives power loss; group commit keeps it fast) or `buffered` (after the write
    /// reaches the OS: survives a crash of the server, not of the machine).
    pub durability: crate::store::Durability,
    /// Inbox entries a device may be behind before sync answers "too long" and the device
    /// resynchronises from conversation heads. 20,000 is a few days of a busy user; beyond it,
    /// paging every entry costs more than fetching the heads and recent history.
    pub sync_limit: u64,
    /// Users, and separately conversations, the store's writer keeps in memory (about 200
    /// bytes each, more for large groups). 100,000 keeps every active user of a busy node
    /// cached; past it, those with nothing waiting for an fsync are dropped and reloaded from
    /// disk on next use, so made-up recipients cannot grow memory without end.
    pub store_cache_entries: usize,
    /// Run the storage threads (the writer, the fsync stage, fjall's flush and compaction
    /// workers) under Linux's `SCHED_BATCH` policy: the same share of the CPU, but a wake-up
    /// waits for the running thread's time slice instead of preempting it, and on a busy node
    /// that thread is most often the network thread. On: with 1,000 busy clients on 2 cores,
    /// 1.09× the `direct` throughput for 6–13% less server CPU per message and a p99 about
    /// 10% higher; no clear effect with 100 (bench/README.md, session 18). Off keeps the
    /// default policy. No effect on other systems.
    pub storage_batch_scheduling: bool,
    /// Conversations (direct or group) one user may start per minute, after a burst of
    /// `conversation_starts_burst`; 0 turns the limit off. Every conversation is stored for
    /// good, so without a limit one client could fill disk by messaging made-up users. 30 a
    /// minute after 200 at once is far above a person's pace (an app importing contacts
    /// starts many at once, hence the burst) and caps a runaway client at 43,000 a day.
    pub conversation_starts_per_minute: u32,
    pub conversation_starts_burst: u32,
    /// Members one user may add to groups per minute (creating a group adds every member but
    /// the creator), after a burst of `member_additions_burst`; 0 turns the limit off. Each
    /// member is stored (membership, the member's conversation list, an event in every
    /// member's inbox), so without a limit a client starting groups at the allowed rate could
    /// store `max_group_members` made-up members with each. The burst fills one group of the
    /// default maximum size at once; 1,000 a minute then is an admin adding people all day.
    pub member_additions_per_minute: u32,
    pub member_additions_burst: u32,
    /// Messages a user may send per minute, over all their devices and conversations, after
    /// a burst of `messages_burst`; 0 turns the limit off. Every message is stored for good
    /// and fanned out by the one storage writer, so one user sending flat out would take the
    /// disk and the writer's capacity from everyone else. 6,000 a minute (100 a second) is
    /// far above a person and most bots; the burst of 1,000 covers a device sending what it
    /// queued while offline. A send past it fails with `RATE_LIMITED` and how long to wait,
    /// and stores nothing; a repeat of a message already stored is answered, not counted.
    pub messages_per_minute: u32,
    pub messages_burst: u32,
    /// Largest group whose members see each other's presence and typing. Both are one
    /// datagram per online member, on the runtime thread: in a group of 10,000 one presence
    /// change or typing event would be up to 10,000 datagrams, and a few active members
    /// hundreds of thousands a second. 256 covers family, team and class groups; direct
    /// conversations always carry both. Messages are not affected.
    pub presence_max_group_members: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 4433)),
            data_dir: PathBuf::from("data"),
            cert: None,
            key: None,
            certs_dir: PathBuf::from("certs"),
            jwt_secret: None,
            auth_timeout_secs: 5,
            idle_timeout_secs: 60,
            max_frame_bytes: tern_protocol::DEFAULT_MAX_FRAME_BYTES as u32,
            max_message_bytes: 64 * 1024,
            max_group_members: 10_000,
            udp_buffer_bytes: 4 * 1024 * 1024,
            max_client_bidi_streams: 64,
            segmentation_offload: false,
            mtu_discovery: false,
            session_tickets: 1,
            worker_threads: 1,
            durability: crate::store::Durability::Sync,
            sync_limit: 20_000,
            store_cache_entries: 100_000,
            storage_batch_scheduling: true,
            conversation_starts_per_minute: 30,
            conversation_starts_burst: 200,
            member_additions_per_minute: 1_000,
            member_additions_burst: 10_000,
            messages_per_minute: 6_000,
            messages_burst: 1_000,
            presence_max_group_members: 256,
        }
    }
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; missing fields take their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cert.is_some() != self.key.is_some() {
            return Err(ConfigError::Invalid("--cert and --key go together".into()));
        }
        if self.max_message_bytes >= self.max_frame_bytes {
            return Err(ConfigError::Invalid(
                "max_message_bytes must be below max_frame_bytes (the envelope needs room)".into(),
            ));
        }
        if self.auth_timeout_secs == 0 || self.idle_timeout_secs == 0 {
            return Err(ConfigError::Invalid("timeouts must be positive".into()));
        }
        if self.store_cache_entries == 0 {
            return Err(ConfigError::Invalid(
                "store_cache_entries must be at least 1".into(),
            ));
        }
        if self.max_client_bidi_streams < 2 {
            return Err(ConfigError::Invalid(
                "max_client_bidi_streams must be at least 2".into(),
            ));
        }
        Ok(())
    }

    pub fn auth_timeout(&self) -> Duration {
        Duration::from_secs(self.auth_timeout_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        let config: Config = toml::from_str("").unwrap();
        assert_eq!(config.listen.port(), 4433);
        config.validate().unwrap();
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<Config>("lisen = \"[::]:1\"").is_err());
    }

    #[test]
    fn cert_without_key_is_invalid() {
        let config = Config {
            cert: Some("x.pem".into()),
            ..Config::default()
        };
        assert!(config.validate().is_err());
    }
}
