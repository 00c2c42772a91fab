//! The one way usbpt reads the stream in order: [`Reader`], a fetch loop over an ephemeral pull
//! consumer, yielding typed [`Delivery`]s.
//!
//! **Why a fetch loop.** async-nats' ordered pull `messages()` keeps one long-lived pull open and
//! relies on idle heartbeats to notice a lost one; measured on this machine kind it went silent
//! for 30 s (two missed heartbeats) in about one of six 1 M-message reads, and a full
//! `usbpt bench` aborted with "ordered read stalled". The projector's fetch loop never stalled.
//! Here every fetch is one bounded request (`expires`), consumed under a client-side deadline;
//! whatever goes wrong — a lost request, a consumer the server dropped, a gap in the consumer's
//! delivery sequence — the reader makes a new consumer from the next stream sequence it needs and
//! goes on. It cannot stall for longer than one fetch's deadline, and it cannot skip or repeat.
//!
//! The consumer is ephemeral, without acks, in memory, and removed by the server
//! [`ReaderOptions::inactive`] after its last fetch, so a reader that is dropped leaves nothing
//! behind for long.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use futures::StreamExt;
use tracing::{debug, warn};
use usbpt_schemas::{codec, Envelope};

use crate::client::{BusError, StartAt};

/// One stored event as a reader delivers it: where it is, and its bytes (decoded on demand, so
/// a reader that only forwards bytes does not pay for decoding, and undecodable bytes are data
/// for the caller to quarantine or show, not an error of the read).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The stream sequence.
    pub seq: u64,
    pub subject: String,
    pub payload: Bytes,
    /// The command handler's signature of control work (ADR 0005), when the message has one.
    pub signature: Option<String>,
}

impl Delivery {
    /// The envelope, or why these bytes are not one.
    pub fn decode(&self) -> Result<Envelope, codec::DecodeError> {
        codec::decode(&self.payload)
    }

    pub(crate) fn from_message(m: &async_nats::jetstream::Message, seq: u64) -> Self {
        Self {
            seq,
            subject: m.subject.to_string(),
            payload: m.payload.clone(),
            // Only control work is signed (ADR 0005): the header is not looked up elsewhere.
            signature: if m
                .subject
                .as_str()
                .starts_with(usbpt_schemas::subjects::CONTROL_PREFIX)
            {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(crate::auth::SIGNATURE_HEADER))
                    .map(|v| v.as_str().to_owned())
            } else {
                None
            },
        }
    }
}

/// How a [`Reader`] fetches.
#[derive(Debug, Clone, Copy)]
pub struct ReaderOptions {
    /// Messages asked for per fetch.
    pub batch: usize,
    /// How long one fetch waits for messages on the server (a long poll: it returns as soon as
    /// the batch is full, or with what it has at the deadline).
    pub wait: Duration,
    /// After how long without a fetch the server removes the consumer.
    pub inactive: Duration,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        Self {
            batch: 2_048,
            wait: Duration::from_secs(5),
            inactive: Duration::from_secs(30),
        }
    }
}

/// How long a reader keeps trying to make a new consumer before [`Reader::next`] gives up: a
/// JetStream leader election in a cluster (a node died) refuses or times out consumer requests
/// for a few seconds, and a reader must outlive it (the reactor did not, and took `usbpt serve`
/// down with it).
const CONSUMER_RETRY: Duration = Duration::from_secs(30);

/// An ordered read of the stream from a position, optionally filtered to a subject pattern.
/// [`Reader::next`] waits for the next event (for ever, on a live stream); it returns an error
/// only when no new consumer could be made for [`CONSUMER_RETRY`] (the stream is gone,
/// permissions refuse it, the cluster has no leader).
pub struct Reader {
    stream: Stream,
    filter: String,
    options: ReaderOptions,
    /// The next stream sequence to deliver from (everything before it has been delivered).
    next_seq: u64,
    consumer: Option<async_nats::jetstream::consumer::PullConsumer>,
    /// The consumer's delivery sequence of the last message taken from it.
    delivered: u64,
    buffered: VecDeque<Delivery>,
    /// New consumers made after the first (gaps, lost fetches, dropped consumers).
    resets: u64,
    /// Since when making a new consumer has failed, if it does.
    failing_since: Option<tokio::time::Instant>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("filter", &self.filter)
            .field("next_seq", &self.next_seq)
            .field("resets", &self.resets)
            .finish_non_exhaustive()
    }
}

impl Reader {
    pub(crate) async fn open(
        stream: Stream,
        start: StartAt,
        filter: Option<String>,
        options: ReaderOptions,
    ) -> Result<Self, BusError> {
        let next_seq = match start {
            StartAt::Beginning => 1,
            StartAt::Sequence(s) => s.max(1),
            // "From now on" is pinned to a sequence at once, so that a consumer made again
            // later starts where this one would have, not at a later "now".
            StartAt::New => {
                let mut s = stream.clone();
                let info = s
                    .info()
                    .await
                    .map_err(|e| BusError::StreamRequest(e.to_string()))?;
                info.state.last_sequence + 1
            }
        };
        let mut reader = Self {
            stream,
            filter: filter.unwrap_or_default(),
            options,
            next_seq,
            consumer: None,
            delivered: 0,
            buffered: VecDeque::new(),
            resets: 0,
            failing_since: None,
        };
        // Fail now, not at the first `next`, when the consumer cannot be made.
        reader.consumer = Some(reader.make_consumer().await?);
        Ok(reader)
    }

    /// The next stream sequence this reader will deliver from.
    pub fn position(&self) -> u64 {
        self.buffered.front().map_or(self.next_seq, |d| d.seq)
    }

    /// How many times the reader had to make a new consumer.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// The next event in stream order.
    pub async fn next(&mut self) -> Result<Delivery, BusError> {
        loop {
            if let Some(d) = self.buffered.pop_front() {
                return Ok(d);
            }
            self.fill(self.options.wait).await?;
        }
    }

    /// What is available now, up to one batch, waiting at most `wait` for the first event; an
    /// empty vector when nothing arrived in time.
    pub async fn next_batch(&mut self, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        if self.buffered.is_empty() {
            self.fill(wait).await?;
        }
        Ok(self.buffered.drain(..).collect())
    }

    /// One fetch into the buffer. Whatever fails makes a new consumer at `next_seq`.
    async fn fill(&mut self, wait: Duration) -> Result<(), BusError> {
        let consumer = match self.consumer.take() {
            Some(c) => c,
            None => match self.make_consumer().await {
                Ok(c) => {
                    self.failing_since = None;
                    c
                }
                Err(e) => {
                    let since = *self
                        .failing_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= CONSUMER_RETRY {
                        return Err(e);
                    }
                    warn!(error = %e, next = self.next_seq, "stream reader: cannot make a consumer (a leader election?); trying again");
                    // A short pause before the retry, not a wait for anything.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    return Ok(());
                }
            },
        };
        let wait = wait.max(Duration::from_millis(100));
        let fetched = consumer
            .fetch()
            .max_messages(self.options.batch)
            .expires(wait)
            .messages()
            .await;
        let mut batch = match fetched {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, next = self.next_seq, "stream reader: fetch refused; making a new consumer");
                self.resets += 1;
                // A short pause before the retry, not a wait for anything.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(());
            }
        };
        // The server answers by `wait`; allow it a little more before deciding it never will.
        // One deadline for the whole fetch, not a timer per message.
        let deadline = tokio::time::Instant::now() + wait + Duration::from_secs(2);
        let (delivered, next_seq, buffered) =
            (&mut self.delivered, &mut self.next_seq, &mut self.buffered);
        let read = tokio::time::timeout_at(deadline, async {
            while let Some(m) = batch.next().await {
                let m = match m {
                    Ok(m) => m,
                    // The consumer is gone or the pull failed: what was taken is good, the rest
                    // comes from a new consumer.
                    Err(e) => return Err(format!("fetch failed: {e}")),
                };
                let (seq, consumer_seq) = match m.info() {
                    Ok(i) => (i.stream_sequence, i.consumer_sequence),
                    Err(e) => return Err(format!("a message without metadata: {e}")),
                };
                if consumer_seq != *delivered + 1 || seq < *next_seq {
                    // A gap (or a repeat): what was taken is good, the rest comes from a new
                    // consumer at the next sequence needed.
                    return Err(format!(
                        "gap: consumer sequence {consumer_seq} where {} was next",
                        *delivered + 1
                    ));
                }
                *delivered = consumer_seq;
                *next_seq = seq + 1;
                buffered.push_back(Delivery::from_message(&m, seq));
            }
            Ok(())
        })
        .await;
        match read {
            // The fetch is over: keep the consumer for the next one.
            Ok(Ok(())) => {
                self.consumer = Some(consumer);
            }
            Ok(Err(why)) => {
                debug!(next = self.next_seq, %why, "stream reader: making a new consumer");
                self.resets += 1;
            }
            Err(_) => {
                warn!(
                    next = self.next_seq,
                    "stream reader: a fetch got no answer in time; making a new consumer"
                );
                self.resets += 1;
            }
        }
        Ok(())
    }

    async fn make_consumer(
        &mut self,
    ) -> Result<async_nats::jetstream::consumer::PullConsumer, BusError> {
        self.delivered = 0;
        let config = pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: self.next_seq,
            },
            ack_policy: AckPolicy::None,
            filter_subject: self.filter.clone(),
            inactive_threshold: self.options.inactive,
            memory_storage: true,
            ..Default::default()
        };
        self.stream
            .create_consumer(config)
            .await
            .map_err(|e| BusError::Consumer {
                name: "reader".into(),
                message: e.to_string(),
            })
    }
}
