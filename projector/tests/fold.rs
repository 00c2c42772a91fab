//! The fold on real redb files, without a bus: a consistent history folds with no quarantine,
//! the indexes agree with the records, and batch boundaries do not change a single byte.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use usbpt_projector::workload::Workload;
use usbpt_projector::{digest, BatchOptions, Chain, DeviceFilter, DeviceStatus, RawEvent, View};
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
    // Comparing and digesting in one pass gives the second view's digest.
    assert_eq!(
        digest::compare(&a.snapshot().unwrap(), &c.snapshot().unwrap()).unwrap(),
        Ok(dc)
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
    assert_eq!(
        digest::compare(&a.snapshot().unwrap(), &b.snapshot().unwrap()).unwrap(),
        Err(diff.clone())
    );
    let text = diff.to_string();
    assert!(
        text.starts_with("table meta, key last_applied_seq"),
        "{text}"
    );
}

#[test]
fn one_event_per_commit_gives_the_same_bytes_as_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let envs: Vec<Envelope> = Workload::new(13, 4, 6).take(2_000).collect();
    let events = raw(&envs);
    let whole = View::open(dir.path().join("whole.redb")).unwrap();
    fold_in_batches(&whole, &events, events.len());
    // Every event its own write transaction: the staged fold writes through at once, as a
    // write-through fold would (unsynced: this view is private).
    let single = View::open_private(dir.path().join("single.redb")).unwrap();
    let unsynced = BatchOptions {
        durability: redb::Durability::None,
        ..BatchOptions::default()
    };
    for e in &events {
        single
            .apply_batch(std::slice::from_ref(e), &unsynced)
            .unwrap();
    }
    assert_eq!(
        digest::first_difference(&whole.snapshot().unwrap(), &single.snapshot().unwrap()).unwrap(),
        None
    );
}

/// The projector's pipeline without threads: batches are folded on top of batches not written
/// yet (the chain), written two behind, while the chain is trimmed to a tiny row budget.
#[test]
fn batches_folded_ahead_of_their_writes_read_through_them_and_give_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let envs: Vec<Envelope> = Workload::new(17, 6, 8).take(6_000).collect();
    let events = raw(&envs);
    let reference = View::open(dir.path().join("ref.redb")).unwrap();
    fold_in_batches(&reference, &events, 6_000);

    let view = View::open(dir.path().join("piped.redb")).unwrap();
    let mut chain = Chain::default();
    let mut unwritten = std::collections::VecDeque::new();
    let mut most_unwritten = 0;
    for (i, chunk) in events.chunks(250).enumerate() {
        chain.trim(view.last_applied().unwrap(), 300);
        let mut batch = view.begin_batch_after(&chain).unwrap();
        // Cut each chunk in two folds of the same batch (a group commit of two fetches).
        let (a, b) = chunk.split_at(chunk.len() / 2);
        batch.fold(a, &BatchOptions::default()).unwrap();
        batch.fold(b, &BatchOptions::default()).unwrap();
        assert_eq!(batch.report().gap, None);
        assert_eq!(batch.folded(), chunk.len() as u64);
        let staged = batch.freeze().unwrap();
        chain.push(Arc::clone(&staged));
        unwritten.push_back(staged);
        most_unwritten = most_unwritten.max(unwritten.len());
        // The writer lags two batches behind, except at the end.
        while unwritten.len() > 2 || (i + 1) * 250 >= events.len() && !unwritten.is_empty() {
            let s = unwritten.pop_front().unwrap();
            view.write_staged(&s, redb::Durability::Immediate).unwrap();
        }
    }
    assert_eq!(
        most_unwritten, 3,
        "batches were folded ahead of their writes"
    );
    assert_eq!(view.last_applied().unwrap(), 6_000);
    assert_eq!(
        digest::first_difference(&reference.snapshot().unwrap(), &view.snapshot().unwrap())
            .unwrap(),
        None
    );
}

#[test]
fn a_staged_batch_written_out_of_order_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let envs: Vec<Envelope> = Workload::new(19, 2, 3).take(200).collect();
    let events = raw(&envs);
    let view = View::open(dir.path().join("v.redb")).unwrap();
    let mut chain = Chain::default();
    let mut first = view.begin_batch_after(&chain).unwrap();
    first
        .fold(&events[..100], &BatchOptions::default())
        .unwrap();
    let first = first.freeze().unwrap();
    chain.push(Arc::clone(&first));
    let mut second = view.begin_batch_after(&chain).unwrap();
    second
        .fold(&events[100..], &BatchOptions::default())
        .unwrap();
    let second = second.freeze().unwrap();

    let err = view
        .write_staged(&second, redb::Durability::Immediate)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("follows sequence 100 but the view ends at 0"),
        "{err}"
    );
    assert_eq!(view.last_applied().unwrap(), 0);
    view.write_staged(&first, redb::Durability::Immediate)
        .unwrap();
    view.write_staged(&second, redb::Durability::Immediate)
        .unwrap();
    assert_eq!(view.last_applied().unwrap(), 200);
}

/// A server moved (cold migration or resize) from host-a to host-b: the host it left reports its
/// teardown (`Shutoff`), possibly after host-b reported the new domain running. The view keeps
/// the state of the host the server is on, in either order.
#[test]
fn a_teardown_reported_by_the_host_a_server_left_does_not_change_its_state() {
    use usbpt_schemas::{
        Event, FlavorCreated, FlavorId, FlavorName, HostName, ServerBootRequested, ServerId,
        ServerMigrated, ServerName, ServerScheduled, ServerState, ServerStateChanged,
    };
    let (a, b) = (
        HostName::new("host-a").unwrap(),
        HostName::new("host-b").unwrap(),
    );
    let server = ServerId::new_v7();
    let flavor = FlavorId::new_v7();
    let report = |host: &HostName, state| {
        Event::ServerStateChanged(ServerStateChanged {
            server_id: server,
            host: Some(host.clone()),
            state,
            reported_by_agent: true,
            detail: format!("{host}: {state:?}"),
        })
    };
    let history = |late_teardown: bool| {
        let mut bodies = vec![
            Event::FlavorCreated(FlavorCreated {
                flavor_id: flavor,
                name: FlavorName::new("f").unwrap(),
                usb: vec![],
            }),
            Event::ServerBootRequested(ServerBootRequested {
                server_id: server,
                name: ServerName::new("erp").unwrap(),
                flavor_id: flavor,
                requested_host: None,
            }),
            Event::ServerScheduled(ServerScheduled {
                server_id: server,
                host: a.clone(),
                flavor_id: flavor,
                devices: vec![],
            }),
            report(&a, ServerState::Active),
            Event::ServerMigrated(ServerMigrated {
                server_id: server,
                from_host: a.clone(),
                host: b.clone(),
                devices: vec![],
            }),
        ];
        let (active_b, shutoff_a) = (
            report(&b, ServerState::Active),
            report(&a, ServerState::Shutoff),
        );
        if late_teardown {
            bodies.extend([active_b, shutoff_a]);
        } else {
            bodies.extend([shutoff_a, active_b]);
        }
        bodies.into_iter().map(Envelope::new).collect::<Vec<_>>()
    };
    let dir = tempfile::tempdir().unwrap();
    for late in [true, false] {
        let view = View::open(dir.path().join(format!("{late}.redb"))).unwrap();
        fold_in_batches(&view, &raw(&history(late)), 1);
        let snap = view.snapshot().unwrap();
        assert_eq!(snap.quarantine_len().unwrap(), 0);
        let s = snap.server_by_id(&server).unwrap().expect("server");
        assert_eq!(s.host.as_ref(), Some(&b));
        assert_eq!(
            (s.state, s.state_detail.as_str()),
            (ServerState::Active, "host-b: Active")
        );
    }
}

#[test]
fn a_rename_moves_the_name_and_flavor_resources_fold_with_0_when_absent() {
    use usbpt_schemas::{
        Event, FlavorCreated, FlavorId, FlavorName, FlavorSized, ServerBootRequested, ServerId,
        ServerName, ServerUpdated,
    };
    let name = |s: &str| ServerName::new(s).unwrap();
    let (sized, plain) = (FlavorId::new_v7(), FlavorId::new_v7());
    let (one, two) = (ServerId::new_v7(), ServerId::new_v7());
    let boot = |id, n: &str| {
        Event::ServerBootRequested(ServerBootRequested {
            server_id: id,
            name: name(n),
            flavor_id: sized,
            requested_host: None,
        })
    };
    let rename = |id, n: &str, d: Option<&str>| {
        Event::ServerUpdated(ServerUpdated {
            server_id: id,
            name: name(n),
            description: d.map(str::to_owned),
        })
    };
    let bodies = vec![
        Event::FlavorCreated(FlavorCreated {
            flavor_id: sized,
            name: FlavorName::new("big").unwrap(),
            usb: vec![],
        }),
        Event::FlavorSized(FlavorSized {
            flavor_id: sized,
            name: FlavorName::new("big").unwrap(),
            ram_mb: 4096,
            vcpus: 4,
            disk_gb: 40,
        }),
        // An old history: a flavor with no FlavorSized.
        Event::FlavorCreated(FlavorCreated {
            flavor_id: plain,
            name: FlavorName::new("old").unwrap(),
            usb: vec![],
        }),
        boot(one, "erp-1"),
        boot(two, "erp-2"),
        rename(one, "erp-renamed", Some("licence key")),
        // The old name is free again; the new one is taken (quarantined, nothing changes).
        rename(two, "erp-1", None),
        rename(two, "erp-renamed", Some("clash")),
    ];
    let envs: Vec<Envelope> = bodies.into_iter().map(Envelope::new).collect();
    let dir = tempfile::tempdir().unwrap();
    let view = View::open(dir.path().join("v.redb")).unwrap();
    fold_in_batches(&view, &raw(&envs), 1);
    let snap = view.snapshot().unwrap();
    assert_eq!(snap.quarantine_len().unwrap(), 1, "the clashing rename");
    let big = snap.flavor_by_id(&sized).unwrap().unwrap();
    assert_eq!((big.ram_mb, big.vcpus, big.disk_gb), (4096, 4, 40));
    let old = snap.flavor_by_id(&plain).unwrap().unwrap();
    assert_eq!((old.ram_mb, old.vcpus, old.disk_gb), (0, 0, 0));
    let s1 = snap.server_by_name(&name("erp-renamed")).unwrap().unwrap();
    assert_eq!(s1.id, one);
    assert_eq!(s1.description.as_deref(), Some("licence key"));
    let s2 = snap.server_by_name(&name("erp-1")).unwrap().unwrap();
    assert_eq!((s2.id, s2.description), (two, None));
    assert!(snap.server_by_name(&name("erp-2")).unwrap().is_none());
}

#[test]
fn a_pending_resize_ends_once_by_confirm_or_revert() {
    use usbpt_projector::MoveEnd;
    use usbpt_schemas::{
        Event, FlavorCreated, FlavorId, FlavorName, HostName, ServerBootRequested, ServerId,
        ServerName, ServerResizeConfirmed, ServerResizeReverted, ServerResizeVerifying,
        ServerResized, ServerScheduled,
    };
    let h = HostName::new("host-a").unwrap();
    let (f1, f2) = (FlavorId::new_v7(), FlavorId::new_v7());
    let server = ServerId::new_v7();
    let resize = |from, to| {
        Event::ServerResized(ServerResized {
            server_id: server,
            from_flavor: from,
            to_flavor: to,
            from_host: h.clone(),
            host: h.clone(),
            devices: vec![],
        })
    };
    let verifying = Event::ServerResizeVerifying(ServerResizeVerifying {
        server_id: server,
        from_flavor: f1,
        from_host: h.clone(),
        devices: vec![],
    });
    let mut bodies = vec![
        Event::FlavorCreated(FlavorCreated {
            flavor_id: f1,
            name: FlavorName::new("one").unwrap(),
            usb: vec![],
        }),
        Event::FlavorCreated(FlavorCreated {
            flavor_id: f2,
            name: FlavorName::new("two").unwrap(),
            usb: vec![],
        }),
        Event::ServerBootRequested(ServerBootRequested {
            server_id: server,
            name: ServerName::new("erp").unwrap(),
            flavor_id: f1,
            requested_host: None,
        }),
        Event::ServerScheduled(ServerScheduled {
            server_id: server,
            host: h.clone(),
            flavor_id: f1,
            devices: vec![],
        }),
        // A confirm with nothing pending is quarantined.
        Event::ServerResizeConfirmed(ServerResizeConfirmed { server_id: server }),
        resize(f1, f2),
        verifying.clone(),
        // Reverted: the way back, then the marker.
        resize(f2, f1),
        Event::ServerResizeReverted(ServerResizeReverted { server_id: server }),
        resize(f1, f2),
        verifying,
    ];
    let dir = tempfile::tempdir().unwrap();
    let fold = |bodies: &[Event], file: &str| {
        let envs: Vec<Envelope> = bodies.iter().cloned().map(Envelope::new).collect();
        let view = View::open(dir.path().join(file)).unwrap();
        fold_in_batches(&view, &raw(&envs), 1);
        view
    };
    let view = fold(&bodies, "pending.redb");
    let snap = view.snapshot().unwrap();
    assert_eq!(snap.quarantine_len().unwrap(), 1);
    let s = snap.server_by_id(&server).unwrap().unwrap();
    assert_eq!(s.flavor_id, f2);
    assert_eq!(s.resize_from.as_ref().map(|r| r.flavor_id), Some(f1));
    let ends: Vec<Option<MoveEnd>> = s.moves.iter().map(|m| m.end.map(|e| e.0)).collect();
    assert_eq!(
        ends,
        [Some(MoveEnd::Reverted), Some(MoveEnd::IsRevert), None]
    );
    bodies.push(Event::ServerResizeConfirmed(ServerResizeConfirmed {
        server_id: server,
    }));
    let view = fold(&bodies, "confirmed.redb");
    let snap = view.snapshot().unwrap();
    let s = snap.server_by_id(&server).unwrap().unwrap();
    assert!(s.resize_from.is_none());
    assert_eq!(s.moves[2].end.map(|e| e.0), Some(MoveEnd::Confirmed));
}

/// The table list is declared once (`tables!`): every table in it is created, digested in its
/// order, and written by the fold — a table added to the list but not staged stays empty here.
#[test]
fn every_declared_table_is_created_digested_and_written() {
    let dir = tempfile::tempdir().unwrap();
    let envs: Vec<Envelope> = Workload::new(3, 6, 8).take(5_000).collect();
    let mut events = raw(&envs);
    events.push(RawEvent {
        seq: events.len() as u64 + 1,
        subject: events[0].subject.clone(),
        payload: Bytes::from_static(b"\xff not an event"),
    });
    let view = View::open(dir.path().join("v.redb")).unwrap();
    fold_in_batches(&view, &events, 1000);
    let d = digest::digest(&view.snapshot().unwrap()).unwrap();
    let names: Vec<&str> = d.tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(names, usbpt_projector::tables::NAMES);
    let empty: Vec<&str> = d
        .tables
        .iter()
        .filter(|t| t.entries == 0)
        .map(|t| t.table.as_str())
        .collect();
    assert!(empty.is_empty(), "tables the fold never wrote: {empty:?}");
}
