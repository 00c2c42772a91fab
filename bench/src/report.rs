//! What `usbpt bench` prints: one [`Figure`] per measurement, each usbpt figure beside the raw
//! engine figure it is compared to, as a human table or one JSON document.

use serde::Serialize;

/// A value with its unit (bytes, ns, %, MiB …).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Value {
    pub value: f64,
    pub unit: String,
}

/// How a figure compares to the raw engine figure underneath it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VsRaw {
    /// The raw figure's key.
    pub raw: String,
    /// `rate / raw rate` for throughputs, `raw p50 / p50` for latencies: the share of the
    /// engine's limit usbpt achieves (1.0 = no overhead over the engines).
    pub ratio: f64,
    /// `"rate"` or `"p50"`: what was compared.
    pub basis: &'static str,
}

/// A target the design sets (reported, never asserted).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Floor {
    pub target: String,
    pub met: bool,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable machine name (`hotplug_to_view`, `raw_publish_each_ack.sync_always` …).
    pub key: String,
    /// What was measured, for people.
    pub name: String,
    /// How many operations were measured.
    pub n: u64,
    /// Operations per second, when a rate is measured.
    pub rate_per_s: Option<f64>,
    /// Latency percentiles in microseconds, when latencies are measured.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub max_us: Option<f64>,
    pub value: Option<Value>,
    pub vs_raw: Option<VsRaw>,
    pub floor: Option<Floor>,
    pub note: String,
}

impl Figure {
    pub fn new(key: impl Into<String>, name: impl Into<String>, n: u64) -> Self {
        Self {
            key: key.into(),
            name: name.into(),
            n,
            rate_per_s: None,
            p50_us: None,
            p99_us: None,
            max_us: None,
            value: None,
            vs_raw: None,
            floor: None,
            note: String::new(),
        }
    }
    pub fn rate(mut self, r: f64) -> Self {
        self.rate_per_s = Some(r);
        self
    }
    /// `(p50, p99, max)` in microseconds, as [`crate::stats::Samples::summary`] gives them.
    pub fn latency(mut self, (p50, p99, max): (f64, f64, f64)) -> Self {
        self.p50_us = Some(p50);
        self.p99_us = Some(p99);
        self.max_us = Some(max);
        self
    }
    pub fn value(mut self, v: f64, unit: &str) -> Self {
        self.value = Some(Value {
            value: v,
            unit: unit.to_owned(),
        });
        self
    }
    pub fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }
    pub fn floor(mut self, target: impl Into<String>, met: bool) -> Self {
        self.floor = Some(Floor {
            target: target.into(),
            met,
        });
        self
    }
    /// The same figure under another key suffix (`.sync_always`) and name suffix.
    pub fn suffixed(mut self, key: &str, name: &str) -> Self {
        if !key.is_empty() {
            self.key = format!("{}.{key}", self.key);
            self.name = format!("{} [{name}]", self.name);
        }
        self
    }
}

/// Where the run happened.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn detect() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            memory_gib,
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub usbpt_version: String,
    /// `"quick"` or `"full"`.
    pub mode: String,
    pub machine: Machine,
    /// The nats-server(s) measured against: version and fsync setting.
    pub nats_servers: Vec<String>,
    pub elapsed_s: f64,
    pub figures: Vec<Figure>,
}

impl Report {
    pub fn push(&mut self, f: Figure) {
        self.figures.push(f);
    }
    pub fn extend(&mut self, fs: impl IntoIterator<Item = Figure>) {
        self.figures.extend(fs);
    }

    pub fn get(&self, key: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.key == key)
    }

    /// Sets `vs_raw` of figure `key` to its rate divided by figure `raw`'s rate.
    pub fn compare_rate(&mut self, key: &str, raw: &str) {
        let raw_rate = self.get(raw).and_then(|f| f.rate_per_s);
        if let (Some(r), Some(f)) = (raw_rate, self.figures.iter_mut().find(|f| f.key == key)) {
            if let (Some(mine), true) = (f.rate_per_s, r > 0.0) {
                f.vs_raw = Some(VsRaw {
                    raw: raw.to_owned(),
                    ratio: mine / r,
                    basis: "rate",
                });
            }
        }
    }

    /// Sets `vs_raw` of figure `key` to figure `raw`'s p50 divided by its own.
    pub fn compare_latency(&mut self, key: &str, raw: &str) {
        let raw_p50 = self.get(raw).and_then(|f| f.p50_us);
        if let (Some(r), Some(f)) = (raw_p50, self.figures.iter_mut().find(|f| f.key == key)) {
            if let (Some(mine), true) = (f.p50_us, r > 0.0) {
                if mine > 0.0 {
                    f.vs_raw = Some(VsRaw {
                        raw: raw.to_owned(),
                        ratio: r / mine,
                        basis: "p50",
                    });
                }
            }
        }
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "usbpt bench ({}) — usbpt {} on {} ({} cores, {:.0} GiB, Linux {})\n",
            self.mode,
            self.usbpt_version,
            self.machine.cpu,
            self.machine.cores,
            self.machine.memory_gib,
            self.machine.kernel
        );
        for s in &self.nats_servers {
            out.push_str(&format!("  {s}\n"));
        }
        out.push_str(&format!(
            "{:<60} {:>9} {:>10} {:>9} {:>9} {:>9} {:>11} {:>9} {:>6}\n",
            "figure", "n", "rate/s", "p50", "p99", "max", "value", "vs raw", "floor"
        ));
        for f in &self.figures {
            let value = f
                .value
                .as_ref()
                .map_or_else(|| "-".to_owned(), |v| format_value(v.value, &v.unit));
            let ratio = f.vs_raw.as_ref().map_or_else(
                || "-".to_owned(),
                |r| match r.basis {
                    "p50" => format!("{:.0}% p50", r.ratio * 100.0),
                    _ => format!("{:.0}%", r.ratio * 100.0),
                },
            );
            let floor = f
                .floor
                .as_ref()
                .map_or("-", |fl| if fl.met { "ok" } else { "MISSED" });
            out.push_str(&format!(
                "{:<60} {:>9} {:>10} {:>9} {:>9} {:>9} {:>11} {:>9} {:>6}\n",
                clip(&f.name, 60),
                group(f.n as f64),
                f.rate_per_s.map_or_else(|| "-".to_owned(), group),
                micros(f.p50_us),
                micros(f.p99_us),
                micros(f.max_us),
                value,
                ratio,
                floor
            ));
            let mut notes = Vec::new();
            if let Some(r) = &f.vs_raw {
                notes.push(format!("vs {}", r.raw));
            }
            if let Some(fl) = &f.floor {
                notes.push(format!("floor: {}", fl.target));
            }
            if !f.note.is_empty() {
                notes.push(f.note.clone());
            }
            if !notes.is_empty() {
                out.push_str(&format!("    {}\n", notes.join("; ")));
            }
        }
        out.push_str(&format!(
            "vs raw: share of the engine's limit measured in the same run (rate / raw rate, or raw p50 / p50). Took {:.0} s.\n",
            self.elapsed_s
        ));
        out
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut c: String = s.chars().take(n - 1).collect();
        c.push('…');
        c
    }
}

/// 1234567 → "1,234,567" (rounded to an integer; small values keep one decimal).
fn group(v: f64) -> String {
    if v < 100.0 && v.fract() != 0.0 {
        return format!("{v:.1}");
    }
    let s = format!("{:.0}", v.round());
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}

fn micros(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(us) if us >= 10_000.0 => format!("{:.1} ms", us / 1000.0),
        Some(us) if us >= 1000.0 => format!("{:.2} ms", us / 1000.0),
        Some(us) if us >= 10.0 => format!("{us:.0} µs"),
        Some(us) => format!("{us:.1} µs"),
    }
}

fn format_value(v: f64, unit: &str) -> String {
    if v.fract() == 0.0 || v >= 100.0 {
        format!("{} {unit}", group(v))
    } else if v >= 1.0 {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.3} {unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_readable() {
        assert_eq!(group(1234567.4), "1,234,567");
        assert_eq!(group(999.0), "999");
        assert_eq!(group(12.25), "12.2");
        assert_eq!(micros(Some(118.4)), "118 µs");
        assert_eq!(micros(Some(2420.0)), "2.42 ms");
        assert_eq!(micros(Some(35_000.0)), "35.0 ms");
        assert_eq!(format_value(95.0, "B"), "95 B");
        assert_eq!(format_value(0.0125, "%"), "0.013 %");
    }

    #[test]
    fn ratios_compare_rates_and_latencies() {
        let mut r = Report::default();
        r.push(
            Figure::new("raw", "raw", 1)
                .rate(1000.0)
                .latency((100.0, 200.0, 300.0)),
        );
        r.push(
            Figure::new("mine", "mine", 1)
                .rate(250.0)
                .latency((400.0, 800.0, 900.0)),
        );
        r.push(Figure::new("lat", "lat", 1).latency((400.0, 800.0, 900.0)));
        r.compare_rate("mine", "raw");
        r.compare_latency("lat", "raw");
        r.compare_rate("missing", "raw");
        assert_eq!(
            r.get("mine")
                .and_then(|f| f.vs_raw.clone())
                .map(|v| v.ratio),
            Some(0.25)
        );
        assert_eq!(
            r.get("lat").and_then(|f| f.vs_raw.clone()).map(|v| v.ratio),
            Some(0.25)
        );
        assert!(r.table().contains("25% p50"));
    }
}
