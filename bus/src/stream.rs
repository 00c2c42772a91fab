//! The stream's configuration, and the check that an existing stream is one we can run on.

use std::time::Duration;

use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use thiserror::Error;
use usbpt_schemas::subjects;

/// What an operator may choose about the stream. Everything else is fixed by usbpt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// 1 for a single server; 3 for a cluster that must survive the loss of a node.
    pub replicas: usize,
    /// How long a `Nats-Msg-Id` is remembered, so a retried publish is stored once.
    pub duplicate_window: Duration,
    /// The stream's size limit in bytes (-1: none). With discard `new`, a full stream refuses
    /// new events loudly instead of dropping history.
    pub max_bytes: i64,
    /// How long events are kept (0: forever, the default: the history is the audit trail).
    pub max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_bytes: -1,
            max_age: Duration::ZERO,
        }
    }
}

impl StreamSettings {
    /// The full stream config: file storage, limits retention kept forever (the history is
    /// the audit trail), old messages never discarded for space silently (discard new), direct
    /// gets for fenced reads.
    pub fn config(&self) -> Config {
        Config {
            name: subjects::STREAM.to_owned(),
            description: Some("usbpt event history".to_owned()),
            subjects: vec![subjects::ALL_EVENTS.to_owned()],
            storage: StorageType::File,
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::New,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            allow_direct: true,
            deny_delete: true,
            deny_purge: true,
            max_bytes: self.max_bytes,
            max_age: self.max_age,
            ..Default::default()
        }
    }

    /// Why an existing stream's config cannot serve usbpt, if it cannot. Fields an operator may
    /// tune without harm (replicas, duplicate window, `max_bytes`) are not compared; a
    /// `max_age` is accepted only when these settings ask for the same one (an age limit drops
    /// audit history, so it must be chosen on purpose).
    pub fn incompatibility(&self, existing: &Config) -> Option<StreamError> {
        let want = self.config();
        let mismatch = |field: &'static str, want: String, found: String| {
            Some(StreamError::Incompatible { field, want, found })
        };
        if existing.subjects != want.subjects {
            return mismatch(
                "subjects",
                format!("{:?}", want.subjects),
                format!("{:?}", existing.subjects),
            );
        }
        if existing.storage != want.storage {
            return mismatch(
                "storage",
                format!("{:?}", want.storage),
                format!("{:?}", existing.storage),
            );
        }
        if existing.retention != want.retention {
            return mismatch(
                "retention",
                format!("{:?}", want.retention),
                format!("{:?}", existing.retention),
            );
        }
        if existing.duplicate_window.is_zero() {
            return mismatch(
                "duplicate_window",
                format!("{:?}", want.duplicate_window),
                "0s (no deduplication)".to_owned(),
            );
        }
        if existing.max_age != Duration::ZERO && existing.max_age != self.max_age {
            return mismatch(
                "max_age",
                format!("{:?} (0: keep history forever)", self.max_age),
                format!("{:?}", existing.max_age),
            );
        }
        None
    }
}

#[derive(Debug, Error)]
pub enum StreamError {
    #[error("stream USBPT_EVENTS exists with {field} = {found}, but usbpt needs {want}; fix or remove the stream (it holds history: back it up first)")]
    Incompatible {
        field: &'static str,
        want: String,
        found: String,
    },
}
