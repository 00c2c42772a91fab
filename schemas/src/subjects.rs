//! The one place subject names are built and parsed. Nothing else in usbpt formats a subject.
//!
//! Layout (ADR 0001):
//!
//! | subject | published by | events |
//! |---|---|---|
//! | `usbpt.evt.host.{host}.agent` | host agent | HostAgentStarted |
//! | `usbpt.evt.host.{host}.device.{device_id}` | host agent | DeviceDiscovered, DeviceInvalidated |
//! | `usbpt.evt.host.{host}.clash` | host agent | DeviceClashDetected |
//! | `usbpt.evt.host.{host}.server.{server_id}` | host agent | DeviceAttached, DeviceReattached, DeviceAttachFailed, ServerStateChanged (observed) |
//! | `usbpt.evt.claim.{lineage_id}` | control plane, fenced | DeviceClaimed, DeviceReleased |
//! | `usbpt.evt.flavor.{name}` | control plane, fenced | FlavorCreated, FlavorDeleted, FlavorUsbSet |
//! | `usbpt.evt.ctl.{host}.server.{server_id}` | control plane, work for that host | ServerScheduled, ServerResized, ServerMigrated, ServerActionRequested, ServerDeleted (scheduled) |
//! | `usbpt.evt.server.{server_id}` | control plane | ServerBootRequested, ServerScheduleFailed, ServerMigrationRefused, ServerStateChanged (requested), ServerDeleted (never scheduled) |
//!
//! So an agent's credentials need publish on `usbpt.evt.host.{host}.>` and a consumer on
//! `usbpt.evt.ctl.{host}.>`, nothing else.

use thiserror::Error;

use crate::envelope::Envelope;
use crate::events::Event;
use crate::ids::{DeviceId, FlavorName, HostName, LineageId, ServerId};

/// The stream that holds all of usbpt's history.
pub const STREAM: &str = "USBPT_EVENTS";
/// Every event subject.
pub const ALL_EVENTS: &str = "usbpt.evt.>";
/// Prefix of command (request/reply) subjects.
pub const COMMAND_PREFIX: &str = "usbpt.cmd";
/// Every command subject (the command handlers' queue subscription).
pub const ALL_COMMANDS: &str = "usbpt.cmd.>";
/// Queue group the command handlers share.
pub const COMMAND_QUEUE: &str = "usbpt-commands";

pub fn host_agent(host: &HostName) -> String {
    format!("usbpt.evt.host.{host}.agent")
}
pub fn host_device(host: &HostName, device: &DeviceId) -> String {
    format!("usbpt.evt.host.{host}.device.{device}")
}
pub fn host_clash(host: &HostName) -> String {
    format!("usbpt.evt.host.{host}.clash")
}
pub fn host_server(host: &HostName, server: &ServerId) -> String {
    format!("usbpt.evt.host.{host}.server.{server}")
}
/// Everything one host agent publishes (for permissions and per-host consumers).
pub fn host_all(host: &HostName) -> String {
    format!("usbpt.evt.host.{host}.>")
}
pub fn claim(lineage: &LineageId) -> String {
    format!("usbpt.evt.claim.{lineage}")
}
pub fn flavor(name: &FlavorName) -> String {
    format!("usbpt.evt.flavor.{name}")
}
pub fn control_for_host(host: &HostName, server: &ServerId) -> String {
    format!("usbpt.evt.ctl.{host}.server.{server}")
}
/// Everything the control plane asks of one host (the agent's consumer filter).
pub fn control_for_host_all(host: &HostName) -> String {
    format!("usbpt.evt.ctl.{host}.>")
}
pub fn server(server: &ServerId) -> String {
    format!("usbpt.evt.server.{server}")
}
/// A command's request subject, e.g. `usbpt.cmd.boot`.
pub fn command(kind: &str) -> String {
    format!("{COMMAND_PREFIX}.{kind}")
}

/// The subject an event is published on. Total: every event has exactly one.
pub fn for_event(envelope: &Envelope) -> String {
    for_body(&envelope.body)
}

/// The subject an event body is published on (see [`for_event`]).
pub fn for_body(body: &Event) -> String {
    match body {
        Event::HostAgentStarted(e) => host_agent(&e.host),
        Event::DeviceDiscovered(e) => host_device(&e.host, &e.device_id),
        Event::DeviceInvalidated(e) => host_device(&e.host, &e.device_id),
        Event::DeviceClashDetected(e) => host_clash(&e.host),
        Event::DeviceAttached(e) => host_server(&e.host, &e.server_id),
        Event::DeviceReattached(e) => host_server(&e.host, &e.server_id),
        Event::DeviceAttachFailed(e) => host_server(&e.host, &e.server_id),
        Event::ServerStateChanged(e) => match (&e.host, e.reported_by_agent) {
            (Some(h), true) => host_server(h, &e.server_id),
            _ => server(&e.server_id),
        },
        Event::DeviceClaimed(e) => claim(&e.lineage_id),
        Event::DeviceReleased(e) => claim(&e.lineage_id),
        Event::FlavorCreated(e) => flavor(&e.name),
        Event::FlavorDeleted(e) => flavor(&e.name),
        Event::FlavorUsbSet(e) => flavor(&e.name),
        Event::ServerScheduled(e) => control_for_host(&e.host, &e.server_id),
        Event::ServerResized(e) => control_for_host(&e.host, &e.server_id),
        Event::ServerMigrated(e) => control_for_host(&e.host, &e.server_id),
        Event::ServerActionRequested(e) => control_for_host(&e.host, &e.server_id),
        Event::ServerDeleted(e) => match &e.host {
            Some(h) => control_for_host(h, &e.server_id),
            None => server(&e.server_id),
        },
        Event::ServerBootRequested(e) => server(&e.server_id),
        Event::ServerScheduleFailed(e) => server(&e.server_id),
        Event::ServerMigrationRefused(e) => server(&e.server_id),
    }
}

/// What a received subject says about its publisher, for checks such as "the envelope's host
/// matches the host in the subject".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubjectScope {
    /// `usbpt.evt.host.{host}.…`: only that host's agent may publish here.
    Agent(HostName),
    /// `usbpt.evt.ctl.{host}.…`: the control plane, addressed to that host.
    ControlForHost(HostName),
    /// Any other `usbpt.evt.…` subject: the control plane.
    Control,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubjectError {
    #[error("subject {0:?} is not under usbpt.evt.")]
    NotAnEvent(String),
    #[error("subject {0:?} names an invalid host")]
    BadHost(String),
}

/// Classifies a received event subject.
pub fn scope_of(subject: &str) -> Result<SubjectScope, SubjectError> {
    let rest = subject
        .strip_prefix("usbpt.evt.")
        .ok_or_else(|| SubjectError::NotAnEvent(subject.to_owned()))?;
    let mut tokens = rest.split('.');
    let kind = tokens.next();
    let host = || {
        let mut t = rest.split('.').skip(1);
        t.next()
            .and_then(|h| HostName::new(h).ok())
            .ok_or_else(|| SubjectError::BadHost(subject.to_owned()))
    };
    match kind {
        Some("host") => host().map(SubjectScope::Agent),
        Some("ctl") => host().map(SubjectScope::ControlForHost),
        Some(_) => Ok(SubjectScope::Control),
        None => Err(SubjectError::NotAnEvent(subject.to_owned())),
    }
}

/// Whether writers fence appends to `subject` on its last sequence (ADR 0003): claim subjects
/// (one per lineage) and flavor subjects (one per name). The view tracks the last sequence of
/// exactly these.
pub fn is_fenced(subject: &str) -> bool {
    subject
        .strip_prefix("usbpt.evt.")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(kind, name)| matches!(kind, "claim" | "flavor") && !name.is_empty())
}

/// Whether an envelope may legitimately arrive on `subject`: it must be the subject it would
/// be published on, so a forged host or a misrouted event is caught.
pub fn matches(envelope: &Envelope, subject: &str) -> bool {
    for_event(envelope) == subject && envelope.host.as_ref() == envelope.body.agent_host()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let h = HostName::new("host-a").expect("valid");
        assert_eq!(
            scope_of("usbpt.evt.host.host-a.agent"),
            Ok(SubjectScope::Agent(h.clone()))
        );
        assert_eq!(
            scope_of("usbpt.evt.ctl.host-a.server.x"),
            Ok(SubjectScope::ControlForHost(h))
        );
        assert_eq!(scope_of("usbpt.evt.flavor.f"), Ok(SubjectScope::Control));
        assert!(scope_of("usbpt.cmd.boot").is_err());
        assert!(scope_of("usbpt.evt.host.*.agent").is_err());
    }

    #[test]
    fn fenced_subjects_are_claims_and_flavors() {
        let lineage = LineageId(uuid::Uuid::from_u128(7));
        assert!(is_fenced(&claim(&lineage)));
        let name = FlavorName::new("f").expect("valid");
        assert!(is_fenced(&flavor(&name)));
        let server = ServerId(uuid::Uuid::from_u128(9));
        assert!(!is_fenced(&self::server(&server)));
        assert!(!is_fenced("usbpt.evt.host.host-a.agent"));
        assert!(!is_fenced("usbpt.evt.claim"));
        assert!(!is_fenced("usbpt.cmd.claim.x"));
    }
}
