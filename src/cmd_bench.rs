//! `usbpt bench [--quick] [--json] [--nats URL] [--only SECTIONS] [--fold-events N]`: the benchmark suite
//! (`usbpt_bench`). Against private nats-servers in temp dirs (default fsync and
//! `sync_interval: always`) unless `--nats`/`NATS_URL` names one. `--only codec,fold` measures
//! just those sections (`codec`, `publish`, `hotplug`, `claims`, `sched`, `fold`, `idle`); the
//! report names the sections it holds. A table on stdout, or with `--json` one JSON document;
//! progress on stderr.

use anyhow::{Context, Result};
use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::Args;
use serde::Serialize;
use usbpt_bench::{Report, Section};

use crate::global::Global;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A smoke run: small counts, every figure, well under a minute (numbers not meaningful).
    #[arg(long)]
    pub quick: bool,
    /// One JSON document on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Measure only these sections (comma-separated, e.g. `hotplug,sched`); default: all.
    #[arg(long, value_name = "SECTIONS", value_delimiter = ',', value_parser = section_parser())]
    pub only: Vec<Section>,
    /// Events of the synthetic history the fold section folds and replays (default 1,000,000;
    /// 5,000 with --quick): how replay time and view size grow with the history.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub fold_events: Option<u64>,
}

/// `--only`'s values: the section names, each with what it measures in `--help`.
fn section_parser() -> impl TypedValueParser<Value = Section> {
    PossibleValuesParser::new(Section::ALL.map(|s| PossibleValue::new(s.name()).help(s.about())))
        .try_map(|name| name.parse::<Section>())
}

/// The JSON document: the report and the sections it holds (all of them unless `--only`).
#[derive(Debug, Serialize)]
struct Document<'a> {
    sections: Vec<Section>,
    #[serde(flatten)]
    report: &'a Report,
}

pub async fn run(global: &Global, args: BenchArgs) -> Result<()> {
    let options = usbpt_bench::Options {
        quick: args.quick,
        nats: crate::global::nats_given().then(|| global.nats.clone()),
        usbpt: std::env::current_exe().ok(),
        only: args.only,
        fold_events: args
            .fold_events
            .map(|n| usize::try_from(n).context("--fold-events is too large"))
            .transpose()?,
    };
    let started = std::time::Instant::now();
    let report = usbpt_bench::run(&options, |what| {
        eprintln!(
            "usbpt bench [{:>5.1} s] {what}",
            started.elapsed().as_secs_f64()
        );
    })
    .await?;
    let sections = options.sections();
    if args.json {
        let document = Document {
            sections,
            report: &report,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&document).context("encoding the report")?
        );
    } else {
        let table = report.table();
        if options.is_complete() {
            print!("{table}");
        } else {
            // A partial run says so under the title line, so it is never read as a full one.
            let names: Vec<&str> = sections.iter().map(|s| s.name()).collect();
            let (title, rest) = table.split_once('\n').unwrap_or((table.as_str(), ""));
            print!(
                "{title}\n  only: {} (--only; the other sections were not run)\n{rest}",
                names.join(", ")
            );
        }
    }
    Ok(())
}
