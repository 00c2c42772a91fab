//! The fold alone, as `usbpt bench`'s `fold_apply` measures it, for a profiler: the synthetic
//! history (`hosts = events / 500`, 10 to 2,000, × 16 devices), encoded up front, then folded
//! into a fresh view with `View::apply_batch` in commits of `COMMIT` events (default 200,000,
//! the projector's `max_commit_events`), an fsync each.
//!
//! `cargo run --profile dist -p usbpt-projector --example fold_profile -- [EVENTS] [COMMIT]`
//!
//! Instructions per event, the fold only (`apply_batch` and what it calls):
//!
//! ```sh
//! valgrind --tool=callgrind --toggle-collect='*View*apply_batch*' \
//!     target/dist/examples/fold_profile 200000
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use anyhow::Result;
use usbpt_projector::workload::Workload;
use usbpt_projector::{digest, BatchOptions, RawEvent, View};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().map_or(Ok(200_000), |a| a.parse())?;
    let commit: usize = args.next().map_or(Ok(200_000), |a| a.parse())?;
    let hosts = (events / 500).clamp(10, 2000);
    let raw: Vec<RawEvent> = Workload::new(1, hosts, 16).raw(events)?;
    let dir = tempfile::tempdir()?;
    let view = View::open(dir.path().join("fold.redb"))?;
    let t = Instant::now();
    let mut quarantined = 0;
    for chunk in raw.chunks(commit) {
        quarantined += view
            .apply_batch(chunk, &BatchOptions::default())?
            .quarantined;
    }
    let d = t.elapsed();
    println!(
        "fold alone ({hosts} hosts, commits of {commit}, fsync each): {events} events in {:.2} s = {:.0} events/s, {:.2} µs/event; {quarantined} quarantined",
        d.as_secs_f64(),
        events as f64 / d.as_secs_f64(),
        d.as_secs_f64() * 1e6 / events as f64,
    );
    if std::env::var_os("DIGEST").is_some() {
        let d = digest::digest(&view.snapshot()?)?;
        for t in &d.tables {
            println!("  {} {} {}", t.table, t.entries, t.sha256);
        }
        println!("view digest {}", d.sha256);
    }
    Ok(())
}
