//! Scheduling latency: a view of `hosts` × `per_host` devices (a synthetic history folded
//! straight into redb, no bus), then `decide(snapshot, Boot { one-device flavor })` timed —
//! the pure decision including its index-backed reads — against the raw redb range read of
//! the index entries it needs.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use redb::{Durability, ReadableDatabase};
use usbpt_commands::schedule::Weigh;
use usbpt_commands::{decide, Ctx};
use usbpt_projector::workload::Workload;
use usbpt_projector::{tables, BatchOptions, RawEvent, View};
use usbpt_schemas::commands::Command;
use usbpt_schemas::{
    codec, subjects, FlavorId, FlavorName, ProductId, ServerId, ServerName, VendorId,
};

use crate::report::Figure;
use crate::stats::Samples;

/// The workload's flavor-0: one 136b:0003 device.
const FLAVOR: &str = "flavor-0";
const VENDOR: VendorId = VendorId(0x136b);
const PRODUCT: ProductId = ProductId(0x0003);

/// Builds the view, then times decisions for up to `budget` (at least `min` of them).
pub fn scheduling(
    hosts: usize,
    per_host: usize,
    min: usize,
    budget: Duration,
) -> Result<Vec<Figure>> {
    let dir = tempfile::Builder::new().prefix("usbpt-bench-").tempdir()?;
    let path = dir.path().join("sched.redb");
    let view = View::open_private(&path)?;
    // Every host's start and devices, the flavors, then as much history again (boots with
    // claims, deletes, re-enumerations, reboots), so some devices are held.
    let initial = hosts * (per_host + 1) + 3;
    let events = initial + hosts * 2;
    let t = Instant::now();
    let mut batch = Vec::with_capacity(20_000);
    let mut seq = 0u64;
    for env in Workload::new(7, hosts, per_host).take(events) {
        seq += 1;
        batch.push(RawEvent {
            seq,
            subject: subjects::for_event(&env),
            payload: Bytes::from(codec::encode(&env)?),
        });
        if batch.len() == 20_000 || seq as usize == events {
            let report = view.apply_batch(
                &batch,
                &BatchOptions {
                    durability: if seq as usize == events {
                        Durability::Immediate
                    } else {
                        Durability::None
                    },
                    ..BatchOptions::default()
                },
            )?;
            if report.quarantined > 0 {
                bail!(
                    "the synthetic history had {} quarantined events",
                    report.quarantined
                );
            }
            batch.clear();
        }
    }
    let build = t.elapsed();

    let flavor = FlavorName::new(FLAVOR)?;
    let ctx = Ctx {
        server_id: ServerId::new_v7(),
        flavor_id: FlavorId::new_v7(),
        weigh: Weigh::Pack,
        lane: 0,
    };
    let free = view
        .snapshot()?
        .free_devices_matching(VENDOR, PRODUCT, None)?
        .values()
        .map(Vec::len)
        .sum::<usize>();

    // decide(), the snapshot included: what a handler does per command.
    let mut lat = Samples::default();
    let started = Instant::now();
    let mut i = 0usize;
    while i < min || started.elapsed() < budget {
        let cmd = Command::Boot {
            name: ServerName::new(format!("bench-{i}"))?,
            flavor: flavor.clone(),
            host: None,
        };
        let t = Instant::now();
        let snap = view.snapshot()?;
        let d = decide(&snap, &cmd, &ctx).map_err(|r| anyhow::anyhow!("boot rejected: {r}"))?;
        lat.push(t.elapsed());
        if d.steps.len() != 3 {
            bail!(
                "a one-device boot should append 3 events, got {:?}",
                d.steps
            );
        }
        i += 1;
        if i >= 100_000 {
            break;
        }
    }
    let decide_rate = i as f64 / started.elapsed().as_secs_f64();
    let (p50, p99, max) = lat.summary();

    // The view query the scheduler's Match request makes.
    let mut q = Samples::default();
    let n_q = i.clamp(10, 1000);
    for _ in 0..n_q {
        let t = Instant::now();
        let m = view
            .snapshot()?
            .free_devices_matching(VENDOR, PRODUCT, None)?;
        q.push(t.elapsed());
        std::hint::black_box(m);
    }
    drop(view);

    // The engine underneath: a read transaction and a range read of the same index entries.
    let db = redb::Builder::new()
        .open_read_only(&path)
        .context("reopen the view file")?;
    let mut raw = Samples::default();
    let mut keys = 0usize;
    for _ in 0..n_q {
        let t = Instant::now();
        let txn = db.begin_read()?;
        let table = txn.open_table(tables::FREE_BY_MATCH)?;
        let vp = tables::vp_key(VENDOR, PRODUCT);
        keys = 0;
        for e in table.range((vp, "", &[0u8; 16])..(vp + 1, "", &[0u8; 16]))? {
            std::hint::black_box(e?.0.value());
            keys += 1;
        }
        raw.push(t.elapsed());
    }
    let devices = hosts * per_host;
    Ok(vec![
        Figure::new(
            "schedule_decide",
            format!("scheduling: decide(Boot), {hosts} hosts × {per_host} devices"),
            i as u64,
        )
        .rate(decide_rate)
        .latency((p50, p99, max))
        .floor("p99 < 1 ms", p99 < 1000.0)
        .note(format!(
            "one-device flavor; {devices} devices, {free} free matching; snapshot + pure decision incl. its index reads; view folded from {events} events in {:.1} s",
            build.as_secs_f64()
        )),
        Figure::new(
            "schedule_query",
            "scheduling: view query free_devices_matching",
            n_q as u64,
        )
        .latency(q.summary())
        .note(format!("{free} device records read and decoded per query")),
        Figure::new(
            "raw_index_scan",
            "raw: redb range read of the matching index keys",
            n_q as u64,
        )
        .latency(raw.summary())
        .note(format!("read txn + {keys} keys (vendor:product, host, device id), no values")),
    ])
}
