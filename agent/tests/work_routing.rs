//! The agent works on exactly the events routed to its control subject: over a sample of every
//! `Event` variant and every host the samples name, `work_for(host, event)` gives work if and
//! only if `subjects::for_body(event)` is under the agent's consumer filter
//! (`subjects::control_for_host_all(host)`). A routed event without work, or work for an event
//! not routed to the host, fails here (both existed: `ServerMigrated` had a route and no work,
//! `ServerResized` gave the host it left work it was never sent).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../schemas/tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;

use usbpt_agent::libvirt::{work_for, Work};
use usbpt_schemas::{subjects, Event, HostName, ServerDeleted, ServerState, ServerStateChanged};

fn bodies() -> Vec<Event> {
    let mut all = common::sample_bodies();
    let seen: BTreeSet<usize> = all.iter().map(common::variant_index).collect();
    assert_eq!(
        seen,
        (0..common::VARIANTS).collect(),
        "a sample per variant"
    );
    // The variants whose route depends on their fields, the other way round.
    let server = usbpt_schemas::ServerId::new_v7();
    all.push(Event::ServerDeleted(ServerDeleted {
        server_id: server,
        host: None,
    }));
    all.push(Event::ServerStateChanged(ServerStateChanged {
        server_id: server,
        host: Some(common::host("host-b")),
        state: ServerState::Shutoff,
        reported_by_agent: false,
        detail: String::new(),
    }));
    all
}

fn hosts() -> Vec<HostName> {
    ["host-a", "host-b", "host-c"]
        .into_iter()
        .map(common::host)
        .collect()
}

#[test]
fn work_is_asked_exactly_of_the_host_an_event_is_routed_to() {
    let mut with_work = BTreeSet::new();
    for body in bodies() {
        let subject = subjects::for_body(&body);
        for host in hosts() {
            let filter = subjects::control_for_host_all(&host);
            let routed_here = subject.starts_with(filter.trim_end_matches('>'));
            let work = work_for(&host, &body);
            assert_eq!(
                work.is_some(),
                routed_here,
                "{} on {host}: published on {subject}, work {work:?}",
                body.kind()
            );
            if work.is_some() {
                with_work.insert(body.kind());
            }
        }
    }
    assert_eq!(
        with_work,
        BTreeSet::from([
            "FingerprintAccepted",
            "ServerActionRequested",
            "ServerDeleted",
            "ServerMigrated",
            "ServerResized",
            "ServerScheduled",
        ])
    );
}

#[test]
fn a_cold_migration_defines_the_domain_on_its_destination() {
    let migrated = common::sample_bodies()
        .into_iter()
        .find(|b| matches!(b, Event::ServerMigrated(_)))
        .expect("sample");
    let Event::ServerMigrated(m) = &migrated else {
        unreachable!()
    };
    let Some(Work::Define {
        devices,
        why,
        restart,
        ..
    }) = work_for(&m.host, &migrated)
    else {
        panic!("no define work for {migrated:?}")
    };
    assert_eq!(devices, m.devices);
    assert_eq!(why, format!("cold migration from host {}", m.from_host));
    assert!(!restart);
    // The source gets its own teardown request; the migration itself asks it nothing.
    assert_eq!(work_for(&m.from_host, &migrated), None);
}

/// docs/libvirt.md's table of operations names every event that asks work.
#[test]
fn the_executor_doc_names_every_event_that_asks_work() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/libvirt.md"))
        .expect("docs/libvirt.md");
    for body in bodies() {
        if matches!(subjects::route(&body), subjects::Route::Work(_)) {
            let kind = body.kind();
            assert!(
                doc.lines()
                    .any(|l| l.starts_with('|') && l.contains(&format!("`{kind}"))),
                "docs/libvirt.md has no table row for {kind}"
            );
        }
    }
}
