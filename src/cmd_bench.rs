//! `usbpt bench [--quick] [--json] [--nats URL]`: the benchmark suite (`usbpt_bench`). Against
//! private nats-servers in temp dirs (default fsync and `sync_interval: always`) unless
//! `--nats`/`NATS_URL` names one. A table on stdout, or with `--json` one JSON document;
//! progress on stderr.

use anyhow::{Context, Result};
use clap::Args;

use crate::cli::Global;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A smoke run: small counts, every figure, well under a minute (numbers not meaningful).
    #[arg(long)]
    pub quick: bool,
    /// One JSON document on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(global: &Global, args: BenchArgs) -> Result<()> {
    let options = usbpt_bench::Options {
        quick: args.quick,
        nats: crate::demo::nats_given().then(|| global.nats.clone()),
        usbpt: std::env::current_exe().ok(),
    };
    let started = std::time::Instant::now();
    let report = usbpt_bench::run(&options, |what| {
        eprintln!(
            "usbpt bench [{:>5.1} s] {what}",
            started.elapsed().as_secs_f64()
        );
    })
    .await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("encoding the report")?
        );
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
