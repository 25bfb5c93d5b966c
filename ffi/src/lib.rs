//! UniFFI bindings of the tern client for Kotlin (Android), Swift (iOS) and Python.
//!
//! The app creates a [`TernClient`] with [`TernClient::connect`], passing a [`TernListener`]
//! it implements; events (messages, receipts, presence, typing, connection state) arrive on
//! the listener from a thread of the client's own, so a slow callback never stalls the
//! network. Every call that waits on the network is `suspend` in Kotlin and `async` in Swift
//! and Python. Errors are one enum, [`TernError`]. See `ffi/README.md`.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod client;
mod error;
mod listener;
mod runtime;
mod types;

pub use client::{TernClient, live_clients};
pub use error::{TernError, TernErrorCode};
pub use listener::TernListener;
pub use types::*;

uniffi::setup_scaffolding!();
