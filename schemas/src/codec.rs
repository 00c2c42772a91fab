//! postcard encoding of envelopes, with typed decode errors. Decoding never panics, whatever
//! the input (see the property tests).

use thiserror::Error;

use serde::{Deserialize, Serialize};

use crate::envelope::{Envelope, SCHEMA_VERSION, SCHEMA_VERSION_V1};
use crate::events::{Event, EVENT_VARIANTS};
use crate::ids::{CorrelationId, EventId, HostName};
use crate::origin::Origin;
use crate::time::Timestamp;

/// The fields every version starts with, in wire order (version 1's fields before `body`):
/// decoding reads it first to find where the origin (version 2) or the body starts.
#[derive(Serialize, Deserialize)]
struct Header {
    schema_version: u16,
    event_id: EventId,
    occurred_at: Timestamp,
    host: Option<HostName>,
    causation_id: Option<EventId>,
    correlation_id: Option<CorrelationId>,
}

/// The wire layouts (ADR 0002, ADR 0014). Version 1: the header, then the body. Version 2: the
/// header, then the origin, then the body; a reader of version 1's header reads version 2's.
#[derive(Serialize)]
struct WireV1<'a> {
    header: Header,
    body: &'a Event,
}

#[derive(Serialize)]
struct WireV2<'a> {
    header: Header,
    origin: &'a Origin,
    body: &'a Event,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error(
        "unknown schema version {found} (this build reads versions {SCHEMA_VERSION_V1} to \
         {SCHEMA_VERSION})"
    )]
    UnknownSchemaVersion { found: u16 },
    #[error("truncated payload: input ended inside the envelope")]
    Truncated,
    #[error("{count} trailing byte(s) after the envelope")]
    TrailingBytes { count: usize },
    #[error("unknown enum variant (an event or field from a newer or corrupt writer)")]
    UnknownVariant,
    #[error("invalid value in payload: {0}")]
    Invalid(String),
}

#[derive(Debug, Error)]
#[error("cannot encode envelope: {0}")]
pub struct EncodeError(#[from] postcard::Error);

/// Encodes an envelope: version 1 (the same bytes as before ADR 0014) without an origin,
/// version 2 with one, whatever `schema_version` says. Fails only if the value cannot be
/// represented (never for valid types).
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, EncodeError> {
    let header = |version| Header {
        schema_version: version,
        event_id: envelope.event_id,
        occurred_at: envelope.occurred_at,
        host: envelope.host.clone(),
        causation_id: envelope.causation_id,
        correlation_id: envelope.correlation_id,
    };
    Ok(match &envelope.origin {
        None => postcard::to_allocvec(&WireV1 {
            header: header(SCHEMA_VERSION_V1),
            body: &envelope.body,
        })?,
        Some(origin) => postcard::to_allocvec(&WireV2 {
            header: header(SCHEMA_VERSION),
            origin,
            body: &envelope.body,
        })?,
    })
}

/// An envelope encoded once, beside the subject it is published on: what the agent's outbox
/// stores and publishes as stored (no decode and re-encode between the resolver's commit and the
/// stream). `event_id` is the envelope's own, kept for `Nats-Msg-Id` and the duplicate check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Sealed {
    pub subject: String,
    pub event_id: EventId,
    pub bytes: Vec<u8>,
}

impl Sealed {
    /// Encodes `envelope` and names its subject ([`crate::subjects::for_event`]).
    pub fn seal(envelope: &Envelope) -> Result<Self, EncodeError> {
        Ok(Self {
            subject: crate::subjects::for_event(envelope),
            event_id: envelope.event_id,
            bytes: encode(envelope)?,
        })
    }
}

/// Decodes one envelope that must fill `bytes` exactly.
pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let (version, _) = postcard::take_from_bytes::<u16>(bytes).map_err(map_err)?;
    if version != SCHEMA_VERSION_V1 && version != SCHEMA_VERSION {
        return Err(DecodeError::UnknownSchemaVersion { found: version });
    }
    let (header, rest) = postcard::take_from_bytes::<Header>(bytes).map_err(map_err)?;
    let (origin, body) = if version == SCHEMA_VERSION {
        let (origin, body) = postcard::take_from_bytes::<Origin>(rest).map_err(map_err)?;
        (Some(origin), body)
    } else {
        (None, rest)
    };
    // serde reports an unknown variant index as a generic custom error; check it ourselves so
    // a newer writer's event is told apart from a corrupt field.
    let (variant, _) = postcard::take_from_bytes::<u32>(body).map_err(map_err)?;
    if variant >= EVENT_VARIANTS {
        return Err(DecodeError::UnknownVariant);
    }
    let (body, rest) = postcard::take_from_bytes::<Event>(body).map_err(map_err)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { count: rest.len() });
    }
    Ok(Envelope {
        schema_version: header.schema_version,
        event_id: header.event_id,
        occurred_at: header.occurred_at,
        host: header.host,
        causation_id: header.causation_id,
        correlation_id: header.correlation_id,
        origin,
        body,
    })
}

fn map_err(e: postcard::Error) -> DecodeError {
    use postcard::Error as P;
    match e {
        P::DeserializeUnexpectedEnd => DecodeError::Truncated,
        P::DeserializeBadEnum => DecodeError::UnknownVariant,
        P::SerdeDeCustom => DecodeError::Invalid("a field failed validation".into()),
        other => DecodeError::Invalid(other.to_string()),
    }
}
