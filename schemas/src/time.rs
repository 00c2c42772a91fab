//! Event time: microseconds since the Unix epoch. Binary formats carry an `i64`; JSON an RFC 3339
//! string. Only the edges (agents, command handlers) read the clock; folding never does.

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Self(jiff::Timestamp::now().as_microsecond())
    }
    pub fn from_micros(us: i64) -> Self {
        Self(us)
    }
    pub fn as_micros(self) -> i64 {
        self.0
    }
    /// `self + micros`, saturating.
    pub fn plus_micros(self, micros: i64) -> Self {
        Self(self.0.saturating_add(micros))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match jiff::Timestamp::from_microsecond(self.0) {
            Ok(t) => write!(f, "{t:.6}"),
            Err(_) => write!(f, "@{}us", self.0),
        }
    }
}

/// An RFC 3339 time (`2026-12-02T14:00:00Z`), as JSON carries it and `--since`/`--until` take it.
impl std::str::FromStr for Timestamp {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t: jiff::Timestamp = s
            .parse()
            .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))?;
        Ok(Self(t.as_microsecond()))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_i64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            let t: jiff::Timestamp = s.parse().map_err(D::Error::custom)?;
            Ok(Self(t.as_microsecond()))
        } else {
            i64::deserialize(d).map(Self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_is_rfc3339() {
        let t = Timestamp(1_764_000_000_123_456);
        let j = serde_json::to_string(&t).expect("json");
        assert_eq!(j, "\"2025-11-24T16:00:00.123456Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&j).expect("parse"), t);
    }
}
