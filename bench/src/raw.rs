//! The engines' own limits, measured with their plain clients: JetStream publish (awaiting each
//! ack, and with many acks in flight), an ordered read of the stream, batched redb inserts, and
//! the codec.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use redb::{Database, TableDefinition};
use usbpt_bus::async_nats::jetstream::stream::{Config, StorageType};
use usbpt_bus::async_nats::jetstream::{self, message::PublishMessage};

use crate::report::Figure;
use crate::stats::Samples;

const RAW_STREAM: &str = "BENCH_RAW";
const RAW_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("raw");

/// A fresh raw stream (file storage, like usbpt's) on `url`.
async fn raw_stream(url: &str) -> Result<jetstream::Context> {
    let client = usbpt_bus::async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let _ = js.delete_stream(RAW_STREAM).await;
    js.create_stream(Config {
        name: RAW_STREAM.into(),
        subjects: vec!["bench.raw.>".into()],
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("create the raw bench stream")?;
    Ok(js)
}

/// JetStream publish awaiting each ack, `n` messages of `size` bytes.
pub async fn publish_each_ack(url: &str, n: usize, size: usize) -> Result<Figure> {
    let js = raw_stream(url).await?;
    let payload = Bytes::from(vec![0x5a; size]);
    let mut lat = Samples::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        js.send_publish(
            format!("bench.raw.{}", i % 64),
            PublishMessage::build()
                .payload(payload.clone())
                .message_id(format!("e{i}")),
        )
        .await?
        .await?;
        lat.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    Ok(
        Figure::new("raw: JetStream publish, await each ack", n as u64)
            .rate(rate)
            .latency(lat.summary())
            .note(format!("{size} B payloads with Nats-Msg-Id")),
    )
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
                format!("bench.raw.{}", i % 64),
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
        format!("raw: JetStream publish, {inflight} acks in flight"),
        n as u64,
    )
    .rate(rate)
    .note(format!("{size} B payloads with Nats-Msg-Id")))
}

/// Reads `n` stored messages with an ordered consumer (after `publish_async` filled the stream).
pub async fn ordered_read(url: &str, n: usize) -> Result<Figure> {
    let client = usbpt_bus::async_nats::connect(url).await?;
    let js = jetstream::new(client);
    let stream = js.get_stream(RAW_STREAM).await?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?;
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        match messages.next().await {
            Some(m) => {
                m?;
                got += 1;
            }
            None => break,
        }
    }
    let rate = got as f64 / start.elapsed().as_secs_f64();
    Ok(Figure::new("raw: ordered consumer read", got as u64).rate(rate))
}

/// redb inserts of `n` records of `size` bytes, `batch` per write transaction.
pub fn redb_batched_insert(n: usize, size: usize, batch: usize) -> Result<Figure> {
    let dir = tempfile::tempdir()?;
    let db = Database::create(dir.path().join("raw.redb"))?;
    let value = vec![0xa5u8; size];
    let mut lat = Samples::with_capacity(n / batch + 1);
    let start = Instant::now();
    let mut key = 0u64;
    while (key as usize) < n {
        let t = Instant::now();
        let txn = db.begin_write()?;
        {
            let mut table = txn.open_table(RAW_TABLE)?;
            for _ in 0..batch.min(n - key as usize) {
                table.insert(key, value.as_slice())?;
                key += 1;
            }
        }
        txn.commit()?;
        lat.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    Ok(
        Figure::new(format!("raw: redb insert, {batch} per commit"), n as u64)
            .rate(rate)
            .latency(lat.summary())
            .note("latency is per commit (durable)"),
    )
}
