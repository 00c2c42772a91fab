//! Durable, acknowledged reads: [`Durable`], a named pull consumer read by a fetch loop (the
//! projector's and each agent's control consumer). Creating, reusing and deleting the consumer
//! is here, so no crate above `bus` handles one.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::Context;
use async_nats::StatusCode;
use futures::{FutureExt, StreamExt};
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

/// A named durable pull consumer, opened at a resume point and read a fetch at a time
/// ([`Durable::fetch`]) or from a standing pull request ([`Durable::next`]).
#[derive(Debug)]
pub struct Durable {
    js: Context,
    stream: Stream,
    name: String,
    filter: Option<String>,
    ack_wait: Duration,
    consumer: Option<PullConsumer>,
    /// The standing pull request of [`Durable::next`], if one was made.
    pull: Option<Standing>,
}

/// One long-lived inbox and the pull request standing on it: the server delivers each message
/// as it is stored, with no request, subscription or status message per delivery.
#[derive(Debug)]
struct Standing {
    sub: async_nats::Subscriber,
    inbox: async_nats::Subject,
    /// Messages the request standing may still deliver (0: none stands).
    left: usize,
    /// By when the server answers the request standing (its expiry), with some slack: past it
    /// the request is taken for lost.
    answer_by: tokio::time::Instant,
}

/// What one message on a standing request's inbox is. (Not boxed: a delivery is moved straight
/// into the caller's batch, and a box per event is the kind of cost the standing request saves.)
#[allow(clippy::large_enum_variant)]
enum Arrived {
    Message(Received),
    /// An idle heartbeat: nothing to do.
    Beat,
    /// The request ended (expired, or the server ended it): make another.
    Ended,
}

impl Durable {
    pub(crate) fn new(
        js: Context,
        stream: Stream,
        name: &str,
        filter: Option<String>,
        ack_wait: Duration,
    ) -> Self {
        Self {
            js,
            stream,
            name: name.to_owned(),
            filter,
            ack_wait,
            consumer: None,
            pull: None,
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
        self.pull = None;
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
        self.pull = None;
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
        self.pull = None;
    }

    /// The deliveries that are here, up to `max`, waiting up to `wait` for the first one, from a
    /// pull request that stands between calls (a live follower's read: the projector's).
    ///
    /// [`Durable::fetch`] makes a subscription, a request and an end-of-batch status per call,
    /// so a follower that is caught up pays all three for every event or two. Here one inbox
    /// lives as long as the consumer handle, and one request for up to `max` messages stands for
    /// up to `wait`; the server sends each message as it is stored, and the next request is made
    /// when that one is used up or expires. A request the server does not answer by its expiry
    /// (and a little more) closes the consumer, as a failed fetch does.
    pub async fn next(&mut self, max: usize, wait: Duration) -> Result<Vec<Received>, BusError> {
        let Some(consumer) = self.consumer.clone() else {
            return Err(BusError::Consumer {
                name: self.name.clone(),
                message: "not open".into(),
            });
        };
        let max = max.clamp(1, 10_000);
        let until = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        loop {
            if self.pull.is_none() {
                let client = self.js.client();
                let inbox = async_nats::Subject::from(client.new_inbox());
                match client.subscribe(inbox.clone()).await {
                    Ok(sub) => {
                        self.pull = Some(Standing {
                            sub,
                            inbox,
                            left: 0,
                            answer_by: tokio::time::Instant::now(),
                        })
                    }
                    Err(e) => return Err(self.closed(e.to_string())),
                }
            }
            let Some(pull) = self.pull.as_mut() else {
                continue;
            };
            if pull.left == 0 {
                let request = BatchConfig {
                    batch: max,
                    expires: Some(wait),
                    ..BatchConfig::default()
                };
                if let Err(e) = consumer.request_batch(request, pull.inbox.clone()).await {
                    return Err(self.closed(e.to_string()));
                }
                pull.left = max;
                pull.answer_by = tokio::time::Instant::now() + wait + Duration::from_secs(2);
            }
            let answer_by = pull.answer_by;
            let first = tokio::time::timeout_at(until.min(answer_by), pull.sub.next()).await;
            let arrived = match first {
                Ok(Some(m)) => self.arrived(m),
                Ok(None) => Err("the inbox was closed".into()),
                Err(_) if tokio::time::Instant::now() >= answer_by => {
                    Err("the pull request got no answer in time".into())
                }
                // Nothing within `wait`; the request stands for the next call.
                Err(_) => return Ok(out),
            };
            match arrived {
                Ok(Arrived::Message(m)) => {
                    out.push(m);
                    break;
                }
                Ok(Arrived::Beat) => {}
                Ok(Arrived::Ended) => {
                    if tokio::time::Instant::now() >= until {
                        return Ok(out);
                    }
                }
                Err(e) => return Err(self.closed(e)),
            }
        }
        // Everything already here, without waiting.
        while out.len() < max {
            let Some(pull) = self.pull.as_mut() else {
                break;
            };
            if pull.left == 0 {
                break;
            }
            let Some(next) = pull.sub.next().now_or_never() else {
                break;
            };
            let arrived = match next {
                Some(m) => self.arrived(m),
                None => Err("the inbox was closed".into()),
            };
            match arrived {
                Ok(Arrived::Message(m)) => out.push(m),
                Ok(Arrived::Beat) => {}
                Ok(Arrived::Ended) => break,
                Err(e) => {
                    // What was received is still good; the rest is delivered again.
                    warn!(consumer = %self.name, error = %e, "standing pull ended early");
                    self.consumer = None;
                    self.pull = None;
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Reads one message of the standing request's inbox.
    fn arrived(&mut self, m: async_nats::Message) -> Result<Arrived, String> {
        let Some(pull) = self.pull.as_mut() else {
            return Err("no pull request stands".into());
        };
        match m.status.unwrap_or(StatusCode::OK) {
            StatusCode::OK => {
                pull.left = pull.left.saturating_sub(1);
                let m = async_nats::jetstream::Message {
                    message: m,
                    context: self.js.clone(),
                };
                match m.info() {
                    Ok(i) => {
                        let (seq, pending) = (i.stream_sequence, i.pending);
                        Ok(Arrived::Message(Received {
                            delivery: Delivery::from_message(&m, seq),
                            pending,
                            message: m,
                        }))
                    }
                    Err(e) => Err(format!("message metadata: {e}")),
                }
            }
            StatusCode::IDLE_HEARTBEAT => Ok(Arrived::Beat),
            // Expired (408), nothing to deliver (404), or ended by the server (409: a limit
            // reached, the batch done); a deleted consumer is an error.
            StatusCode::TIMEOUT | StatusCode::NOT_FOUND => {
                pull.left = 0;
                Ok(Arrived::Ended)
            }
            StatusCode::REQUEST_TERMINATED
                if !m
                    .description
                    .as_deref()
                    .is_some_and(|d| d.to_ascii_lowercase().contains("deleted")) =>
            {
                pull.left = 0;
                Ok(Arrived::Ended)
            }
            status => Err(format!(
                "pull request ended: {status} {}",
                m.description.as_deref().unwrap_or_default()
            )),
        }
    }

    /// Closes the consumer handle after a failure of the standing request (the caller opens it
    /// again at its resume point).
    fn closed(&mut self, message: String) -> BusError {
        self.consumer = None;
        self.pull = None;
        BusError::Consumer {
            name: self.name.clone(),
            message,
        }
    }
}
