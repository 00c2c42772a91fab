//! Durable, acknowledged reads: [`Durable`], a named pull consumer read by a fetch loop (the
//! projector's and each agent's control consumer). Creating, reusing and deleting the consumer
//! is here, so no crate above `bus` handles one.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;
use tracing::{info, warn};

use crate::client::BusError;
use crate::reader::Delivery;

/// A delivery that must be acknowledged once it has been acted on.
#[derive(Debug)]
pub struct Received {
    pub delivery: Delivery,
    /// Messages still waiting in the consumer after this one (the consumer's lag).
    pub pending: u64,
    message: async_nats::jetstream::Message,
}

impl Received {
    /// The delivery, and what acknowledges it (for a caller that keeps only the last one's).
    pub fn into_parts(self) -> (Delivery, Acker) {
        (self.delivery, Acker(self.message))
    }

    /// Acknowledges this delivery (with `AckPolicy::All`, also every one before it).
    pub async fn ack(&self) -> Result<(), BusError> {
        self.message.ack().await.map_err(|e| BusError::Consumer {
            name: "ack".into(),
            message: e.to_string(),
        })
    }
}

/// Acknowledges one delivery (see [`Received::into_parts`]).
#[derive(Debug)]
pub struct Acker(async_nats::jetstream::Message);

impl Acker {
    /// Acknowledges the delivery (with `AckPolicy::All`, also every one before it).
    pub async fn ack(&self) -> Result<(), BusError> {
        self.0.ack().await.map_err(|e| BusError::Consumer {
            name: "ack".into(),
            message: e.to_string(),
        })
    }
}

/// A named durable pull consumer, opened at a resume point and read a fetch at a time.
#[derive(Debug)]
pub struct Durable {
    stream: Stream,
    name: String,
    filter: Option<String>,
    ack_wait: Duration,
    consumer: Option<PullConsumer>,
}

impl Durable {
    pub(crate) fn new(
        stream: Stream,
        name: &str,
        filter: Option<String>,
        ack_wait: Duration,
    ) -> Self {
        Self {
            stream,
            name: name.to_owned(),
            filter,
            ack_wait,
            consumer: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True while a consumer is open; after a failed fetch or [`Durable::delete`] it is not,
    /// and the caller opens it again at its resume point.
    pub fn is_open(&self) -> bool {
        self.consumer.is_some()
    }

    /// Opens the consumer so that its next delivery is stream sequence `resume_after + 1`. An
    /// existing consumer is reused only when it is exactly there (its ack floor at
    /// `resume_after`, nothing waiting for an ack, the same ack wait); otherwise it is deleted
    /// and made again from there. Returns true when it was made afresh (a jump before its first
    /// delivery is then a hole in the stream, not a lost delivery).
    pub async fn open_at(&mut self, resume_after: u64) -> Result<bool, BusError> {
        let reusable = match self.stream.consumer_info(&self.name).await {
            Ok(info) => {
                info.ack_floor.stream_sequence == resume_after
                    && info.num_ack_pending == 0
                    && info.config.ack_wait == self.ack_wait
            }
            Err(_) => false,
        };
        if !reusable {
            let _ = self.stream.delete_consumer(&self.name).await;
            info!(
                consumer = %self.name,
                resume_after, "creating the durable consumer"
            );
        }
        let consumer = crate::client::pull_consumer_on(
            &self.stream,
            &self.name,
            self.filter.clone(),
            resume_after,
            self.ack_wait,
        )
        .await?;
        self.consumer = Some(consumer);
        Ok(!reusable)
    }

    /// Opens the consumer where the server has it (creating it from the stream's start when
    /// absent): for a consumer whose position lives on the server only, like an agent's
    /// control consumer.
    pub async fn open(&mut self) -> Result<(), BusError> {
        let consumer = crate::client::pull_consumer_on(
            &self.stream,
            &self.name,
            self.filter.clone(),
            0,
            self.ack_wait,
        )
        .await?;
        self.consumer = Some(consumer);
        Ok(())
    }

    /// Fetches up to `max` deliveries, waiting up to `wait` for the first. A failure closes
    /// the consumer (what was received before it is returned, and is good).
    pub async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Received>, BusError> {
        let Some(consumer) = self.consumer.clone() else {
            return Err(BusError::Consumer {
                name: self.name.clone(),
                message: "not open".into(),
            });
        };
        let fail = |message: String| BusError::Consumer {
            name: self.name.clone(),
            message,
        };
        let mut batch = match consumer
            .fetch()
            .max_messages(max)
            .expires(wait)
            .messages()
            .await
        {
            Ok(b) => b,
            Err(e) => {
                self.consumer = None;
                return Err(fail(e.to_string()));
            }
        };
        let mut out = Vec::with_capacity(max.min(4_096));
        // Bounded like the reader's fetches: a fetch the server never answers ends here.
        // One deadline for the whole fetch (not a timer per message): the server answers by
        // `wait`; a little more and it never will.
        let deadline = tokio::time::Instant::now() + wait + Duration::from_secs(2);
        let mut ended: Option<String> = None;
        let collected = tokio::time::timeout_at(deadline, async {
            while let Some(m) = batch.next().await {
                match m {
                    Ok(m) => match m.info() {
                        Ok(i) => {
                            let (seq, pending) = (i.stream_sequence, i.pending);
                            out.push(Received {
                                delivery: Delivery::from_message(&m, seq),
                                pending,
                                message: m,
                            });
                        }
                        Err(e) => {
                            ended = Some(format!("message metadata: {e}"));
                            return;
                        }
                    },
                    Err(e) => {
                        ended = Some(e.to_string());
                        return;
                    }
                }
            }
        })
        .await;
        if collected.is_err() {
            ended.get_or_insert_with(|| "the fetch got no answer in time".into());
        }
        if let Some(e) = ended {
            self.consumer = None;
            // What was received is still good; the rest is fetched again.
            if out.is_empty() {
                return Err(fail(e));
            }
            warn!(consumer = %self.name, error = %e, "fetch ended early");
        }
        Ok(out)
    }

    /// Deletes the consumer on the server (after a gap): the next [`Durable::open_at`] makes it
    /// again at the resume point.
    pub async fn delete(&mut self) {
        if let Err(e) = self.stream.delete_consumer(&self.name).await {
            warn!(consumer = %self.name, error = %e, "deleting the consumer");
        }
        self.consumer = None;
    }
}
