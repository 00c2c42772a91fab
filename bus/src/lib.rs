//! usbpt's bus: the `USBPT_EVENTS` JetStream stream, idempotent and fenced publishes of typed
//! envelopes, durable pull consumers, and a private `nats-server` process for `usbpt up`,
//! `usbpt demo` and tests.
//!
//! Subject names come from [`usbpt_schemas::subjects`]; this crate never formats one.

pub mod admin;
pub mod auth;
mod client;
mod core_nats;
mod durable;
mod reader;
pub mod server;
mod stream;

pub use client::{
    Bus, BusError, ClientSecurity, PendingAck, PublishFailure, Published, StartAt, TlsClient,
};
pub use core_nats::{Beat, Beats, Message, Messages};
pub use durable::{Acker, Durable, Received};
pub use reader::{Delivery, Reader, ReaderOptions};
pub use stream::{StreamError, StreamSettings};

/// Re-exported so callers name consumer and message types without depending on async-nats.
pub use async_nats;
