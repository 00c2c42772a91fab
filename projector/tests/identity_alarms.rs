//! Identity intelligence in the fold (issue 18, ADR 0011), on real redb files without a bus:
//! the descriptor fingerprint of `DeviceDiscoveredV2` (and none for the original layout), and
//! the alarms the fold derives, raised and cleared by events and equal on replay.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../schemas/tests/common/mod.rs"]
mod common;

use bytes::Bytes;
use usbpt_projector::{BatchOptions, RawEvent, View};
use usbpt_schemas::*;
use uuid::Uuid;

fn id(n: u128) -> Uuid {
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

/// A discovery whose lineage is derived from its key, as a correct agent derives it.
fn disc(dev: u128, host: &str, port: &str, serial: Option<&str>) -> DeviceDiscovered {
    let Event::DeviceDiscovered(mut d) = common::sample_bodies().remove(1) else {
        unreachable!()
    };
    d.device_id = DeviceId(id(dev));
    d.host = common::host(host);
    d.port_path = port.parse().unwrap();
    d.serial = serial.map(str::to_owned);
    d.supersedes = None;
    d.lineage_kind = if serial.is_some() {
        LineageKind::Serial
    } else {
        LineageKind::Port
    };
    d.lineage_id = LineageId::derive(&match &d.serial {
        Some(s) => LineageKey::Serial {
            vendor: d.vendor_id,
            product: d.product_id,
            serial: s,
        },
        None => LineageKey::Port {
            host: &d.host,
            port: &d.port_path,
            vendor: d.vendor_id,
            product: d.product_id,
        },
    });
    d
}

struct Fold {
    view: View,
    seq: u64,
    _dir: tempfile::TempDir,
}

impl Fold {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let view = View::open(dir.path().join("v.redb")).unwrap();
        Self {
            view,
            seq: 0,
            _dir: dir,
        }
    }

    /// Folds `body` on `subject` (its own subject when `None`); returns the quarantine reason.
    fn fold(&mut self, body: Event, subject: Option<String>) -> Option<String> {
        self.fold_env(Envelope::new(body), subject)
    }

    fn fold_env(&mut self, env: Envelope, subject: Option<String>) -> Option<String> {
        self.seq += 1;
        let raw = RawEvent {
            seq: self.seq,
            subject: subject.unwrap_or_else(|| subjects::for_event(&env)),
            payload: Bytes::from(codec::encode(&env).unwrap()),
        };
        self.view
            .apply_batch(&[raw], &BatchOptions::default())
            .unwrap();
        let snap = self.view.snapshot().unwrap();
        snap.quarantine(0, 1000)
            .unwrap()
            .into_iter()
            .find(|q| q.seq == self.seq)
            .map(|q| format!("{:?}: {}", q.reason, q.detail))
    }
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint([n; 32])
}

fn v2(d: DeviceDiscovered, n: u8) -> Event {
    Event::discovered(d, Some(fp(n)))
}

#[test]
fn a_v2_discovery_stores_its_fingerprint_and_an_old_one_folds_without() {
    let mut f = Fold::new();
    assert_eq!(
        f.fold(
            Event::DeviceDiscovered(disc(1, "host-a", "1-1", Some("K1"))),
            None
        ),
        None
    );
    assert_eq!(
        f.fold(v2(disc(2, "host-a", "1-2", Some("K2")), 7), None),
        None
    );
    let snap = f.view.snapshot().unwrap();
    let old = snap.device(&DeviceId(id(1))).unwrap().unwrap();
    let new = snap.device(&DeviceId(id(2))).unwrap().unwrap();
    assert_eq!(old.fingerprint, None);
    assert_eq!(new.fingerprint, Some(fp(7)));
    assert_eq!(new.discovery.serial.as_deref(), Some("K2"));
}
