//! `usbpt replay [--until SEQ] [--verify]`: rebuild the view from stream sequence 1 into a fresh
//! redb file, with a progress bar on stderr (hidden when stderr is not a terminal).
//!
//! - Without `--verify`: prints the world as it was at the last replayed sequence (devices with
//!   their status and holders, servers and their devices, claims).
//! - `--verify`: replays up to the live view's last applied sequence and compares every table
//!   of both views (canonical digests); fails naming the first differing key.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use usbpt_api::docs;
use usbpt_projector::{digest, replay, DeviceFilter, Snapshot, View};

use crate::cmd_serve::view_path;
use crate::global::Global;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Stop at this stream sequence: the world as it was then.
    #[arg(long, conflicts_with = "verify")]
    pub until: Option<u64>,
    /// Compare a clean replay with the live view (<data-dir>/view.redb); exit non-zero, naming
    /// the first differing key, if they differ.
    #[arg(long)]
    pub verify: bool,
    /// Keep the rebuilt view in this (new) file; by default it is a temporary file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One JSON document on stdout.
    #[arg(long)]
    pub json: bool,
}

pub async fn replay(global: &Global, a: ReplayArgs) -> Result<()> {
    let bus = global.bus().await?;
    // The live view (for --verify) is read in one snapshot, held while the replay runs.
    let live = if a.verify {
        let path = view_path(global)?;
        let view = View::open_read_only(&path)
            .with_context(|| format!("opening the live view {}", path.display()))?;
        let snap = view.snapshot()?;
        let seq = snap.last_applied_seq()?;
        if seq == 0 {
            bail!("the live view {} has applied nothing yet", path.display());
        }
        Some((view, snap, seq))
    } else {
        None
    };
    let target = match (&live, a.until) {
        (Some((_, _, seq)), _) => *seq,
        (None, Some(u)) => u,
        (None, None) => bus.last_sequence().await?,
    };

    let scratch;
    let path = match &a.out {
        Some(p) => {
            if p.exists() {
                bail!("{} exists; --out needs a new file", p.display());
            }
            p.clone()
        }
        None => {
            scratch = tempfile::Builder::new()
                .prefix("usbpt-replay-")
                .tempdir()
                .context("creating a temporary directory")?;
            scratch.path().join("view.redb")
        }
    };
    let rebuilt = Arc::new(View::open_private(&path)?);

    let bar = ProgressBar::with_draw_target(Some(target), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} events ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let report = replay::rebuild(&bus, Arc::clone(&rebuilt), target, |seq| {
        bar.set_position(seq)
    })
    .await?;
    bar.finish_and_clear();
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    let rate = (report.applied + report.quarantined) as f64 / secs;
    let snap = rebuilt.snapshot()?;

    if let Some((_, live_snap, seq)) = &live {
        // One pass over both views compares them and digests the replay.
        let replay_digest = match digest::compare(live_snap, &snap)? {
            Ok(d) => d,
            Err(diff) => bail!("the live view differs from a clean replay of sequences 1..={seq}: {diff} (first view: live, second: replay)"),
        };
        if a.json {
            println!(
                "{}",
                json!({
                    "verified": true,
                    "last_applied_seq": seq,
                    "digest": replay_digest.to_string(),
                    "tables": replay_digest.tables.iter().map(|t| json!({"table": t.table, "entries": t.entries, "sha256": t.sha256})).collect::<Vec<_>>(),
                    "elapsed_ms": report.elapsed.as_millis() as u64,
                })
            );
        } else {
            println!(
                "verified: the live view at sequence {seq} equals a clean replay ({} events in {secs:.2} s, {rate:.0} events/s; digest {replay_digest})",
                report.applied + report.quarantined
            );
        }
        return Ok(());
    }

    let replay_digest = digest::digest(&snap)?;
    let world = world(&snap, &global.api)?;
    if a.json {
        let mut doc = json!({
            "until": target,
            "last_applied_seq": report.last_seq,
            "applied": report.applied,
            "quarantined": report.quarantined,
            "elapsed_ms": report.elapsed.as_millis() as u64,
            "digest": replay_digest.to_string(),
        });
        if let (Value::Object(d), Value::Object(w)) = (&mut doc, world) {
            d.extend(w);
        }
        println!("{doc}");
        return Ok(());
    }
    println!(
        "replayed sequences 1..={}: {} applied, {} quarantined, in {secs:.2} s ({rate:.0} events/s); digest {replay_digest}",
        report.last_seq, report.applied, report.quarantined
    );
    if let Some(p) = &a.out {
        println!("the rebuilt view is in {}", p.display());
    }
    print_world(&world, report.last_seq);
    Ok(())
}

/// The world at the snapshot's sequence: current devices, live servers, claims. Server
/// documents are the API's at microversion 2.1, their links under `api` (`--api`).
fn world(snap: &Snapshot, api: &str) -> Result<Value> {
    let nova = usbpt_api::nova::Nova {
        version: usbpt_api::nova::MIN_VERSION,
        base: api.trim_end_matches('/').to_owned(),
    };
    let devices = snap.devices(&DeviceFilter::default())?;
    let mut servers = Vec::new();
    for s in snap.servers(false)? {
        servers.push(docs::server(snap, &s, &nova)?);
    }
    Ok(json!({
        "devices": usbpt_api::identity::labeled_devices(snap, &devices)?,
        "servers": servers,
        "claims": snap.claims()?.iter().map(docs::claim).collect::<Vec<_>>(),
    }))
}

/// A value as text for people, escaped like every printer's (`usbpt_schemas::text`).
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => usbpt_schemas::text::escape(s).into_owned(),
        other => usbpt_schemas::text::escape(&other.to_string()).into_owned(),
    }
}

fn print_world(world: &Value, seq: u64) {
    println!("\ndevices at sequence {seq}:");
    let devices = world["devices"].as_array().cloned().unwrap_or_default();
    for d in &devices {
        println!(
            "  {}  {:<12} {:<11} {}:{}  {:<8} {:<10} holder {}",
            text(&d["id"]),
            text(&d["host"]),
            text(&d["status"]),
            text(&d["vendor_id"]),
            text(&d["product_id"]),
            text(&d["address"]),
            text(&d["port_path"]),
            text(&d["holder"]),
        );
    }
    println!("\nservers at sequence {seq}:");
    for s in world["servers"].as_array().into_iter().flatten() {
        let usb: Vec<String> = s["usb_devices"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|u| format!("{} ({})", text(&u["device_id"]), text(&u["status"])))
            .collect();
        println!(
            "  {:<16} {:<8} on {:<12} devices: {}",
            text(&s["name"]),
            text(&s["status"]),
            text(&s["host"]),
            if usb.is_empty() {
                "-".to_owned()
            } else {
                usb.join(", ")
            }
        );
    }
}
