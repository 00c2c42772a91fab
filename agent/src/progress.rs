//! What the agent reports about its own progress, for supervisors and tests: one JSON object
//! per line on stdout from `usbpt agent` (logs go to stderr), or any sink a library user gives.

use std::io::Write;
use std::sync::Arc;

use serde::Serialize;

/// One progress report. On stdout: `{"progress":"queued","events":2,"outbox":2,"cause":"add 1-2.3"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "progress", rename_all = "snake_case")]
pub enum Progress {
    /// Start-up reconciliation is written to the outbox and the monitor is listening.
    Ready {
        host: String,
        boot_id: String,
        candidates: usize,
        filtered: usize,
        outbox: u64,
    },
    /// Observations were resolved into events, now in the outbox.
    Queued {
        events: usize,
        outbox: u64,
        cause: String,
    },
    /// A full rescan replaced a picture that may have missed events.
    Rescanned {
        reason: String,
        events: usize,
        outbox: u64,
    },
    /// Connected to the bus (first time or again).
    Connected { url: String },
    /// The bus is unreachable; events wait in the outbox.
    Unreachable { error: String, outbox: u64 },
    /// The control consumer is open: work addressed to this host is received from now on.
    Listening { consumer: String },
    /// Every queued event is in the stream.
    Drained { published: u64 },
    /// Control work was refused (not this host's, not the command handler's); `refused`
    /// counts every refusal since the process started.
    WorkRefused {
        subject: String,
        kind: String,
        reason: String,
        refused: u64,
    },
    /// The agent stopped; `outbox` events wait for the next start.
    Stopped { outbox: u64 },
}

/// Where progress goes.
pub type ProgressSink = Arc<dyn Fn(&Progress) + Send + Sync>;

/// JSON lines on stdout. Write errors (a closed pipe) are ignored: progress is informative.
pub fn stdout() -> ProgressSink {
    Arc::new(|p: &Progress| {
        if let Ok(line) = serde_json::to_string(p) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    })
}

/// Discards progress.
pub fn silent() -> ProgressSink {
    Arc::new(|_: &Progress| {})
}
