//! Stream administration, for the bench's scratch servers, test set-ups and operators' tools:
//! what the admin identity does besides publishing and reading (create a stream with chosen
//! settings, delete it or one message, read its state, wait for a cluster's JetStream). Keeps
//! `async_nats` inside this crate.

use std::time::Duration;

use async_nats::jetstream::context::{DeleteStreamErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, ErrorCode};

use crate::{BusError, StreamSettings};

/// A plain connection to a server's JetStream API, with no stream of its own.
#[derive(Clone, Debug)]
pub struct StreamAdmin {
    client: async_nats::Client,
    js: jetstream::Context,
}

/// What a stream holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamState {
    pub last_sequence: u64,
    pub messages: u64,
    pub replicas: usize,
}

fn request_error(e: impl std::fmt::Display) -> BusError {
    BusError::StreamRequest(e.to_string())
}

impl StreamAdmin {
    /// Connects without credentials to `url` (one URL, or several separated by commas: the
    /// client fails over between them).
    pub async fn connect(url: &str) -> Result<Self, BusError> {
        let addrs = url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BusError::StreamRequest(format!("bad NATS URL: {e}")))?;
        let client = async_nats::ConnectOptions::new()
            .name("usbpt-admin")
            .connection_timeout(Duration::from_secs(5))
            .connect(addrs)
            .await
            .map_err(|source| BusError::Connect {
                url: crate::auth::redact_url(url),
                source,
            })?;
        let js = jetstream::new(client.clone());
        Ok(Self { client, js })
    }

    /// The server's version, as it reports it.
    pub fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// Whether the JetStream API answers (a cluster answers only once it has a meta leader).
    pub async fn jetstream_ready(&self) -> bool {
        self.js.query_account().await.is_ok()
    }

    /// Creates usbpt's stream with `settings`; with `allow_message_delete`, single messages may
    /// be deleted later (usbpt itself never does: the stream is the audit trail).
    pub async fn create_stream(
        &self,
        settings: &StreamSettings,
        allow_message_delete: bool,
    ) -> Result<(), BusError> {
        let mut config = settings.config();
        config.deny_delete = !allow_message_delete;
        self.js
            .create_stream(config)
            .await
            .map(|_| ())
            .map_err(request_error)
    }

    /// Deletes the stream `name` with its consumers; `false` when there was none.
    pub async fn delete_stream(&self, name: &str) -> Result<bool, BusError> {
        match self.js.delete_stream(name).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), DeleteStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
                Ok(false)
            }
            Err(e) => Err(request_error(e)),
        }
    }

    /// Whether a stream `name` exists.
    pub async fn stream_exists(&self, name: &str) -> Result<bool, BusError> {
        match self.js.get_stream(name).await {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
                Ok(false)
            }
            Err(e) => Err(request_error(e)),
        }
    }

    /// The stream's last sequence, message count and replica count.
    pub async fn stream_state(&self, name: &str) -> Result<StreamState, BusError> {
        let mut stream = self.js.get_stream(name).await.map_err(request_error)?;
        let info = stream.info().await.map_err(request_error)?;
        Ok(StreamState {
            last_sequence: info.state.last_sequence,
            messages: info.state.messages,
            replicas: info.config.num_replicas,
        })
    }

    /// Deletes one message (refused by a stream created with deletes denied).
    pub async fn delete_message(&self, name: &str, seq: u64) -> Result<bool, BusError> {
        let stream = self.js.get_stream(name).await.map_err(request_error)?;
        stream.delete_message(seq).await.map_err(request_error)
    }
}
