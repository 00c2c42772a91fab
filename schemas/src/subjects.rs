//! The one place subject names are built and parsed. Nothing else in usbpt formats a subject.
//!
//! Layout (ADR 0001):
//!
//! | subject | published by | events |
//! |---|---|---|
//! | `usbpt.evt.host.{host}.agent` | host agent | HostAgentStarted |
//! | `usbpt.evt.host.{host}.device.{device_id}` | host agent | DeviceDiscovered(V2), DeviceInvalidated |
//! | `usbpt.evt.host.{host}.clash` | host agent | DeviceClashDetected |
//! | `usbpt.evt.host.{host}.server.{server_id}` | host agent | DeviceAttached, DeviceReattached, DeviceAttachFailed, DeviceReattachHeld, ServerStateChanged (observed) |
//! | `usbpt.evt.host.{host}.flap.{lineage_id}` | host agent | PortFlapping, PortFlappingCleared |
//! | `usbpt.evt.claim.{lineage_id}` | control plane, fenced | DeviceClaimed, DeviceReleased, LineageConflictResolved |
//! | `usbpt.evt.flavor.{name}` | control plane, fenced | FlavorCreated, FlavorDeleted, FlavorUsbSet, FlavorSized, FlavorFingerprintPolicySet |
//! | `usbpt.evt.name.{server_name}` | control plane, fenced | ServerBootRequested, ServerUpdated (the name it gives) |
//! | `usbpt.evt.ctl.{host}.server.{server_id}` | control plane, work for that host | ServerScheduled, ServerResized, ServerMigrated, ServerActionRequested, ServerDeleted (scheduled), FingerprintAccepted (held by a server there) |
//! | `usbpt.evt.lineage.{lineage_id}` | control plane | LineageLabeled, FingerprintAccepted (held by no server) |
//! | `usbpt.evt.server.{server_id}` | control plane | ServerScheduleFailed, ServerMigrationRefused, ServerStateChanged (requested), ServerDeleted (never scheduled), ServerResizeVerifying, ServerResizeConfirmed, ServerResizeReverted |
//!
//! So an agent's credentials need publish on `usbpt.evt.host.{host}.>` and a consumer on
//! `usbpt.evt.ctl.{host}.>`, nothing else.
//!
//! [`route`] is the table behind this one: for every event, where it goes and, for an event
//! addressed to a host (`ctl.{host}`), what work it asks of that host's agent. [`for_body`]
//! and the agent's `work_for` are both derived from it.

use std::fmt;

use thiserror::Error;
use uuid::Uuid;

use crate::envelope::Envelope;
use crate::events::{AssignedDevice, Event, Fingerprint, ServerAction};
use crate::ids::{DeviceId, FlavorName, HostName, LineageId, ServerId, ServerName};

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
    Subject::HostAgent(host).to_string()
}
pub fn host_device(host: &HostName, device: &DeviceId) -> String {
    Subject::HostDevice(host, device).to_string()
}
pub fn host_clash(host: &HostName) -> String {
    Subject::HostClash(host).to_string()
}
pub fn host_server(host: &HostName, server: &ServerId) -> String {
    Subject::HostServer(host, server).to_string()
}
/// A host's flapping episodes of one lineage (`PortFlapping`, `PortFlappingCleared`).
pub fn host_flap(host: &HostName, lineage: &LineageId) -> String {
    Subject::HostFlap(host, lineage).to_string()
}
/// Everything one host agent publishes (for permissions and per-host consumers).
pub fn host_all(host: &HostName) -> String {
    format!("usbpt.evt.host.{host}.>")
}
pub fn claim(lineage: &LineageId) -> String {
    Subject::Claim(lineage).to_string()
}
/// An operator's record about one physical device (its label); not fenced.
pub fn lineage(lineage: &LineageId) -> String {
    Subject::Lineage(lineage).to_string()
}
pub fn flavor(name: &FlavorName) -> String {
    Subject::Flavor(name).to_string()
}
/// A server name's subject (fenced, ADR 0003/0010): the events that give a server its name, so
/// two boots (or a boot and a rename) taking one name race on one subject.
pub fn name(name: &ServerName) -> String {
    Subject::Name(name).to_string()
}
/// The prefix of every control-plane work subject (`usbpt.evt.ctl.{host}.…`): the only
/// subjects whose events carry the command handler's signature (ADR 0005).
pub const CONTROL_PREFIX: &str = "usbpt.evt.ctl.";
pub fn control_for_host(host: &HostName, server: &ServerId) -> String {
    Subject::Control(host, *server).to_string()
}
/// Everything the control plane asks of one host (the agent's consumer filter).
pub fn control_for_host_all(host: &HostName) -> String {
    format!("usbpt.evt.ctl.{host}.>")
}
pub fn server(server: &ServerId) -> String {
    Subject::Server(server).to_string()
}
/// A command's request subject, e.g. `usbpt.cmd.boot`.
pub fn command(kind: &str) -> String {
    format!("{COMMAND_PREFIX}.{kind}")
}

/// Every agent's liveness beat (core NATS, outside the stream: not history; ADR 0008).
pub const ALL_HEARTBEATS: &str = "usbpt.hb.*";

/// Where `host`'s agent beats ([`crate::heartbeat`]).
pub fn heartbeat(host: &HostName) -> String {
    format!("usbpt.hb.{host}")
}

/// The host a heartbeat subject names.
pub fn heartbeat_host(subject: &str) -> Option<HostName> {
    subject
        .strip_prefix("usbpt.hb.")
        .and_then(|h| HostName::new(h).ok())
}

/// The durable consumer a host's agent reads its control work from.
pub fn agent_consumer(host: &HostName) -> String {
    format!("agent-{host}")
}

/// The reply-inbox prefix of a client whose identity is the token `id` (an nkey public key):
/// each identity subscribes only to its own replies, never to `_INBOX.>`.
pub fn inbox_prefix(id: &str) -> String {
    format!("_INBOX.{id}")
}

/// JetStream API subjects, for permissions (the NATS server enforces them; the client library
/// builds the same strings). See ADR 0005 and `docs/security.md`.
pub mod js {
    use super::STREAM;

    /// Account information (clients ask it when they open a JetStream context).
    pub const API_INFO: &str = "$JS.API.INFO";

    /// Stream information: every client reads it at connect to check the stream.
    pub fn stream_info() -> String {
        format!("$JS.API.STREAM.INFO.{STREAM}")
    }
    /// Creating the stream (`up`/`demo` do it as admin).
    pub fn stream_create() -> String {
        format!("$JS.API.STREAM.CREATE.{STREAM}")
    }
    /// Direct get of the last message on subjects matching `filter` (fenced writers' last
    /// sequence, the agent's "is my event already stored").
    pub fn direct_get_last(filter: &str) -> String {
        format!("$JS.API.DIRECT.GET.{STREAM}.{filter}")
    }
    /// Direct get by sequence or with the subject in the request body.
    pub fn direct_get() -> String {
        format!("$JS.API.DIRECT.GET.{STREAM}")
    }
    /// Stored-message get (the non-direct path).
    pub fn msg_get() -> String {
        format!("$JS.API.STREAM.MSG.GET.{STREAM}")
    }
    /// Creating consumer `name` with one filter subject (`filter`), or with none.
    pub fn consumer_create(name: &str, filter: Option<&str>) -> String {
        match filter {
            Some(f) => format!("$JS.API.CONSUMER.CREATE.{STREAM}.{name}.{f}"),
            None => format!("$JS.API.CONSUMER.CREATE.{STREAM}.{name}"),
        }
    }
    /// Creating an unnamed (ephemeral, e.g. ordered) consumer; the filter is in the body.
    pub fn consumer_create_ephemeral() -> String {
        format!("$JS.API.CONSUMER.CREATE.{STREAM}")
    }
    /// Deleting consumer `name` (the projector re-creates its durable at the view's resume point).
    pub fn consumer_delete(name: &str) -> String {
        format!("$JS.API.CONSUMER.DELETE.{STREAM}.{name}")
    }
    /// The projector's default durable consumer.
    pub const PROJECTOR_CONSUMER: &str = "usbpt-projector";
    /// Reading consumer `name`'s information.
    pub fn consumer_info(name: &str) -> String {
        format!("$JS.API.CONSUMER.INFO.{STREAM}.{name}")
    }
    /// Pulling the next messages from consumer `name`.
    pub fn consumer_next(name: &str) -> String {
        format!("$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{name}")
    }
    /// Acknowledging any consumer's deliveries (readers with their own ordered consumers).
    pub fn ack_any() -> String {
        format!("$JS.ACK.{STREAM}.>")
    }
    /// Acknowledging consumer `name`'s deliveries.
    pub fn ack(name: &str) -> String {
        format!("$JS.ACK.{STREAM}.{name}.>")
    }
}

/// The subject an event is published on. Total: every event has exactly one.
pub fn for_event(envelope: &Envelope) -> String {
    for_body(&envelope.body)
}

/// The subject an event body is published on (see [`for_event`]). Derived from [`route`], so a
/// control subject (`usbpt.evt.ctl.{host}.…`) is only ever built for an event that asks work.
pub fn for_body(body: &Event) -> String {
    Subject::of(body).to_string()
}

/// One event subject. [`Subject::pieces`] is the one place each subject's layout is spelled
/// out: the builders above write the pieces to a `String`; [`matches`] compares them with a
/// received subject, without building one (or going through `fmt`) per event.
#[derive(Debug, Clone, Copy)]
enum Subject<'a> {
    HostAgent(&'a HostName),
    HostDevice(&'a HostName, &'a DeviceId),
    HostClash(&'a HostName),
    HostServer(&'a HostName, &'a ServerId),
    HostFlap(&'a HostName, &'a LineageId),
    Claim(&'a LineageId),
    Lineage(&'a LineageId),
    Flavor(&'a FlavorName),
    Name(&'a ServerName),
    Control(&'a HostName, ServerId),
    Server(&'a ServerId),
}

/// A piece of a subject: literal text or a name, or a UUID (written hyphenated, lower case).
#[derive(Debug, Clone, Copy)]
enum Piece<'a> {
    Text(&'a str),
    Id(&'a Uuid),
}

impl<'a> Subject<'a> {
    /// The subject `body` is published on (from [`route`]).
    fn of(body: &'a Event) -> Self {
        match route(body) {
            Route::Agent { host, about } => match about {
                AgentSubject::Agent => Self::HostAgent(host),
                AgentSubject::Device(d) => Self::HostDevice(host, d),
                AgentSubject::Clash => Self::HostClash(host),
                AgentSubject::Server(s) => Self::HostServer(host, s),
                AgentSubject::Flap(l) => Self::HostFlap(host, l),
            },
            Route::Claim(l) => Self::Claim(l),
            Route::Flavor(f) => Self::Flavor(f),
            Route::Lineage(l) => Self::Lineage(l),
            Route::Name(n) => Self::Name(n),
            Route::Work(w) => Self::Control(w.host, w.server),
            Route::Server(s) => Self::Server(s),
        }
    }

    /// The subject's pieces, in order (unused ones are empty text).
    fn pieces(&self) -> [Piece<'_>; 4] {
        use Piece::{Id, Text};
        const NONE: Piece<'static> = Text("");
        match self {
            Self::HostAgent(h) => [
                Text("usbpt.evt.host."),
                Text(h.as_str()),
                Text(".agent"),
                NONE,
            ],
            Self::HostDevice(h, d) => [
                Text("usbpt.evt.host."),
                Text(h.as_str()),
                Text(".device."),
                Id(d.as_uuid()),
            ],
            Self::HostClash(h) => [
                Text("usbpt.evt.host."),
                Text(h.as_str()),
                Text(".clash"),
                NONE,
            ],
            Self::HostServer(h, s) => [
                Text("usbpt.evt.host."),
                Text(h.as_str()),
                Text(".server."),
                Id(s.as_uuid()),
            ],
            Self::HostFlap(h, l) => [
                Text("usbpt.evt.host."),
                Text(h.as_str()),
                Text(".flap."),
                Id(l.as_uuid()),
            ],
            Self::Claim(l) => [Text("usbpt.evt.claim."), Id(l.as_uuid()), NONE, NONE],
            Self::Lineage(l) => [Text("usbpt.evt.lineage."), Id(l.as_uuid()), NONE, NONE],
            Self::Flavor(f) => [Text("usbpt.evt.flavor."), Text(f.as_str()), NONE, NONE],
            Self::Name(n) => [Text("usbpt.evt.name."), Text(n.as_str()), NONE, NONE],
            Self::Control(h, s) => [
                Text("usbpt.evt.ctl."),
                Text(h.as_str()),
                Text(".server."),
                Id(s.as_uuid()),
            ],
            Self::Server(s) => [Text("usbpt.evt.server."), Id(s.as_uuid()), NONE, NONE],
        }
    }

    /// Whether `subject` is exactly this subject, compared piece by piece.
    fn is(self, subject: &str) -> bool {
        let mut rest = subject.as_bytes();
        let mut uuid = [0u8; uuid::fmt::Hyphenated::LENGTH];
        for piece in self.pieces() {
            let expected = match piece {
                Piece::Text(t) => t.as_bytes(),
                Piece::Id(u) => u.hyphenated().encode_lower(&mut uuid).as_bytes(),
            };
            match rest.strip_prefix(expected) {
                Some(r) => rest = r,
                None => return false,
            }
        }
        rest.is_empty()
    }
}

impl fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for piece in self.pieces() {
            match piece {
                Piece::Text(t) => f.write_str(t)?,
                Piece::Id(u) => fmt::Display::fmt(&u.hyphenated(), f)?,
            }
        }
        Ok(())
    }
}

/// Where an event goes, and for control-plane work what it asks of the host it addresses: the
/// one routing-and-work table. [`for_body`] builds the subject from it and the agent's executor
/// (`work_for`) derives its work from it, so an event routed to a host always says what the host
/// must do, and no host does work for an event not routed to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// `usbpt.evt.host.{host}.…`: published by that host's agent.
    Agent {
        host: &'a HostName,
        about: AgentSubject<'a>,
    },
    /// `usbpt.evt.claim.{lineage}` (fenced).
    Claim(&'a LineageId),
    /// `usbpt.evt.flavor.{name}` (fenced).
    Flavor(&'a FlavorName),
    /// `usbpt.evt.lineage.{lineage}`: the control plane's record about a physical device.
    Lineage(&'a LineageId),
    /// `usbpt.evt.name.{server_name}` (fenced): the events that give a server its name.
    Name(&'a ServerName),
    /// `usbpt.evt.ctl.{host}.server.{server}`: work the control plane asks of one host.
    Work(HostWork<'a>),
    /// `usbpt.evt.server.{server}`: the control plane's record; no host has work to do.
    Server(&'a ServerId),
}

/// The last part of an agent's subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentSubject<'a> {
    /// `…agent`
    Agent,
    /// `…device.{device}`
    Device(&'a DeviceId),
    /// `…clash`
    Clash,
    /// `…server.{server}`
    Server(&'a ServerId),
    /// `…flap.{lineage}`
    Flap(&'a LineageId),
}

/// Work addressed to `host`'s agent about one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostWork<'a> {
    pub host: &'a HostName,
    pub server: ServerId,
    pub work: WorkKind<'a>,
}

/// What an event asks of the host it addresses. Re-attaching a re-enumerated device is work an
/// agent gives itself from its own observations; no event asks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkKind<'a> {
    /// Define the server's domain with these devices and start it.
    Define {
        devices: &'a [AssignedDevice],
        why: DefineWhy<'a>,
    },
    /// A power or lifecycle action (teardown and rebuild included).
    Action(ServerAction),
    /// The server was deleted: destroy and undefine its domain.
    Teardown,
    /// A re-attach held back for a changed fingerprint (`DeviceReattachHeld`) may go ahead: attach
    /// the lineage's current enumeration `device` to the server, and remember `fingerprint` as
    /// the one it has.
    Reattach {
        lineage: &'a LineageId,
        device: &'a DeviceId,
        fingerprint: &'a Fingerprint,
    },
}

/// Why a domain is (re)defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefineWhy<'a> {
    /// `ServerScheduled`.
    Boot,
    /// `ServerResized` onto this host; `from_host` equal to it is a resize in place. The host it
    /// left gets its own `ServerActionRequested{teardown}`.
    Resize { from_host: &'a HostName },
    /// `ServerMigrated` (cold) onto this host. The host it left gets its own
    /// `ServerActionRequested{teardown}`.
    Migrate { from_host: &'a HostName },
}

/// The routing-and-work table. Exhaustive, no wildcard: a new event variant does not compile
/// until it is routed here.
pub fn route(body: &Event) -> Route<'_> {
    let agent = |host, about| Route::Agent { host, about };
    let work = |host, server, work| Route::Work(HostWork { host, server, work });
    match body {
        Event::HostAgentStarted(e) => agent(&e.host, AgentSubject::Agent),
        Event::DeviceDiscovered(e) => agent(&e.host, AgentSubject::Device(&e.device_id)),
        Event::DeviceDiscoveredV2(e) => agent(
            &e.discovery.host,
            AgentSubject::Device(&e.discovery.device_id),
        ),
        Event::DeviceInvalidated(e) => agent(&e.host, AgentSubject::Device(&e.device_id)),
        Event::DeviceClashDetected(e) => agent(&e.host, AgentSubject::Clash),
        Event::DeviceAttached(e) => agent(&e.host, AgentSubject::Server(&e.server_id)),
        Event::DeviceReattached(e) => agent(&e.host, AgentSubject::Server(&e.server_id)),
        Event::DeviceAttachFailed(e) => agent(&e.host, AgentSubject::Server(&e.server_id)),
        Event::DeviceReattachHeld(e) => agent(&e.host, AgentSubject::Server(&e.server_id)),
        Event::PortFlapping(e) => agent(&e.host, AgentSubject::Flap(&e.lineage_id)),
        Event::PortFlappingCleared(e) => agent(&e.host, AgentSubject::Flap(&e.lineage_id)),
        Event::LineageConflictResolved(e) => Route::Claim(&e.lineage_id),
        Event::FlavorFingerprintPolicySet(e) => Route::Flavor(&e.name),
        Event::FingerprintAccepted(e) => match (&e.host, &e.device_id, e.server_id) {
            (Some(host), Some(device), Some(server)) => work(
                host,
                server,
                WorkKind::Reattach {
                    lineage: &e.lineage_id,
                    device,
                    fingerprint: &e.fingerprint,
                },
            ),
            _ => Route::Lineage(&e.lineage_id),
        },
        Event::ServerStateChanged(e) => match (&e.host, e.reported_by_agent) {
            (Some(h), true) => agent(h, AgentSubject::Server(&e.server_id)),
            _ => Route::Server(&e.server_id),
        },
        Event::DeviceClaimed(e) => Route::Claim(&e.lineage_id),
        Event::DeviceReleased(e) => Route::Claim(&e.lineage_id),
        Event::FlavorCreated(e) => Route::Flavor(&e.name),
        Event::FlavorDeleted(e) => Route::Flavor(&e.name),
        Event::FlavorUsbSet(e) => Route::Flavor(&e.name),
        Event::FlavorSized(e) => Route::Flavor(&e.name),
        Event::LineageLabeled(e) => Route::Lineage(&e.lineage_id),
        Event::ServerUpdated(e) => Route::Name(&e.name),
        Event::ServerResizeVerifying(e) => Route::Server(&e.server_id),
        Event::ServerResizeConfirmed(e) => Route::Server(&e.server_id),
        Event::ServerResizeReverted(e) => Route::Server(&e.server_id),
        Event::ServerScheduled(e) => work(
            &e.host,
            e.server_id,
            WorkKind::Define {
                devices: &e.devices,
                why: DefineWhy::Boot,
            },
        ),
        Event::ServerResized(e) => work(
            &e.host,
            e.server_id,
            WorkKind::Define {
                devices: &e.devices,
                why: DefineWhy::Resize {
                    from_host: &e.from_host,
                },
            },
        ),
        Event::ServerMigrated(e) => work(
            &e.host,
            e.server_id,
            WorkKind::Define {
                devices: &e.devices,
                why: DefineWhy::Migrate {
                    from_host: &e.from_host,
                },
            },
        ),
        Event::ServerActionRequested(e) => work(&e.host, e.server_id, WorkKind::Action(e.action)),
        Event::ServerDeleted(e) => match &e.host {
            Some(h) => work(h, e.server_id, WorkKind::Teardown),
            None => Route::Server(&e.server_id),
        },
        Event::ServerBootRequested(e) => Route::Name(&e.name),
        Event::ServerScheduleFailed(e) => Route::Server(&e.server_id),
        Event::ServerMigrationRefused(e) => Route::Server(&e.server_id),
    }
}

/// The work `body` asks of `host`'s agent, if it is addressed to that host.
pub fn work_for_host<'a>(host: &HostName, body: &'a Event) -> Option<HostWork<'a>> {
    match route(body) {
        Route::Work(w) if w.host == host => Some(w),
        _ => None,
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
/// (one per lineage), flavor subjects (one per name) and server-name subjects (one per name).
/// The view tracks the last sequence of exactly these.
pub fn is_fenced(subject: &str) -> bool {
    subject
        .strip_prefix("usbpt.evt.")
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(kind, name)| matches!(kind, "claim" | "flavor" | "name") && !name.is_empty())
}

/// Whether an envelope may legitimately arrive on `subject`: it must be the subject it would
/// be published on, so a forged host or a misrouted event is caught.
pub fn matches(envelope: &Envelope, subject: &str) -> bool {
    let legacy = || match &envelope.body {
        // Written before server names were fenced (ADR 0010): on the server's own subject.
        Event::ServerBootRequested(e) => Subject::Server(&e.server_id).is(subject),
        Event::ServerUpdated(e) => Subject::Server(&e.server_id).is(subject),
        _ => false,
    };
    (Subject::of(&envelope.body).is(subject) || legacy())
        && envelope.host.as_ref() == envelope.body.agent_host()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_matches_exactly_what_it_writes() {
        let h = HostName::new("host-a").expect("valid");
        let d = DeviceId::from_uuid(uuid::Uuid::from_u128(
            0x0123_4567_89ab_cdef_0123_4567_89ab_cdef,
        ));
        let s = ServerId::from_uuid(uuid::Uuid::from_u128(7));
        let l = LineageId::from_uuid(uuid::Uuid::from_u128(u128::MAX));
        let f = FlavorName::new("gold").expect("valid");
        let n = ServerName::new("web-1").expect("valid");
        let all = [
            (
                Subject::HostAgent(&h),
                "usbpt.evt.host.host-a.agent".to_owned(),
            ),
            (
                Subject::HostDevice(&h, &d),
                format!("usbpt.evt.host.host-a.device.{d}"),
            ),
            (
                Subject::HostClash(&h),
                "usbpt.evt.host.host-a.clash".to_owned(),
            ),
            (
                Subject::HostServer(&h, &s),
                format!("usbpt.evt.host.host-a.server.{s}"),
            ),
            (
                Subject::HostFlap(&h, &l),
                format!("usbpt.evt.host.host-a.flap.{l}"),
            ),
            (Subject::Claim(&l), format!("usbpt.evt.claim.{l}")),
            (Subject::Lineage(&l), format!("usbpt.evt.lineage.{l}")),
            (Subject::Flavor(&f), "usbpt.evt.flavor.gold".to_owned()),
            (Subject::Name(&n), "usbpt.evt.name.web-1".to_owned()),
            (
                Subject::Control(&h, s),
                format!("usbpt.evt.ctl.host-a.server.{s}"),
            ),
            (Subject::Server(&s), format!("usbpt.evt.server.{s}")),
        ];
        for (subject, want) in &all {
            assert_eq!(&subject.to_string(), want);
            assert!(subject.is(want), "{want}");
            assert!(!subject.is(&want[..want.len() - 1]), "{want} shortened");
            assert!(!subject.is(&format!("{want}x")), "{want} extended");
            assert!(!subject.is(&want.to_uppercase()), "{want} upper case");
        }
        assert_eq!(
            format!("{d}"),
            "01234567-89ab-cdef-0123-456789abcdef",
            "UUIDs hyphenated, lower case"
        );
    }

    #[test]
    fn heartbeats_are_outside_the_stream() {
        let h = HostName::new("host-a").expect("valid");
        let s = heartbeat(&h);
        assert_eq!(s, "usbpt.hb.host-a");
        assert_eq!(heartbeat_host(&s), Some(h));
        assert_eq!(heartbeat_host("usbpt.hb."), None);
        assert_eq!(heartbeat_host("usbpt.evt.host.host-a.agent"), None);
        assert!(scope_of(&s).is_err(), "not an event subject");
    }

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
        assert!(is_fenced(&self::name(
            &ServerName::new("erp").expect("valid")
        )));
        assert!(!is_fenced("usbpt.evt.host.host-a.agent"));
        assert!(!is_fenced("usbpt.evt.claim"));
        assert!(!is_fenced("usbpt.cmd.claim.x"));
    }
}
