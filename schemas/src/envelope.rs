//! The versioned envelope every event travels in.

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::ids::{CorrelationId, EventId, HostName};
use crate::time::Timestamp;

/// The schema version this build writes and reads. Bump only with a migration plan (ADR 0001).
pub const SCHEMA_VERSION: u16 = 1;

/// Field order is the wire format; `schema_version` must stay first so any reader can check it
/// before decoding the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub schema_version: u16,
    /// UUIDv7; also the `Nats-Msg-Id` header, so a retried publish is stored once.
    pub event_id: EventId,
    pub occurred_at: Timestamp,
    /// The host agent that published it; `None` for the control plane.
    pub host: Option<HostName>,
    /// The event that caused this one.
    pub causation_id: Option<EventId>,
    /// The request this event belongs to, across every event it caused.
    pub correlation_id: Option<CorrelationId>,
    pub body: Event,
}

impl Envelope {
    /// A new envelope stamped now, with a fresh id; `host` is the body's agent host, if any.
    pub fn new(body: Event) -> Self {
        Self::at(EventId::new_v7(), Timestamp::now(), body)
    }

    /// An envelope with an explicit id and time (tests, golden vectors, replays).
    pub fn at(event_id: EventId, occurred_at: Timestamp, body: Event) -> Self {
        Self {
            schema_version: SCHEMA_VERSION,
            event_id,
            occurred_at,
            host: body.agent_host().cloned(),
            causation_id: None,
            correlation_id: None,
            body,
        }
    }

    /// Marks this event as caused by `parent`, inheriting its correlation (or starting one
    /// from the parent's id).
    pub fn caused_by(mut self, parent: &Envelope) -> Self {
        self.causation_id = Some(parent.event_id);
        self.correlation_id = Some(
            parent
                .correlation_id
                .unwrap_or(CorrelationId(parent.event_id.0)),
        );
        self
    }

    pub fn with_correlation(mut self, correlation: CorrelationId) -> Self {
        self.correlation_id = Some(correlation);
        self
    }
}
