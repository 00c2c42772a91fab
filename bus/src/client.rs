//! The JetStream client every usbpt process uses.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;
use thiserror::Error;
use tracing::debug;
use usbpt_schemas::{codec, subjects, Envelope, Sealed};

use crate::stream::{StreamError, StreamSettings};

/// A connection to the bus with the stream ensured.
#[derive(Debug, Clone)]
pub struct Bus {
    pub(crate) client: async_nats::Client,
    js: jetstream::Context,
    stream: Stream,
    /// The identity's nkey when it connected with one: it signs control work (ADR 0005).
    signer: Option<std::sync::Arc<nkeys::KeyPair>>,
}

/// TLS to the NATS server: the CA that signed the server's certificate and, when the server
/// verifies clients, this client's certificate and key (PEM files).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsClient {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl TlsClient {
    /// Whether any TLS option is set (then TLS is required).
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, BusError> {
        if !self.is_set() {
            return Ok(options);
        }
        options = options.require_tls(true);
        if let Some(ca) = &self.ca {
            options = options.add_root_certificates(ca.clone());
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            (None, None) => {}
            _ => {
                return Err(BusError::Creds {
                    path: "--tls-cert/--tls-key".into(),
                    source: std::io::Error::other(
                        "a client certificate needs both its certificate and its key",
                    ),
                })
            }
        }
        Ok(options)
    }
}

/// How a usbpt process secures its connection: whether an unauthenticated server is accepted,
/// and TLS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientSecurity {
    /// Accept a server that admits clients without authentication.
    pub insecure: bool,
    pub tls: TlsClient,
}

/// Where a publish landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The stream sequence of the stored event (of the first copy, for a duplicate).
    pub sequence: u64,
    /// True when the event id was already stored within the duplicate window: nothing new.
    pub duplicate: bool,
}

/// An event sent by [`Bus::publish_pipelined`] whose ack has not been awaited yet.
pub struct PendingAck {
    subject: String,
    ack: jetstream::context::PublishAckFuture,
}

impl std::fmt::Debug for PendingAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAck")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl PendingAck {
    /// The subject the event was sent on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Waits for the server to store the event (or say it was a duplicate).
    pub async fn stored(self) -> Result<Published, BusError> {
        let subject = self.subject;
        match self.ack.await {
            Ok(ack) => Ok(Published {
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) => Err(BusError::Publish {
                subject,
                kind: e.kind().into(),
                message: e.to_string(),
            }),
        }
    }
}

#[derive(Debug, Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot read NATS credentials {path}: {source}")]
    Creds {
        path: String,
        source: std::io::Error,
    },
    #[error("the NATS server at {url} lets clients in without authentication; give it users (usbpt up does) or pass --insecure (USBPT_INSECURE=1) to run anyway")]
    NoAuth { url: String },
    #[error("JetStream is not available on this server (start nats-server with -js): {0}")]
    NoJetStream(String),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("stream request failed: {0}")]
    StreamRequest(String),
    /// Another writer appended to `subject` since sequence `expected`: re-read and decide again.
    #[error("conflict on {subject}: expected last subject sequence {expected}, but the subject has moved on")]
    Conflict { subject: String, expected: u64 },
    #[error("publish to {subject} failed: {message}")]
    Publish {
        subject: String,
        kind: PublishFailure,
        message: String,
    },
    #[error("cannot encode event: {0}")]
    Encode(#[from] codec::EncodeError),
    #[error("consumer {name}: {message}")]
    Consumer { name: String, message: String },
}

/// Why a publish failed, as far as a caller acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishFailure {
    /// No ack in time: the event may or may not be stored (retry with the same id).
    Timeout,
    /// The connection or the stream is not there now (server away, stream being made again).
    Unavailable,
    /// The server refused it (too large, limits, permissions): retrying the same will not help.
    Refused,
}

impl From<PublishErrorKind> for PublishFailure {
    fn from(kind: PublishErrorKind) -> Self {
        match kind {
            PublishErrorKind::TimedOut => PublishFailure::Timeout,
            PublishErrorKind::BrokenPipe | PublishErrorKind::StreamNotFound => {
                PublishFailure::Unavailable
            }
            _ => PublishFailure::Refused,
        }
    }
}

impl From<async_nats::RequestErrorKind> for PublishFailure {
    fn from(kind: async_nats::RequestErrorKind) -> Self {
        match kind {
            async_nats::RequestErrorKind::TimedOut => PublishFailure::Timeout,
            async_nats::RequestErrorKind::NoResponders | async_nats::RequestErrorKind::Other => {
                PublishFailure::Unavailable
            }
            _ => PublishFailure::Refused,
        }
    }
}

impl BusError {
    /// True when retrying the same operation later may succeed (server away, timeouts).
    pub fn is_transient(&self) -> bool {
        matches!(self, BusError::Connect { .. })
            || matches!(
                self,
                BusError::Publish {
                    kind: PublishFailure::Timeout | PublishFailure::Unavailable,
                    ..
                }
            )
    }
}

impl Bus {
    /// Connects to `url` (with a credentials file if given) and ensures the stream. The file
    /// is either an nkey user seed (what `usbpt up` generates: the identity then also signs
    /// control work and receives replies on its own inbox) or a NATS `.creds` file.
    pub async fn connect(
        url: &str,
        creds: Option<&std::path::Path>,
        settings: &StreamSettings,
    ) -> Result<Self, BusError> {
        Self::connect_tls(url, creds, settings, &TlsClient::default()).await
    }

    /// [`Bus::connect`] over TLS when `tls` says so.
    pub async fn connect_tls(
        url: &str,
        creds: Option<&std::path::Path>,
        settings: &StreamSettings,
        tls: &TlsClient,
    ) -> Result<Self, BusError> {
        // Never print a password given in the URL.
        let shown = crate::auth::redact_url(url);
        let options = async_nats::ConnectOptions::new()
            .name("usbpt")
            .connection_timeout(Duration::from_secs(5));
        let mut options = tls.apply(options)?;
        let mut signer = None;
        if let Some(path) = creds {
            let creds_error = |source| BusError::Creds {
                path: path.display().to_string(),
                source,
            };
            if crate::auth::is_seed_file(path) {
                let key = crate::auth::read_seed(path)
                    .map_err(|e| creds_error(std::io::Error::other(e.to_string())))?;
                let seed = key
                    .seed()
                    .map_err(|e| creds_error(std::io::Error::other(e.to_string())))?;
                options = options
                    .nkey(seed)
                    .custom_inbox_prefix(subjects::inbox_prefix(&key.public_key()));
                signer = Some(std::sync::Arc::new(key));
            } else {
                options = options.credentials_file(path).await.map_err(creds_error)?;
            }
        }
        // NATS_URL may list several servers, comma-separated, as other NATS tools accept.
        let addrs = url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BusError::Connect {
                url: shown.clone(),
                source: async_nats::ConnectError::with_source(
                    async_nats::ConnectErrorKind::ServerParse,
                    e,
                ),
            })?;
        let client = options
            .connect(addrs)
            .await
            .map_err(|source| BusError::Connect {
                url: shown.clone(),
                source,
            })?;
        let js = jetstream::new(client.clone());
        let stream = ensure_stream(&js, settings).await?;
        Ok(Self {
            client,
            js,
            stream,
            signer,
        })
    }

    /// [`Bus::connect`], refusing a server that admits clients without authentication unless
    /// `insecure` (what every usbpt process does against an operator's server).
    pub async fn connect_checked(
        url: &str,
        creds: Option<&std::path::Path>,
        settings: &StreamSettings,
        security: &ClientSecurity,
    ) -> Result<Self, BusError> {
        let bus = Self::connect_tls(url, creds, settings, &security.tls).await?;
        if !security.insecure && !bus.client.server_info().auth_required {
            return Err(BusError::NoAuth {
                url: crate::auth::redact_url(url),
            });
        }
        Ok(bus)
    }

    /// The public key of the nkey this connection authenticated with, if any.
    pub fn public_key(&self) -> Option<String> {
        self.signer.as_ref().map(|k| k.public_key())
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// Publishes an envelope on its subject with `Nats-Msg-Id` = event id, and awaits the ack.
    /// Publishing the same envelope twice stores it once.
    pub async fn publish(&self, envelope: &Envelope) -> Result<Published, BusError> {
        self.send(envelope, None).await
    }

    /// Publishes only if the envelope's subject's last stored sequence is `expected` (0: the
    /// subject is empty). Another writer's append in between gives [`BusError::Conflict`].
    pub async fn publish_fenced(
        &self,
        envelope: &Envelope,
        expected: u64,
    ) -> Result<Published, BusError> {
        self.send(envelope, Some(expected)).await
    }

    /// The subject and the JetStream message for `envelope`: its encoding, `Nats-Msg-Id` = event
    /// id, the expected last subject sequence when fenced, and the command handler's signature
    /// on control work.
    fn message_for(
        &self,
        envelope: &Envelope,
        expected: Option<u64>,
    ) -> Result<(String, PublishMessage), BusError> {
        let Sealed {
            subject,
            event_id,
            bytes,
        } = Sealed::seal(envelope)?;
        let message = self.message_for_bytes(&subject, &event_id, Bytes::from(bytes), expected);
        Ok((subject, message))
    }

    /// The message for an encoded envelope: `Nats-Msg-Id`, the optional fence and, on control
    /// subjects, this identity's signature.
    fn message_for_bytes(
        &self,
        subject: &str,
        event_id: &usbpt_schemas::EventId,
        payload: Bytes,
        expected: Option<u64>,
    ) -> PublishMessage {
        let signed = payload.clone();
        let mut message = PublishMessage::build()
            .payload(payload)
            .message_id(event_id.to_string());
        if let Some(seq) = expected {
            message = message.expected_last_subject_sequence(seq);
        }
        // Control work is signed by the identity that decided it, so an agent can tell it from
        // a forgery even if the server's permissions were misconfigured (ADR 0005).
        if let (Some(key), Ok(subjects::SubjectScope::ControlForHost(_))) =
            (&self.signer, subjects::scope_of(subject))
        {
            if let Ok(sig) = key.sign(&signed) {
                message = message.header(
                    crate::auth::SIGNATURE_HEADER,
                    crate::auth::hex(&sig).as_str(),
                );
            }
        }
        message
    }

    /// Sends an envelope sealed earlier (the agent's outbox row) as stored, without awaiting
    /// its ack: as [`Bus::publish_pipelined`], without encoding anything again.
    pub async fn publish_sealed(&self, sealed: &Sealed) -> Result<PendingAck, BusError> {
        let message = self.message_for_bytes(
            &sealed.subject,
            &sealed.event_id,
            Bytes::copy_from_slice(&sealed.bytes),
            None,
        );
        self.send_pipelined(sealed.subject.clone(), message).await
    }

    /// Sends an envelope as [`Bus::publish`] does, without awaiting its ack: the returned
    /// [`PendingAck`] resolves once the server stored it. The server stores what one connection
    /// sends in the order it was sent, so several sends in flight keep their order while the
    /// round trips overlap (the agent's outbox, [`Bus::publish_windowed`]).
    pub async fn publish_pipelined(&self, envelope: &Envelope) -> Result<PendingAck, BusError> {
        let (subject, message) = self.message_for(envelope, None)?;
        self.send_pipelined(subject, message).await
    }

    async fn send_pipelined(
        &self,
        subject: String,
        message: PublishMessage,
    ) -> Result<PendingAck, BusError> {
        match self.js.send_publish(subject.clone(), message).await {
            Ok(ack) => Ok(PendingAck { subject, ack }),
            Err(e) => Err(BusError::Publish {
                kind: e.kind().into(),
                message: e.to_string(),
                subject,
            }),
        }
    }

    /// Publishes `envelopes` in order on this connection with up to `window` acks in flight;
    /// returns the last stored sequence (0 for none).
    pub async fn publish_windowed(
        &self,
        envelopes: impl IntoIterator<Item = Envelope>,
        window: usize,
    ) -> Result<u64, BusError> {
        let mut acks = std::collections::VecDeque::new();
        let mut last = 0;
        for envelope in envelopes {
            acks.push_back(self.publish_pipelined(&envelope).await?);
            if acks.len() >= window.max(1) {
                if let Some(ack) = acks.pop_front() {
                    last = ack.stored().await?.sequence.max(last);
                }
            }
        }
        for ack in acks {
            last = ack.stored().await?.sequence.max(last);
        }
        Ok(last)
    }

    async fn send(
        &self,
        envelope: &Envelope,
        expected: Option<u64>,
    ) -> Result<Published, BusError> {
        let (subject, message) = self.message_for(envelope, expected)?;
        let publish_error = |e: async_nats::jetstream::context::PublishError| BusError::Publish {
            subject: subject.clone(),
            kind: e.kind().into(),
            message: e.to_string(),
        };
        let sent = self
            .js
            .send_publish(subject.clone(), message)
            .await
            .map_err(publish_error)?
            .await
            .map_err(|e| match (e.kind(), expected) {
                (PublishErrorKind::WrongLastSequence, Some(expected)) => BusError::Conflict {
                    subject: subject.clone(),
                    expected,
                },
                _ => publish_error(e),
            });
        let ack = match sent {
            Ok(ack) => ack,
            // The server checks the expected sequence before deduplicating, so a retry of a
            // fenced publish whose ack was lost looks like a conflict. If the subject's last
            // event is ours, it is a duplicate.
            Err(BusError::Conflict { subject, expected }) => {
                return match self.last_on_subject(&subject).await? {
                    Some((sequence, id)) if id == envelope.event_id.to_string() => Ok(Published {
                        sequence,
                        duplicate: true,
                    }),
                    _ => Err(BusError::Conflict { subject, expected }),
                };
            }
            Err(e) => return Err(e),
        };
        debug!(%subject, seq = ack.sequence, duplicate = ack.duplicate, kind = envelope.body.kind(), "published");
        Ok(Published {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// The stream sequence of the last event on `subject`, or 0 when there is none: the value
    /// a fenced publish on that subject expects.
    pub async fn last_subject_sequence(&self, subject: &str) -> Result<u64, BusError> {
        Ok(self
            .last_on_subject(subject)
            .await?
            .map_or(0, |(seq, _)| seq))
    }

    /// The stream sequence and `Nats-Msg-Id` of the last event stored on `subject`, if any: lets
    /// a publisher that lost an ack (or crashed before recording it) see whether its event is
    /// already stored, beyond the duplicate window.
    pub async fn last_message_id(&self, subject: &str) -> Result<Option<(u64, String)>, BusError> {
        self.last_on_subject(subject).await
    }

    /// The last event on `subject`: its sequence and `Nats-Msg-Id`. A direct get with the
    /// subject in the request subject (`$JS.API.DIRECT.GET.USBPT_EVENTS.{subject}`), so the
    /// server's permissions can confine an agent to its own subjects (ADR 0005).
    async fn last_on_subject(&self, subject: &str) -> Result<Option<(u64, String)>, BusError> {
        match self.stream.direct_get_last_for_subject(subject).await {
            Ok(m) => {
                let id = m
                    .headers
                    .get(async_nats::header::NATS_MESSAGE_ID)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                Ok(Some((m.sequence, id)))
            }
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(BusError::StreamRequest(e.to_string())),
        }
    }

    /// The stream's last sequence now (0 when empty).
    pub async fn last_sequence(&self) -> Result<u64, BusError> {
        let mut stream = self.stream.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| BusError::StreamRequest(e.to_string()))?;
        Ok(info.state.last_sequence)
    }

    /// Opens (creating if needed) a durable pull consumer. Deliveries start at stream sequence
    /// `start_after + 1` when the consumer is new; an existing consumer resumes where it is.
    pub async fn pull_consumer(
        &self,
        name: &str,
        filter: Option<String>,
        start_after: u64,
    ) -> Result<jetstream::consumer::PullConsumer, BusError> {
        pull_consumer_on(
            &self.stream,
            name,
            filter,
            start_after,
            Duration::from_secs(30),
        )
        .await
    }

    /// A core NATS request (the command subjects): the reply's bytes.
    pub async fn request(&self, subject: String, body: Vec<u8>) -> Result<Bytes, BusError> {
        self.client
            .request(subject.clone(), body.into())
            .await
            .map(|m| m.payload)
            .map_err(|e| BusError::Publish {
                subject,
                kind: e.kind().into(),
                message: e.to_string(),
            })
    }

    /// Stores arbitrary bytes on a subject, optionally with a control-work signature header
    /// (tests of what the fold and the agent make of bad or forged input); returns the stored
    /// sequence.
    pub async fn publish_raw(
        &self,
        subject: &str,
        payload: Vec<u8>,
        signature: Option<&str>,
    ) -> Result<u64, BusError> {
        let fail = |e: async_nats::jetstream::context::PublishError| BusError::Publish {
            subject: subject.to_owned(),
            kind: e.kind().into(),
            message: e.to_string(),
        };
        let mut message = PublishMessage::build().payload(Bytes::from(payload));
        if let Some(sig) = signature {
            message = message.header(crate::auth::SIGNATURE_HEADER, sig);
        }
        self.js
            .send_publish(subject.to_owned(), message)
            .await
            .map_err(fail)?
            .await
            .map(|a| a.sequence)
            .map_err(fail)
    }

    /// A durable, acknowledged reader on the consumer `name` (see [`crate::Durable`]); opened
    /// by [`crate::Durable::open_at`] or [`crate::Durable::open`].
    pub fn durable(
        &self,
        name: &str,
        filter: Option<String>,
        ack_wait: Duration,
    ) -> crate::Durable {
        crate::Durable::new(self.stream.clone(), name, filter, ack_wait)
    }
}

/// Opens (creating if needed) the durable pull consumer `name` on `stream`, delivering from
/// `start_after + 1` when it is new.
pub(crate) async fn pull_consumer_on(
    stream: &Stream,
    name: &str,
    filter: Option<String>,
    start_after: u64,
    ack_wait: Duration,
) -> Result<jetstream::consumer::PullConsumer, BusError> {
    let deliver_policy = if start_after == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: start_after + 1,
        }
    };
    let config = pull::Config {
        durable_name: Some(name.to_owned()),
        name: Some(name.to_owned()),
        ack_policy: AckPolicy::All,
        deliver_policy,
        filter_subject: filter.unwrap_or_default(),
        ack_wait,
        max_ack_pending: 100_000,
        max_batch: 10_000,
        ..Default::default()
    };
    stream
        .get_or_create_consumer(name, config)
        .await
        .map_err(|e| BusError::Consumer {
            name: name.to_owned(),
            message: e.to_string(),
        })
}

/// Where an ordered read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// Stream sequence 1: the whole history.
    Beginning,
    /// The given stream sequence.
    Sequence(u64),
    /// Only events stored from now on.
    New,
}

impl Bus {
    /// An ordered read of the stream from `start`, optionally filtered (tails, replays,
    /// dashboards, the reactor, tests): see [`crate::Reader`].
    pub async fn reader(
        &self,
        start: StartAt,
        filter: Option<String>,
    ) -> Result<crate::Reader, BusError> {
        self.reader_with(start, filter, crate::ReaderOptions::default())
            .await
    }

    /// [`Bus::reader`] with explicit fetch sizes and lifetimes.
    pub async fn reader_with(
        &self,
        start: StartAt,
        filter: Option<String>,
        options: crate::ReaderOptions,
    ) -> Result<crate::Reader, BusError> {
        crate::Reader::open(self.stream.clone(), start, filter, options).await
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<Stream, BusError> {
    match js.get_stream(subjects::STREAM).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| BusError::StreamRequest(e.to_string()))?;
            if let Some(err) = settings.incompatibility(&info.config) {
                return Err(err.into());
            }
            Ok(stream)
        }
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                js.create_stream(settings.config())
                    .await
                    .map_err(|e| match e.kind() {
                        CreateStreamErrorKind::JetStreamUnavailable => {
                            BusError::NoJetStream(e.to_string())
                        }
                        _ => BusError::StreamRequest(e.to_string()),
                    })
            }
            GetStreamErrorKind::Request => Err(BusError::NoJetStream(e.to_string())),
            _ => Err(BusError::StreamRequest(e.to_string())),
        },
    }
}
