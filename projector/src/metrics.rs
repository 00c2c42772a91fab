//! The projector's runtime metrics and their Prometheus text rendering.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::model::QuarantineReason;

/// Upper bounds (seconds) of the fold batch latency histogram.
const BATCH_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A Prometheus histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; BATCH_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, c) in BATCH_BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                c.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bound, c) in BATCH_BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", c.load(Relaxed));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let sum = self.sum_nanos.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

/// What the running projector counts (this process only; the per-kind and per-reason totals of
/// the whole history live in the view's `counters` table).
#[derive(Debug, Default)]
pub struct ProjectorMetrics {
    pub batches: AtomicU64,
    pub applied: AtomicU64,
    pub quarantined: AtomicU64,
    /// Redelivered events skipped because they were already folded.
    pub redelivered_skipped: AtomicU64,
    pub last_applied: AtomicU64,
    /// The stream's last sequence as last seen by the consumer.
    pub stream_last: AtomicU64,
    /// Events stored but not yet folded.
    pub lag: AtomicU64,
    /// Times the durable consumer was re-created at the view's resume point.
    pub consumer_resets: AtomicU64,
    /// Transient bus errors (fetches retried).
    pub errors: AtomicU64,
    /// Time spent folding (decoding, checking, staging), in microseconds.
    pub fold_micros: AtomicU64,
    /// Time spent writing and committing batches, in microseconds.
    pub write_micros: AtomicU64,
    pub fold_batch: Histogram,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

impl ProjectorMetrics {
    /// Prometheus text format. `counters` are the view's history totals
    /// ([`crate::Snapshot::counters`]).
    pub fn render(&self, counters: &BTreeMap<String, u64>) -> String {
        let mut out = String::new();
        let n = "usbpt_projector_events_applied_total";
        family(
            &mut out,
            n,
            "counter",
            "Events folded into the view, by kind, over the view's whole history.",
        );
        for (key, v) in counters {
            if let Some(kind) = key.strip_prefix("applied.") {
                let _ = writeln!(out, "{n}{{kind=\"{kind}\"}} {v}");
            }
        }
        let n = "usbpt_projector_events_quarantined_total";
        family(
            &mut out,
            n,
            "counter",
            "Events set aside instead of applied, by reason, over the view's whole history.",
        );
        for r in QuarantineReason::ALL {
            let v = counters
                .get(&format!("quarantined.{}", r.as_str()))
                .copied()
                .unwrap_or(0);
            let _ = writeln!(out, "{n}{{reason=\"{}\"}} {v}", r.as_str());
        }
        let n = "usbpt_alarms_active";
        family(
            &mut out,
            n,
            "gauge",
            "Active identity alarms by kind (raised minus cleared; docs/identity.md).",
        );
        for k in crate::model::AlarmKind::ALL {
            let get = |what: &str| {
                counters
                    .get(&format!("{what}.{}", k.as_str()))
                    .copied()
                    .unwrap_or(0)
            };
            let active = get("alarms_raised").saturating_sub(get("alarms_cleared"));
            let _ = writeln!(out, "{n}{{kind=\"{}\"}} {active}", k.as_str());
        }
        let gauges: [(&str, &str, &AtomicU64); 3] = [
            (
                "usbpt_projector_last_applied_sequence",
                "The last stream sequence folded into the view.",
                &self.last_applied,
            ),
            (
                "usbpt_projector_stream_last_sequence",
                "The stream's last sequence, as the consumer last saw it.",
                &self.stream_last,
            ),
            (
                "usbpt_projector_lag_events",
                "Events stored in the stream but not yet folded.",
                &self.lag,
            ),
        ];
        for (name, help, v) in gauges {
            family(&mut out, name, "gauge", help);
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        }
        let counters_: [(&str, &str, &AtomicU64); 6] = [
            (
                "usbpt_projector_batches_total",
                "Batches (write transactions) committed by this process.",
                &self.batches,
            ),
            (
                "usbpt_projector_fold_microseconds_total",
                "Time this process spent folding events (decode, checks, staging).",
                &self.fold_micros,
            ),
            (
                "usbpt_projector_write_microseconds_total",
                "Time this process spent writing and committing folded batches.",
                &self.write_micros,
            ),
            (
                "usbpt_projector_redelivered_skipped_total",
                "Redelivered events skipped by this process because they were already folded.",
                &self.redelivered_skipped,
            ),
            (
                "usbpt_projector_consumer_resets_total",
                "Times this process re-created its durable consumer at the view's resume point.",
                &self.consumer_resets,
            ),
            (
                "usbpt_projector_errors_total",
                "Transient bus errors this process retried.",
                &self.errors,
            ),
        ];
        for (name, help, v) in counters_ {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", v.load(Relaxed));
        }
        self.fold_batch.render(
            &mut out,
            "usbpt_projector_fold_batch_seconds",
            "Time to fold and commit one batch (one write transaction).",
        );
        out
    }
}

/// User + system CPU seconds this process has used (Linux `/proc/self/stat`; 0 elsewhere), for
/// benchmarks that report CPU per event.
pub fn process_cpu_seconds() -> f64 {
    cpu_seconds_in("/proc/self/stat")
}

/// CPU time (user + system) process `pid` has used, in seconds; 0 if it cannot be read. The
/// bench reads the private nats-server's this way.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    cpu_seconds_in(&format!("/proc/{pid}/stat"))
}

fn cpu_seconds_in(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which may hold spaces) closed by ')'.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, in clock ticks (100 per second on Linux).
    (ticks(11) + ticks(12)) / 100.0
}
