//! Core NATS (not the stream): the command requests a queue group of command services shares,
//! and the agents' heartbeats (ADR 0008). Typed here so no other crate holds a NATS client.
//!
//! Every subscription below is held by the server when the call returns: after the SUB, a
//! request on the same connection ([`Bus::last_sequence`]) comes back only once the server
//! has read the SUB before it (`flush` only empties the socket buffer). A message another
//! connection publishes after that reaches the subscriber.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tracing::{debug, warn};
use usbpt_schemas::heartbeat::Heartbeat;
use usbpt_schemas::{subjects, HostName};

use crate::client::{Bus, BusError};

/// One core-NATS message: a command request, or what a plain subscription sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub subject: String,
    pub payload: Bytes,
    /// Where the sender waits for an answer ([`Bus::respond`]); `None` for a publish.
    pub reply: Option<String>,
}

impl From<async_nats::Message> for Message {
    fn from(m: async_nats::Message) -> Self {
        Self {
            subject: m.subject.to_string(),
            payload: m.payload,
            reply: m.reply.map(|r| r.to_string()),
        }
    }
}

/// The messages of a subscription, in arrival order; ends when the connection is closed for
/// good (the client resubscribes by itself after a reconnection).
pub struct Messages {
    inner: async_nats::Subscriber,
}

impl std::fmt::Debug for Messages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Messages").finish_non_exhaustive()
    }
}

impl Stream for Messages {
    type Item = Message;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        self.inner.poll_next_unpin(cx).map(|m| m.map(Message::from))
    }
}

/// One heartbeat as [`Beats`] yields it: the sender host (from the subject) and its beat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    pub host: HostName,
    pub beat: Heartbeat,
}

/// The heartbeats of every host: only valid beats on well-formed subjects; the others are
/// logged and passed over (a beat carries nothing to quarantine: the next one replaces it).
pub struct Beats {
    inner: Messages,
}

impl std::fmt::Debug for Beats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Beats").finish_non_exhaustive()
    }
}

impl Stream for Beats {
    type Item = Beat;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Beat>> {
        loop {
            let Some(msg) = std::task::ready!(self.inner.poll_next_unpin(cx)) else {
                return Poll::Ready(None);
            };
            let Some(host) = subjects::heartbeat_host(&msg.subject) else {
                debug!(subject = %msg.subject, "heartbeat on a malformed subject");
                continue;
            };
            match Heartbeat::parse(&msg.payload) {
                Ok(beat) => return Poll::Ready(Some(Beat { host, beat })),
                Err(e) => warn!(%host, error = %e, "heartbeat ignored"),
            }
        }
    }
}

impl Bus {
    /// Subscribes to `subject` (wildcards allowed); held by the server on return.
    pub async fn subscribe(&self, subject: &str) -> Result<Messages, BusError> {
        let inner = self
            .client
            .subscribe(subject.to_owned())
            .await
            .map_err(|e| subscribe_err(subject, e))?;
        self.last_sequence().await?;
        Ok(Messages { inner })
    }

    /// Joins the queue group `queue` on `subject`: each request goes to one member. Answer
    /// one with [`Bus::respond`]. Held by the server on return.
    pub async fn requests(&self, subject: &str, queue: &str) -> Result<Messages, BusError> {
        let inner = self
            .client
            .queue_subscribe(subject.to_owned(), queue.to_owned())
            .await
            .map_err(|e| subscribe_err(subject, e))?;
        self.last_sequence().await?;
        Ok(Messages { inner })
    }

    /// Answers `request`; a request nobody waits for (no reply subject) needs no answer.
    pub async fn respond(&self, request: &Message, body: Vec<u8>) -> Result<(), BusError> {
        let Some(to) = &request.reply else {
            return Ok(());
        };
        self.client
            .publish(to.clone(), body.into())
            .await
            .map_err(|e| BusError::Publish {
                subject: to.clone(),
                kind: crate::PublishFailure::Unavailable,
                message: e.to_string(),
            })
    }

    /// Sends `host`'s beat ([`subjects::heartbeat`]), fire and forget: nothing says it
    /// arrived. A `stopping` beat, the last one, has left this process when this returns
    /// (flushed); an `alive` beat goes with the client's next write.
    pub async fn beat(&self, host: &HostName, beat: &Heartbeat) -> Result<(), BusError> {
        let subject = subjects::heartbeat(host);
        let fail = |message: String| BusError::Publish {
            subject: subject.clone(),
            kind: crate::PublishFailure::Unavailable,
            message,
        };
        self.client
            .publish(subject.clone(), beat.encode().into())
            .await
            .map_err(|e| fail(e.to_string()))?;
        if *beat == Heartbeat::Stopping {
            self.client.flush().await.map_err(|e| fail(e.to_string()))?;
        }
        Ok(())
    }

    /// Every host's beats ([`subjects::ALL_HEARTBEATS`]), validated; held by the server on
    /// return.
    pub async fn heartbeats(&self) -> Result<Beats, BusError> {
        Ok(Beats {
            inner: self.subscribe(subjects::ALL_HEARTBEATS).await?,
        })
    }

    /// What the server said of itself when this connection was made (limits, whether it
    /// requires authentication or TLS).
    pub fn server_info(&self) -> async_nats::ServerInfo {
        self.client.server_info()
    }
}

fn subscribe_err(subject: &str, e: impl std::fmt::Display) -> BusError {
    BusError::StreamRequest(format!("subscribing to {subject}: {e}"))
}
