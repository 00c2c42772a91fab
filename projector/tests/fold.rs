//! The fold on real redb files, without a bus: a consistent history folds with no quarantine,
//! the indexes agree with the records, and batch boundaries do not change a single byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use bytes::Bytes;
use usbpt_projector::workload::Workload;
use usbpt_projector::{digest, BatchOptions, DeviceFilter, DeviceStatus, RawEvent, View};
use usbpt_schemas::{codec, subjects, Envelope};

fn raw(envs: &[Envelope]) -> Vec<RawEvent> {
    envs.iter()
        .enumerate()
        .map(|(i, e)| RawEvent {
            seq: i as u64 + 1,
            subject: subjects::for_event(e),
            payload: Bytes::from(codec::encode(e).unwrap()),
        })
        .collect()
}

fn fold_in_batches(view: &View, events: &[RawEvent], batch: usize) {
    for chunk in events.chunks(batch) {
        let r = view.apply_batch(chunk, &BatchOptions::default()).unwrap();
        assert_eq!(r.gap, None);
    }
}

#[test]
fn workload_folds_cleanly_and_indexes_agree_with_records() {
    let dir = tempfile::tempdir().unwrap();
    let envs: Vec<Envelope> = Workload::new(7, 20, 8).take(20_000).collect();
    let events = raw(&envs);
    let view = View::open(dir.path().join("v.redb")).unwrap();
    fold_in_batches(&view, &events, 1000);
    let snap = view.snapshot().unwrap();
    assert_eq!(snap.last_applied_seq().unwrap(), 20_000);
    assert_eq!(
        snap.quarantine_len().unwrap(),
        0,
        "{:?}",
        snap.quarantine(0, 5)
    );
    let counters = snap.counters().unwrap();
    let applied: u64 = counters
        .iter()
        .filter(|(k, _)| k.starts_with("applied."))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(applied, 20_000);

    // Every current device is indexed on its host; free ones in both free indexes.
    let current = snap.devices(&DeviceFilter::default()).unwrap();
    assert_eq!(
        current.len(),
        160,
        "one current enumeration per physical device"
    );
    let mut free_seen = BTreeSet::new();
    for host in snap.hosts().unwrap() {
        for d in snap.free_devices_on_host(&host.name).unwrap() {
            assert_eq!(d.status, DeviceStatus::Available);
            assert!(d.current);
            free_seen.insert(d.id());
        }
    }
    let free: BTreeSet<_> = current
        .iter()
        .filter(|d| d.status == DeviceStatus::Available)
        .map(|d| d.id())
        .collect();
    assert_eq!(free, free_seen);
    let by_match: usize = [(0x136b, 0x0003), (0x1050, 0x0407), (0x04a9, 0x1909)]
        .iter()
        .map(|(v, p)| {
            snap.free_devices_matching(
                usbpt_schemas::VendorId(*v),
                usbpt_schemas::ProductId(*p),
                None,
            )
            .unwrap()
            .values()
            .map(Vec::len)
            .sum::<usize>()
        })
        .sum();
    assert_eq!(by_match, free.len());

    // Claims and holders agree: a claimed lineage's device (or its awaited successor) is held
    // by the claiming server; an unclaimed current device is held by nobody.
    let claims = snap.claims().unwrap();
    assert!(!claims.is_empty());
    for c in &claims {
        let d = snap.device(&c.device_id).unwrap().unwrap();
        assert_eq!(d.holder, Some(c.server_id), "{c:?}");
        let server = snap.server_by_id(&c.server_id).unwrap().unwrap();
        assert!(server.deleted.is_none());
    }
    let claimed: BTreeSet<_> = claims.iter().map(|c| c.lineage_id).collect();
    for d in &current {
        if !claimed.contains(&d.lineage_id()) {
            assert_eq!(d.holder, None, "{:?}", d.id());
            assert_ne!(d.status, DeviceStatus::Attached);
        }
    }
    // Histories are ordered and end at the current enumeration.
    for d in &current {
        let h = snap.lineage_history(&d.lineage_id()).unwrap();
        assert_eq!(h.last().map(|x| x.id()), Some(d.id()));
        assert!(h
            .windows(2)
            .all(|w| w[0].discovered.seq < w[1].discovered.seq));
        assert!(h[..h.len() - 1]
            .iter()
            .all(|x| x.status == DeviceStatus::Invalidated && !x.current));
    }
}

#[test]
fn batch_boundaries_and_redelivery_do_not_change_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let envs: Vec<Envelope> = Workload::new(11, 5, 6).take(5_000).collect();
    let events = raw(&envs);
    let a = View::open(dir.path().join("a.redb")).unwrap();
    fold_in_batches(&a, &events, 5_000);
    let b = View::open(dir.path().join("b.redb")).unwrap();
    fold_in_batches(&b, &events, 7);
    // c gets every batch twice (acks lost): the second copy is skipped.
    let c = View::open(dir.path().join("c.redb")).unwrap();
    for chunk in events.chunks(333) {
        c.apply_batch(chunk, &BatchOptions::default()).unwrap();
        let again = c.apply_batch(chunk, &BatchOptions::default()).unwrap();
        assert_eq!((again.applied, again.skipped), (0, chunk.len() as u64));
    }
    let (da, db, dc) = (
        digest::digest(&a.snapshot().unwrap()).unwrap(),
        digest::digest(&b.snapshot().unwrap()).unwrap(),
        digest::digest(&c.snapshot().unwrap()).unwrap(),
    );
    assert_eq!(da, db);
    assert_eq!(da, dc);
    assert_eq!(
        digest::first_difference(&a.snapshot().unwrap(), &c.snapshot().unwrap()).unwrap(),
        None
    );
}

#[test]
fn a_gap_stops_the_batch_and_nothing_after_it_is_folded() {
    let dir = tempfile::tempdir().unwrap();
    let envs: Vec<Envelope> = Workload::new(3, 2, 2).take(10).collect();
    let mut events = raw(&envs);
    events.remove(4); // seq 5 never arrives
    let v = View::open(dir.path().join("v.redb")).unwrap();
    let r = v.apply_batch(&events, &BatchOptions::default()).unwrap();
    assert_eq!(r.gap, Some((5, 6)));
    assert_eq!((r.applied, r.last_applied), (4, 4));
    assert_eq!(v.last_applied().unwrap(), 4);
}

#[test]
fn first_difference_names_the_table_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let envs: Vec<Envelope> = Workload::new(5, 3, 4).take(300).collect();
    let events = raw(&envs);
    let a = View::open(dir.path().join("a.redb")).unwrap();
    fold_in_batches(&a, &events, 100);
    let b = View::open(dir.path().join("b.redb")).unwrap();
    // b misses nothing but stops one event early.
    fold_in_batches(&b, &events[..299], 100);
    let diff = digest::first_difference(&a.snapshot().unwrap(), &b.snapshot().unwrap())
        .unwrap()
        .expect("they differ");
    let text = diff.to_string();
    assert!(
        text.starts_with("table meta, key last_applied_seq"),
        "{text}"
    );
}
