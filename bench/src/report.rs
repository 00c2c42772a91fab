//! What `usbpt bench` prints.

use serde::Serialize;

/// One measured figure, with the raw engine limit it is compared to when there is one.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    /// Events (or operations) per second, when a rate is measured.
    pub rate_per_s: Option<f64>,
    /// Latency percentiles in microseconds, when latencies are measured.
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub max_us: Option<f64>,
    /// Another value with its unit (bytes, ns, %, MiB …).
    pub value: Option<(f64, String)>,
    /// How many operations were measured.
    pub n: u64,
    /// The raw limit's figure name and usbpt's share of it (rate / raw rate).
    pub vs_raw: Option<(String, f64)>,
    pub note: String,
}

impl Figure {
    pub fn new(name: impl Into<String>, n: u64) -> Self {
        Self {
            name: name.into(),
            rate_per_s: None,
            p50_us: None,
            p99_us: None,
            max_us: None,
            value: None,
            n,
            vs_raw: None,
            note: String::new(),
        }
    }
    pub fn rate(mut self, r: f64) -> Self {
        self.rate_per_s = Some(r);
        self
    }
    pub fn latency(mut self, (p50, p99, max): (f64, f64, f64)) -> Self {
        self.p50_us = Some(p50);
        self.p99_us = Some(p99);
        self.max_us = Some(max);
        self
    }
    pub fn value(mut self, v: f64, unit: &str) -> Self {
        self.value = Some((v, unit.to_owned()));
        self
    }
    pub fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub machine: String,
    pub nats_server: String,
    pub figures: Vec<Figure>,
}

impl Report {
    /// Sets `vs_raw` of figure `name` to its rate divided by figure `raw`'s rate.
    pub fn compare(&mut self, name: &str, raw: &str) {
        let raw_rate = self
            .figures
            .iter()
            .find(|f| f.name == raw)
            .and_then(|f| f.rate_per_s);
        if let (Some(r), Some(f)) = (raw_rate, self.figures.iter_mut().find(|f| f.name == name)) {
            if let Some(mine) = f.rate_per_s {
                if r > 0.0 {
                    f.vs_raw = Some((raw.to_owned(), mine / r));
                }
            }
        }
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut out = format!("usbpt bench on {} ({})\n", self.machine, self.nats_server);
        out.push_str(&format!(
            "{:<46} {:>12} {:>10} {:>10} {:>10} {:>16} {:>9}\n",
            "figure", "rate/s", "p50 µs", "p99 µs", "max µs", "value", "vs raw"
        ));
        let num = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        for f in &self.figures {
            let value = f
                .value
                .as_ref()
                .map_or_else(|| "-".to_owned(), |(v, u)| format!("{v:.1} {u}"));
            let ratio = f
                .vs_raw
                .as_ref()
                .map_or_else(|| "-".to_owned(), |(_, r)| format!("{:.0}%", r * 100.0));
            out.push_str(&format!(
                "{:<46} {:>12} {:>10} {:>10} {:>10} {:>16} {:>9}\n",
                f.name,
                num(f.rate_per_s),
                num(f.p50_us),
                num(f.p99_us),
                num(f.max_us),
                value,
                ratio
            ));
            if !f.note.is_empty() {
                out.push_str(&format!("    {}\n", f.note));
            }
        }
        out
    }
}
