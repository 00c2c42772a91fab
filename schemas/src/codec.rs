//! postcard encoding of envelopes, with typed decode errors. Decoding never panics, whatever
//! the input (see the property tests).

use thiserror::Error;

use serde::Deserialize;

use crate::envelope::{Envelope, SCHEMA_VERSION};
use crate::events::EVENT_VARIANTS;
use crate::ids::{CorrelationId, EventId, HostName};
use crate::time::Timestamp;

/// The envelope's fields before `body`, in the same order, to find where the body starts.
#[derive(Deserialize)]
#[allow(dead_code)]
struct Header {
    schema_version: u16,
    event_id: EventId,
    occurred_at: Timestamp,
    host: Option<HostName>,
    causation_id: Option<EventId>,
    correlation_id: Option<CorrelationId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("unknown schema version {found} (this build reads version {SCHEMA_VERSION})")]
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

/// Encodes an envelope. Fails only if the value cannot be represented (never for valid types).
pub fn encode(envelope: &Envelope) -> Result<Vec<u8>, EncodeError> {
    Ok(postcard::to_allocvec(envelope)?)
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
    if version != SCHEMA_VERSION {
        return Err(DecodeError::UnknownSchemaVersion { found: version });
    }
    // serde reports an unknown variant index as a generic custom error; check it ourselves so
    // a newer writer's event is told apart from a corrupt field.
    let (_, body) = postcard::take_from_bytes::<Header>(bytes).map_err(map_err)?;
    let (variant, _) = postcard::take_from_bytes::<u32>(body).map_err(map_err)?;
    if variant >= EVENT_VARIANTS {
        return Err(DecodeError::UnknownVariant);
    }
    let (envelope, rest) = postcard::take_from_bytes::<Envelope>(bytes).map_err(map_err)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes { count: rest.len() });
    }
    Ok(envelope)
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
