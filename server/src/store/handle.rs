//! What sessions hand the storage writer: commands, their answers, and the handle that
//! queues them ([`WriterHandle`]).

use std::sync::Arc;

use serde::Deserialize;
use tern_protocol::pb::{self, MemberRole};
use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// When a write is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After fsync: an acknowledged message survives power loss. Group commit keeps this fast.
    #[default]
    Sync,
    /// After the write reaches the OS: survives a crash of tern (even `kill -9`), not of the
    /// machine.
    Buffered,
}

/// Where a message goes.
#[derive(Debug, Clone)]
pub enum Target {
    Conversation(String),
    /// The direct conversation with this user, created on first send.
    Direct(String),
}

/// The stored message a send produced (or had produced, for a retried client id).
#[derive(Debug, Clone)]
pub struct SendOutcome {
    /// Its ids: message id, conversation, seq and time (what the sender's ack carries). The
    /// body, and for a new message the sender fields, are left out.
    pub message: pb::Message,
    pub duplicate: bool,
    /// The sender's own inbox sequence for this message.
    pub sender_inbox_seq: u64,
}

/// A change to a group.
#[derive(Debug, Clone)]
pub enum GroupOp {
    Create {
        name: String,
        members: Vec<String>,
    },
    Add {
        conversation: String,
        users: Vec<String>,
    },
    Remove {
        conversation: String,
        user: String,
    },
    Leave {
        conversation: String,
    },
    Dissolve {
        conversation: String,
    },
    SetRole {
        conversation: String,
        user: String,
        role: MemberRole,
    },
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Command {
    Send {
        sender: Arc<str>,
        device: Arc<str>,
        target: Target,
        msg: pb::SendMessage,
        reply: Reply<SendOutcome>,
    },
    Group {
        actor: Arc<str>,
        op: GroupOp,
        reply: Reply<pb::Conversation>,
    },
    MarkRead {
        user: Arc<str>,
        conversation: String,
        up_to: u64,
        reply: Reply<u64>,
    },
    Ack {
        user: Arc<str>,
        device: Arc<str>,
        up_to: u64,
    },
}

impl Command {
    /// Answers with the storage failure, without doing anything.
    pub(super) fn refuse(self) {
        let error = || StoreError::Failed;
        match self {
            Command::Send { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::Group { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::MarkRead { reply, .. } => {
                let _ = reply.send(Err(error()));
            }
            Command::Ack { .. } => {}
        }
    }
}

/// Cheap to clone; every session holds one.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    pub(super) tx: mpsc::Sender<Command>,
}

impl WriterHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Stores a message and answers once it is durable.
    pub async fn send(
        &self,
        sender: Arc<str>,
        device: Arc<str>,
        target: Target,
        msg: pb::SendMessage,
    ) -> Result<SendOutcome, StoreError> {
        self.send_pipelined(sender, device, target, msg)
            .await?
            .await
            .map_err(|_| StoreError::WriterGone)?
    }

    /// Queues a send without waiting; the answer arrives on the returned receiver. Lets a
    /// conversation stream pipeline many sends while keeping their order.
    pub async fn send_pipelined(
        &self,
        sender: Arc<str>,
        device: Arc<str>,
        target: Target,
        msg: pb::SendMessage,
    ) -> Result<oneshot::Receiver<Result<SendOutcome, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Send {
                sender,
                device,
                target,
                msg,
                reply,
            })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        Ok(rx)
    }

    pub async fn group(
        &self,
        actor: Arc<str>,
        op: GroupOp,
    ) -> Result<pb::Conversation, StoreError> {
        self.call(|reply| Command::Group { actor, op, reply }).await
    }

    /// Marks `conversation` read up to `up_to`; returns the user's read mark afterwards.
    pub async fn mark_read(
        &self,
        user: Arc<str>,
        conversation: String,
        up_to: u64,
    ) -> Result<u64, StoreError> {
        self.call(|reply| Command::MarkRead {
            user,
            conversation,
            up_to,
            reply,
        })
        .await
    }

    /// Records a device's cumulative acknowledgement (no answer: cursors are hints).
    pub async fn ack(
        &self,
        user: Arc<str>,
        device: Arc<str>,
        up_to: u64,
    ) -> Result<(), StoreError> {
        self.tx
            .send(Command::Ack {
                user,
                device,
                up_to,
            })
            .await
            .map_err(|_| StoreError::WriterGone)
    }
}
