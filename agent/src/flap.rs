//! Port flapping (issue 18, ADR 0011): a lineage that re-enumerates more than `threshold` times
//! within `window` is flapping (a failing hub port, a loose cable, autosuspend fighting a
//! device). The agent publishes `PortFlapping` once when an episode starts and
//! `PortFlappingCleared` once when no enumeration of the lineage happened for `quiet`; while it
//! flaps, the lineage is not re-attached on every enumeration (the guest is not bounced each
//! time) and the fold keeps it from new claims.
//!
//! The detector is pure: the caller passes every instant in, so it is tested without sleeping,
//! and tells the run loop when to call back ([`Detector::next_deadline`]). Its memory is bounded:
//! at most [`TRACKED`] lineages, each with at most `threshold + 1` instants.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;
use usbpt_schemas::LineageId;

/// How many lineages the detector follows at once. A host has tens of devices; a lineage idle
/// for a window is forgotten first, one not flapping next, a flapping one never.
pub const TRACKED: usize = 1024;

/// The detector's settings (`usbpt agent --flap-threshold/--flap-window/--flap-quiet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlapSettings {
    /// More enumerations than this within `window` start an episode; `0` disables detection.
    pub threshold: u32,
    pub window: Duration,
    /// An episode ends after this long without an enumeration of the lineage.
    pub quiet: Duration,
}

impl FlapSettings {
    /// A re-plug, a guest's USB reset or a host reboot each give one or two enumerations; five
    /// in a minute is a port or cable at fault. Two quiet minutes (twice the window) before the
    /// all-clear, so a port that flaps in bursts is not re-attached between them.
    pub const DEFAULT: FlapSettings = FlapSettings {
        threshold: 5,
        window: Duration::from_secs(60),
        quiet: Duration::from_secs(120),
    };

    pub fn enabled(&self) -> bool {
        self.threshold > 0
    }
}

impl Default for FlapSettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[derive(Debug)]
struct Track {
    /// The latest enumerations within the window, oldest first (at most `threshold + 1`).
    seen: VecDeque<Instant>,
    last: Instant,
    flapping: bool,
}

/// Per lineage, a sliding window of enumeration instants and whether an episode is open.
#[derive(Debug)]
pub struct Detector {
    settings: FlapSettings,
    tracks: HashMap<LineageId, Track>,
}

impl Detector {
    pub fn new(settings: FlapSettings) -> Self {
        Self {
            settings,
            tracks: HashMap::new(),
        }
    }

    pub fn settings(&self) -> FlapSettings {
        self.settings
    }

    /// An episode recorded before a restart: it goes on, and ends after `quiet` from `now`
    /// unless the lineage keeps enumerating (so it is never left open).
    pub fn resume(&mut self, lineage: LineageId, now: Instant) {
        self.tracks.insert(
            lineage,
            Track {
                seen: VecDeque::new(),
                last: now,
                flapping: true,
            },
        );
    }

    /// `lineage` enumerated at `now`. `Some(n)` when this opens an episode (`n` enumerations
    /// within the window, this one included); `None` otherwise, also while one is open.
    pub fn enumerated(&mut self, lineage: LineageId, now: Instant) -> Option<u32> {
        if !self.settings.enabled() {
            return None;
        }
        if !self.tracks.contains_key(&lineage) && !self.make_room(now) {
            return None;
        }
        let limit = self.settings.threshold as usize + 1;
        let window = self.settings.window;
        let t = self.tracks.entry(lineage).or_insert_with(|| Track {
            seen: VecDeque::new(),
            last: now,
            flapping: false,
        });
        t.last = now;
        t.seen.push_back(now);
        while t
            .seen
            .front()
            .is_some_and(|s| now.saturating_duration_since(*s) >= window)
            || t.seen.len() > limit
        {
            t.seen.pop_front();
        }
        let n = t.seen.len() as u32;
        if !t.flapping && n > self.settings.threshold {
            t.flapping = true;
            return Some(n);
        }
        None
    }

    pub fn is_flapping(&self, lineage: LineageId) -> bool {
        self.tracks.get(&lineage).is_some_and(|t| t.flapping)
    }

    /// The lineages in an open episode.
    pub fn flapping(&self) -> impl Iterator<Item = LineageId> + '_ {
        self.tracks
            .iter()
            .filter(|(_, t)| t.flapping)
            .map(|(l, _)| *l)
    }

    /// When the next episode may end (call [`Detector::quiet`] then).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tracks
            .values()
            .filter(|t| t.flapping)
            .map(|t| t.last + self.settings.quiet)
            .min()
    }

    /// Ends the episodes quiet for `quiet` at `now`; each lineage is returned once.
    pub fn quiet(&mut self, now: Instant) -> Vec<LineageId> {
        let quiet = self.settings.quiet;
        let mut ended = Vec::new();
        for (l, t) in &mut self.tracks {
            if t.flapping && now.saturating_duration_since(t.last) >= quiet {
                t.flapping = false;
                t.seen.clear();
                ended.push(*l);
            }
        }
        let window = self.settings.window;
        self.tracks
            .retain(|_, t| t.flapping || now.saturating_duration_since(t.last) < window);
        ended.sort();
        ended
    }

    /// How many lineages are tracked.
    pub fn tracked(&self) -> usize {
        self.tracks.len()
    }

    /// Frees a slot for a new lineage: idle ones (nothing within the window) first, then the
    /// least recently enumerated one that is not flapping. `false` when every slot flaps.
    fn make_room(&mut self, now: Instant) -> bool {
        if self.tracks.len() < TRACKED {
            return true;
        }
        let window = self.settings.window;
        self.tracks
            .retain(|_, t| t.flapping || now.saturating_duration_since(t.last) < window);
        if self.tracks.len() < TRACKED {
            return true;
        }
        let oldest = self
            .tracks
            .iter()
            .filter(|(_, t)| !t.flapping)
            .min_by_key(|(_, t)| t.last)
            .map(|(l, _)| *l);
        match oldest {
            Some(l) => {
                self.tracks.remove(&l);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lineage(n: u128) -> LineageId {
        LineageId::from_uuid(uuid::Uuid::from_u128(n))
    }

    fn settings() -> FlapSettings {
        FlapSettings {
            threshold: 3,
            window: Duration::from_secs(10),
            quiet: Duration::from_secs(20),
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn raised_once_when_the_threshold_is_exceeded_not_before() {
        let t0 = Instant::now();
        let mut d = Detector::new(settings());
        let l = lineage(1);
        for i in 0..3 {
            assert_eq!(d.enumerated(l, t0 + S * i), None, "enumeration {}", i + 1);
            assert!(!d.is_flapping(l));
        }
        assert_eq!(d.next_deadline(), None);
        assert_eq!(d.enumerated(l, t0 + S * 3), Some(4));
        assert!(d.is_flapping(l));
        for i in 4..30 {
            assert_eq!(d.enumerated(l, t0 + S * i), None, "still the same episode");
        }
        assert_eq!(d.next_deadline(), Some(t0 + S * 29 + settings().quiet));
    }

    #[test]
    fn enumerations_spread_wider_than_the_window_never_raise() {
        let t0 = Instant::now();
        let mut d = Detector::new(settings());
        let l = lineage(1);
        // One every 4 s: at most 3 within any 10 s.
        for i in 0..50 {
            assert_eq!(d.enumerated(l, t0 + S * 4 * i), None, "enumeration {i}");
        }
        assert!(!d.is_flapping(l));
    }

    #[test]
    fn cleared_once_after_the_quiet_period_then_a_new_episode_can_start() {
        let t0 = Instant::now();
        let mut d = Detector::new(settings());
        let l = lineage(7);
        let other = lineage(8);
        for i in 0..4 {
            d.enumerated(l, t0 + S * i);
        }
        d.enumerated(other, t0 + S * 5);
        let deadline = d.next_deadline().expect("an open episode");
        assert_eq!(deadline, t0 + S * 3 + settings().quiet);
        assert_eq!(d.quiet(deadline - S), Vec::<LineageId>::new(), "not yet");
        // An enumeration during the quiet period pushes the end back.
        assert_eq!(d.enumerated(l, deadline - S), None);
        assert_eq!(d.quiet(deadline), Vec::<LineageId>::new());
        let deadline = d.next_deadline().expect("still open");
        assert_eq!(deadline, t0 + S * 22 + settings().quiet);
        assert_eq!(d.quiet(deadline), vec![l]);
        assert!(!d.is_flapping(l));
        assert_eq!(d.quiet(deadline + S * 100), Vec::<LineageId>::new(), "once");
        assert_eq!(d.next_deadline(), None);
        // A new storm is a new episode, counted afresh.
        let t1 = deadline + S * 100;
        for i in 0..3 {
            assert_eq!(d.enumerated(l, t1 + S * i), None);
        }
        assert_eq!(d.enumerated(l, t1 + S * 3), Some(4));
    }

    #[test]
    fn a_resumed_episode_ends_after_quiet_from_the_restart() {
        let t0 = Instant::now();
        let mut d = Detector::new(settings());
        let l = lineage(3);
        d.resume(l, t0);
        assert!(d.is_flapping(l));
        assert_eq!(d.flapping().collect::<Vec<_>>(), [l]);
        assert_eq!(d.enumerated(l, t0 + S), None, "no second raise");
        assert_eq!(d.quiet(t0 + S + settings().quiet), vec![l]);
    }

    #[test]
    fn a_threshold_of_zero_disables_detection() {
        let t0 = Instant::now();
        let mut d = Detector::new(FlapSettings {
            threshold: 0,
            ..settings()
        });
        for i in 0..100 {
            assert_eq!(d.enumerated(lineage(1), t0 + S * i / 10), None);
        }
        assert_eq!(d.tracked(), 0);
    }

    #[test]
    fn memory_is_bounded_and_flapping_lineages_are_kept() {
        let t0 = Instant::now();
        let mut d = Detector::new(settings());
        let flapper = lineage(u128::MAX);
        for i in 0..4 {
            d.enumerated(flapper, t0 + S * i);
        }
        assert!(d.is_flapping(flapper));
        // Many lineages within one window: the count stays at the cap.
        for n in 0..(TRACKED as u128 * 3) {
            d.enumerated(lineage(n), t0 + S * 4);
            assert!(d.tracked() <= TRACKED);
        }
        assert_eq!(d.tracked(), TRACKED);
        assert!(d.is_flapping(flapper), "an open episode is never forgotten");
        // After the window, idle lineages are forgotten by the next quiet check.
        d.quiet(t0 + S * 4 + settings().window);
        assert_eq!(d.tracked(), 1);
        // Each lineage keeps at most threshold + 1 instants.
        for i in 0..1000 {
            d.enumerated(flapper, t0 + S * 20 + Duration::from_millis(i));
        }
        assert!(d.tracks[&flapper].seen.len() <= 4);
    }
}
