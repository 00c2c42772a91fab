//! The versioned envelope every event travels in.

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::ids::{CorrelationId, EventId, HostName};
use crate::origin::Origin;
use crate::time::Timestamp;

/// The newest envelope version this build writes and reads. Bump only with a migration plan
/// (ADR 0001). Version 2 (ADR 0014) is version 1 with the command's [`Origin`] between the
/// header and the body; an envelope without an origin is still written as version 1, byte for
/// byte, so agents' events and every older vector are unchanged.
pub const SCHEMA_VERSION: u16 = 2;

/// The version of an envelope without an origin (what every agent event is).
pub const SCHEMA_VERSION_V1: u16 = 1;

/// Field order is the wire format (see [`crate::codec`]); `schema_version` must stay first so
/// any reader can check it before decoding the rest. `schema_version` follows `origin`: 1
/// without one, 2 with one ([`Envelope::with_origin`]; [`crate::codec::encode`] writes the
/// version the origin calls for).
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
    /// Who asked for the command that appended this event (version 2); `None` for what agents
    /// report and for events written before ADR 0014.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
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
            schema_version: SCHEMA_VERSION_V1,
            event_id,
            occurred_at,
            host: body.agent_host().cloned(),
            causation_id: None,
            correlation_id: None,
            origin: None,
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

    /// Records who asked (an envelope of version 2); `None` makes it version 1 again.
    pub fn with_origin(mut self, origin: Option<Origin>) -> Self {
        self.schema_version = if origin.is_some() {
            SCHEMA_VERSION
        } else {
            SCHEMA_VERSION_V1
        };
        self.origin = origin;
        self
    }

    pub fn with_correlation(mut self, correlation: CorrelationId) -> Self {
        self.correlation_id = Some(correlation);
        self
    }
}
