//! The engines' own limits, measured with their plain clients in the same run as usbpt's
//! figures: JetStream publish (awaiting each ack, with many acks in flight, fenced), an ordered
//! read of a stream, batched redb inserts, both together, and the bare engine path under a
//! hotplug (redb commit → publish → pull fetch → redb commit).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use redb::{Database, Durability, TableDefinition};
use tokio::sync::{mpsc, watch};
use usbpt_bus::async_nats;
use usbpt_bus::async_nats::jetstream::consumer::{pull, push, AckPolicy};
use usbpt_bus::async_nats::jetstream::stream::{Config, StorageType};
use usbpt_bus::async_nats::jetstream::{self, message::PublishMessage};

use crate::report::Figure;
use crate::stats::Samples;

/// The raw stream: file storage like usbpt's, its own subjects.
pub const RAW_STREAM: &str = "USBPT_BENCH_RAW";
const RAW_SUBJECTS: &str = "usbpt.bench.raw.>";
const RAW_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("raw");

fn subject(i: usize) -> String {
    format!("usbpt.bench.raw.{}", i % 64)
}

/// A fresh raw stream (file storage, a duplicate window, like usbpt's) on `url`.
async fn raw_stream(url: &str) -> Result<jetstream::Context> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream(RAW_STREAM).await;
    js.create_stream(Config {
        name: RAW_STREAM.into(),
        subjects: vec![RAW_SUBJECTS.into()],
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(120),
        allow_direct: true,
        ..Default::default()
    })
    .await
    .context("create the raw bench stream")?;
    Ok(js)
}

/// JetStream publish awaiting each ack, `n` messages of `size` bytes with `Nats-Msg-Id`.
pub async fn publish_each_ack(url: &str, n: usize, size: usize) -> Result<Figure> {
    let js = raw_stream(url).await?;
    let payload = Bytes::from(vec![0x5a; size]);
    let mut lat = Samples::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        js.send_publish(
            subject(i),
            PublishMessage::build()
                .payload(payload.clone())
                .message_id(format!("e{i}")),
        )
        .await?
        .await?;
        lat.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    Ok(Figure::new(
        "raw_publish_each_ack",
        "raw: JetStream publish, await each ack",
        n as u64,
    )
    .rate(rate)
    .latency(lat.summary())
    .note(format!("{size} B payloads with Nats-Msg-Id")))
}

/// JetStream publish with up to `inflight` acks outstanding.
pub async fn publish_async(url: &str, n: usize, size: usize, inflight: usize) -> Result<Figure> {
    let js = raw_stream(url).await?;
    let payload = Bytes::from(vec![0x5a; size]);
    let start = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::new();
    for i in 0..n {
        let ack = js
            .send_publish(
                subject(i),
                PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(format!("e{i}")),
            )
            .await?;
        pending.push(std::future::IntoFuture::into_future(ack));
        if pending.len() >= inflight {
            if let Some(r) = pending.next().await {
                r?;
            }
        }
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    Ok(Figure::new(
        "raw_publish_inflight",
        format!("raw: JetStream publish, {inflight} acks in flight"),
        n as u64,
    )
    .rate(rate)
    .note(format!("{size} B payloads with Nats-Msg-Id")))
}

/// Fenced publishes (`Nats-Expected-Last-Subject-Sequence`) awaiting each ack, round-robin
/// over 64 subjects: what a claim costs the server.
pub async fn fenced_publish(url: &str, n: usize, size: usize) -> Result<Figure> {
    let js = raw_stream(url).await?;
    let payload = Bytes::from(vec![0x5a; size]);
    let mut last = [0u64; 64];
    let mut lat = Samples::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let ack = js
            .send_publish(
                subject(i),
                PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(format!("f{i}"))
                    .expected_last_subject_sequence(last[i % 64]),
            )
            .await?
            .await?;
        last[i % 64] = ack.sequence;
        lat.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    Ok(Figure::new(
        "raw_fenced_publish",
        "raw: fenced JetStream publish, await each ack",
        n as u64,
    )
    .rate(rate)
    .latency(lat.summary())
    .note(format!(
        "{size} B, Nats-Expected-Last-Subject-Sequence, 64 subjects"
    )))
}

/// How a raw reader reads the stream in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    /// async-nats' ordered pull consumer, `messages()`.
    OrderedPull,
    /// async-nats' ordered push consumer (flow control, idle heartbeats), with a large
    /// subscription buffer.
    OrderedPush,
    /// A plain push consumer without acks (flow control, idle heartbeats) read through a core
    /// subscription: no consumer recreation on a gap, so a gap fails the read.
    PushNoAck,
}

impl ReadPath {
    pub const ALL: [ReadPath; 3] = [
        ReadPath::OrderedPull,
        ReadPath::OrderedPush,
        ReadPath::PushNoAck,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ReadPath::OrderedPull => "ordered pull",
            ReadPath::OrderedPush => "ordered push",
            ReadPath::PushNoAck => "plain push (no acks)",
        }
    }
}

/// One message as a raw reader sees it.
type RawMessage = (u64, Bytes);

/// An in-order stream of `stream`'s messages from sequence 1 along `path`.
async fn open_read(
    url: &str,
    stream: &str,
    path: ReadPath,
) -> Result<futures::stream::BoxStream<'static, Result<RawMessage>>> {
    // A large subscription buffer: a push consumer delivers as fast as the server sends.
    let client = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(url)
        .await?;
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(stream).await?;
    let seq_of = |info: Result<jetstream::message::Info<'_>, _>| {
        info.map(|i| i.stream_sequence)
            .map_err(|e: async_nats::Error| anyhow::anyhow!("metadata: {e}"))
    };
    Ok(match path {
        ReadPath::OrderedPull => {
            let consumer = stream
                .create_consumer(pull::OrderedConfig::default())
                .await?;
            consumer
                .messages()
                .await?
                .map(move |m| {
                    let m = m.map_err(|e| anyhow::anyhow!("read: {e}"))?;
                    Ok((seq_of(m.info())?, m.message.payload))
                })
                .boxed()
        }
        ReadPath::OrderedPush => {
            let consumer = stream
                .create_consumer(push::OrderedConfig {
                    deliver_subject: client.new_inbox(),
                    ..Default::default()
                })
                .await?;
            consumer
                .messages()
                .await?
                .map(move |m| {
                    let m = m.map_err(|e| anyhow::anyhow!("read: {e}"))?;
                    Ok((seq_of(m.info())?, m.message.payload))
                })
                .boxed()
        }
        ReadPath::PushNoAck => {
            let inbox = client.new_inbox();
            // Subscribed before the consumer exists, so its first delivery is not missed.
            let subscription = client.subscribe(inbox.clone()).await?;
            stream
                .create_consumer(push::Config {
                    deliver_subject: inbox,
                    ack_policy: AckPolicy::None,
                    flow_control: true,
                    idle_heartbeat: Duration::from_secs(5),
                    ..Default::default()
                })
                .await?;
            let mut next = 1u64;
            subscription
                .then(move |m| {
                    let client = client.clone();
                    let js = js.clone();
                    async move {
                        if m.status.is_some() && m.payload.is_empty() {
                            // Flow control asks for an empty reply; heartbeats carry no reply.
                            if let Some(reply) = m.reply {
                                client.publish(reply, Bytes::new()).await?;
                            }
                            return Ok(None);
                        }
                        let m = jetstream::Message {
                            message: m,
                            context: js,
                        };
                        let seq = seq_of(m.info())?;
                        Ok(Some((seq, m.message.payload)))
                    }
                })
                .filter_map(move |m: Result<Option<RawMessage>>| {
                    let m = match m {
                        Ok(None) => None,
                        Ok(Some((seq, _))) if seq != next => Some(Err(anyhow::anyhow!(
                            "push read: sequence {seq} where {next} was due"
                        ))),
                        Ok(Some(m)) => {
                            next += 1;
                            Some(Ok(m))
                        }
                        Err(e) => Some(Err(e)),
                    };
                    futures::future::ready(m)
                })
                .boxed()
        }
    })
}

/// Reads `n` stored messages of `stream` in order along `path`.
pub async fn ordered_read(url: &str, stream: &str, n: u64, path: ReadPath) -> Result<Figure> {
    let mut messages = open_read(url, stream, path).await?;
    let start = Instant::now();
    let mut got = 0u64;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
            Ok(Some(m)) => {
                m?;
                got += 1;
            }
            Ok(None) => break,
            Err(_) => bail!("{} read stalled after {got} of {n} messages", path.name()),
        }
    }
    let rate = got as f64 / start.elapsed().as_secs_f64();
    let key = match path {
        ReadPath::OrderedPull => "raw_ordered_read",
        ReadPath::OrderedPush => "raw_ordered_push_read",
        ReadPath::PushNoAck => "raw_push_noack_read",
    };
    Ok(Figure::new(key, format!("raw: {} consumer read", path.name()), got).rate(rate))
}

/// Every raw read path, fastest first.
pub async fn ordered_reads(url: &str, stream: &str, n: u64) -> Result<Vec<(ReadPath, Figure)>> {
    let mut out = Vec::new();
    for path in ReadPath::ALL {
        out.push((path, ordered_read(url, stream, n, path).await?));
    }
    out.sort_by(|a, b| {
        b.1.rate_per_s
            .unwrap_or(0.0)
            .total_cmp(&a.1.rate_per_s.unwrap_or(0.0))
    });
    Ok(out)
}

fn durability_name(d: Durability) -> &'static str {
    if matches!(d, Durability::None) {
        "no fsync"
    } else {
        "fsync"
    }
}

/// redb inserts of `records` (key: their index), `batch` per write transaction.
pub fn redb_batched_insert(
    records: &[Bytes],
    batch: usize,
    durability: Durability,
    key: &str,
) -> Result<Figure> {
    let dir = tempfile::tempdir()?;
    let db = Database::create(dir.path().join("raw.redb"))?;
    let mut lat = Samples::with_capacity(records.len() / batch + 1);
    let start = Instant::now();
    for (c, chunk) in records.chunks(batch.max(1)).enumerate() {
        let t = Instant::now();
        let mut txn = db.begin_write()?;
        txn.set_durability(durability)?;
        {
            let mut table = txn.open_table(RAW_TABLE)?;
            for (i, r) in chunk.iter().enumerate() {
                table.insert((c * batch + i) as u64 + 1, r.as_ref())?;
            }
        }
        txn.commit()?;
        lat.push(t.elapsed());
    }
    let n = records.len();
    let rate = n as f64 / start.elapsed().as_secs_f64();
    Ok(Figure::new(
        key,
        format!(
            "raw: redb insert, {batch}/commit, {}",
            durability_name(durability)
        ),
        n as u64,
    )
    .rate(rate)
    .latency(lat.summary())
    .note("latency per commit"))
}

/// Reads `n` messages of `stream` with an ordered consumer while a blocking thread inserts
/// them into redb, `batch` per write transaction (the last one fsynced): the engines' limit for
/// "read the stream and store every record". Returns the figure and the payloads read.
#[allow(clippy::too_many_arguments)]
pub async fn read_insert(
    url: &str,
    stream: &str,
    n: u64,
    batch: usize,
    durability: Durability,
    key: &str,
    path: ReadPath,
) -> Result<(Figure, Vec<Bytes>)> {
    let dir = tempfile::tempdir()?;
    let db = Arc::new(Database::create(dir.path().join("raw.redb"))?);
    let (tx, mut rx) = mpsc::channel::<Vec<(u64, Bytes)>>(4);
    let start = Instant::now();
    let mut messages = open_read(url, stream, path).await?;
    let reader = tokio::spawn(async move {
        let mut got = 0u64;
        let mut chunk = Vec::with_capacity(batch);
        while got < n {
            let (seq, payload) =
                match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
                    Ok(Some(m)) => m?,
                    Ok(None) => break,
                    Err(_) => bail!("{} read stalled after {got} of {n} messages", path.name()),
                };
            chunk.push((seq, payload));
            got += 1;
            if chunk.len() >= batch || got == n {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(batch));
                if tx.send(full).await.is_err() {
                    break;
                }
            }
        }
        Ok::<u64, anyhow::Error>(got)
    });
    let mut payloads = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut lat = Samples::default();
    while let Some(chunk) = rx.recv().await {
        let last = chunk.last().map_or(0, |(s, _)| *s) >= n;
        let d = if last {
            Durability::Immediate
        } else {
            durability
        };
        let db = Arc::clone(&db);
        let t = Instant::now();
        let chunk = tokio::task::spawn_blocking(move || -> Result<Vec<(u64, Bytes)>> {
            let mut txn = db.begin_write()?;
            txn.set_durability(d)?;
            {
                let mut table = txn.open_table(RAW_TABLE)?;
                for (seq, p) in &chunk {
                    table.insert(*seq, p.as_ref())?;
                }
            }
            txn.commit()?;
            Ok(chunk)
        })
        .await??;
        lat.push(t.elapsed());
        payloads.extend(chunk.into_iter().map(|(_, p)| p));
    }
    let got = reader.await??;
    let rate = got as f64 / start.elapsed().as_secs_f64();
    Ok((
        Figure::new(
            key,
            format!(
                "raw: {} read + redb insert, {batch}/commit, {}",
                path.name(),
                durability_name(durability)
            ),
            got,
        )
        .rate(rate)
        .latency(lat.summary())
        .note("reader and inserter overlap; latency per commit"),
        payloads,
    ))
}

/// The bare engines under one hotplug, `n` times in sequence: a durable redb commit of one
/// record (the agent's outbox), a JetStream publish awaiting its ack, a durable pull
/// consumer's fetch receiving it, a durable redb commit of it (the view) and a wake-up of the
/// waiting reader.
pub async fn hotplug_path(url: &str, n: usize, size: usize) -> Result<Figure> {
    let js = raw_stream(url).await?;
    let stream = js.get_stream(RAW_STREAM).await?;
    let consumer: jetstream::consumer::PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw-hotplug".into()),
            ack_policy: AckPolicy::All,
            ..Default::default()
        })
        .await?;
    let dir = tempfile::tempdir()?;
    let outbox = Database::create(dir.path().join("outbox.redb"))?;
    let view = Arc::new(Database::create(dir.path().join("view.redb"))?);
    let (applied_tx, mut applied) = watch::channel(0u64);
    let (stop_tx, mut stop) = watch::channel(false);
    let folder = tokio::spawn(async move {
        loop {
            // One fetch (long poll, returning as soon as messages are there), stoppable.
            let fetch = async {
                let mut batch = consumer
                    .fetch()
                    .max_messages(1000)
                    .expires(Duration::from_secs(5))
                    .messages()
                    .await
                    .map_err(|e| anyhow::anyhow!("fetch: {e}"))?;
                let mut got = Vec::new();
                while let Some(m) = batch.next().await {
                    got.push(m.map_err(|e| anyhow::anyhow!("fetch: {e}"))?);
                }
                Ok::<_, anyhow::Error>(got)
            };
            let got = tokio::select! {
                r = fetch => r?,
                _ = stop.changed() => return Ok::<(), anyhow::Error>(()),
            };
            let Some(last) = got.last() else { continue };
            let seq = last
                .info()
                .map_err(|e| anyhow::anyhow!("metadata: {e}"))?
                .stream_sequence;
            let rows: Vec<(u64, Bytes)> = got
                .iter()
                .filter_map(|m| {
                    m.info()
                        .ok()
                        .map(|i| (i.stream_sequence, m.payload.clone()))
                })
                .collect();
            let db = Arc::clone(&view);
            tokio::task::spawn_blocking(move || -> Result<()> {
                let txn = db.begin_write()?;
                {
                    let mut table = txn.open_table(RAW_TABLE)?;
                    for (s, p) in &rows {
                        table.insert(*s, p.as_ref())?;
                    }
                }
                txn.commit()?;
                Ok(())
            })
            .await??;
            applied_tx.send_replace(seq);
            last.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        }
    });
    let payload = vec![0x5a; size];
    let mut lat = Samples::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let txn = outbox.begin_write()?;
        {
            let mut table = txn.open_table(RAW_TABLE)?;
            table.insert(i as u64, payload.as_slice())?;
        }
        txn.commit()?;
        let ack = js
            .send_publish(
                subject(i),
                PublishMessage::build()
                    .payload(Bytes::from(payload.clone()))
                    .message_id(format!("h{i}")),
            )
            .await?
            .await?;
        let seq = ack.sequence;
        tokio::time::timeout(Duration::from_secs(30), applied.wait_for(|a| *a >= seq))
            .await
            .context("the raw consumer did not receive a message within 30 s")??;
        lat.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    folder.await??;
    Ok(Figure::new(
        "raw_hotplug_path",
        "raw: redb commit → publish → pull fetch → redb commit",
        n as u64,
    )
    .rate(rate)
    .latency(lat.summary())
    .note(format!(
        "{size} B, one at a time: the engines under a hotplug"
    )))
}
