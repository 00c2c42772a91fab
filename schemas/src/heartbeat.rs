//! An agent's liveness beat (ADR 0008): a core-NATS message on [`crate::subjects::heartbeat`],
//! never stored in the stream (a beat every few seconds per host is not history). The body is
//! one line of text so any NATS tool can read it: `alive <interval_ms>` while the agent runs,
//! `stopping` when it shuts down cleanly.

use std::time::Duration;

use thiserror::Error;

/// How often an agent beats.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// A host whose agent has not beaten for this many of its announced intervals is down.
pub const MISSED_BEATS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// The agent runs and beats every `interval`.
    Alive { interval: Duration },
    /// The agent is shutting down cleanly: the host is down from now on.
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("not a heartbeat: {0:?}")]
pub struct HeartbeatError(String);

impl Heartbeat {
    pub fn encode(&self) -> String {
        match self {
            Heartbeat::Alive { interval } => format!("alive {}", interval.as_millis()),
            Heartbeat::Stopping => "stopping".into(),
        }
    }

    pub fn parse(body: &[u8]) -> Result<Self, HeartbeatError> {
        let bad = || HeartbeatError(String::from_utf8_lossy(body).chars().take(64).collect());
        let text = std::str::from_utf8(body).map_err(|_| bad())?;
        match text.split_once(' ') {
            None if text == "stopping" => Ok(Heartbeat::Stopping),
            Some(("alive", ms)) => {
                let ms: u64 = ms.parse().map_err(|_| bad())?;
                if ms == 0 || ms > 3_600_000 {
                    return Err(bad());
                }
                Ok(Heartbeat::Alive {
                    interval: Duration::from_millis(ms),
                })
            }
            _ => Err(bad()),
        }
    }

    /// How long after this beat the host still counts as up.
    pub fn valid_for(&self) -> Duration {
        match self {
            Heartbeat::Alive { interval } => *interval * MISSED_BEATS,
            Heartbeat::Stopping => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_garbage() {
        for hb in [Heartbeat::Alive { interval: INTERVAL }, Heartbeat::Stopping] {
            assert_eq!(Heartbeat::parse(hb.encode().as_bytes()), Ok(hb));
        }
        assert_eq!(
            Heartbeat::Alive { interval: INTERVAL }.encode(),
            "alive 2000"
        );
        for bad in [
            "",
            "alive",
            "alive 0",
            "alive -1",
            "alive 2s",
            "stop",
            "stopping now",
        ] {
            assert!(Heartbeat::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert_eq!(
            Heartbeat::Alive { interval: INTERVAL }.valid_for(),
            Duration::from_secs(6)
        );
        assert_eq!(Heartbeat::Stopping.valid_for(), Duration::ZERO);
    }
}
