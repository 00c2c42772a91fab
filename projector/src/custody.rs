//! The custody ledger (issue 18 item 4): every interval in which a server held a physical
//! device (a lineage), across its enumerations, with why it started and why it ended.
//!
//! Derived, not stored: [`ledger`] is a pure function of the lineage's enumerations (each
//! [`Device`] keeps every [`crate::Holding`] the fold recorded) and the holders' server
//! records, so a view rebuilt by `replay --until SEQ` gives the ledger as it was at SEQ, and
//! replay equality of the devices and servers tables is replay equality of the ledger.
//!
//! Who asked (ADR 0014): an interval's `started_by` is the origin of the claim that began it,
//! its `ended_by` the origin of the release that ended it — the HTTP client, the NATS identity,
//! or a policy (the reactor). `None` where an agent's event began or ended it (a hold the view
//! first saw re-attached) or the event was written before envelopes carried origins.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use usbpt_schemas::{
    HostName, InvalidationReason, LineageId, Origin, PortPath, ReleaseReason, ServerId, ServerName,
    Timestamp, UsbAddress,
};

use crate::error::ViewError;
use crate::model::{Device, HoldEnd, HoldKind, Holding, MoveEnd, Server, Stamp};
use crate::view::Snapshot;

/// Why a custody interval began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustodyStart {
    /// Claimed when the server was booted (`ServerScheduled` followed the claim).
    Boot,
    /// Claimed by a resize onto this device (`ServerResized` followed the claim).
    Resize,
    /// Claimed by a cold migration (`ServerMigrated` followed the claim).
    Migration,
    /// Claimed, and no placement of the server followed (yet).
    Claim,
    /// The first enumeration the view has of this hold is a re-attached or followed one.
    Reattach,
    /// The agent attached it without a claim the view knew of.
    Attach,
}

impl CustodyStart {
    pub fn as_str(self) -> &'static str {
        match self {
            CustodyStart::Boot => "boot",
            CustodyStart::Resize => "resize",
            CustodyStart::Migration => "migration",
            CustodyStart::Claim => "claim",
            CustodyStart::Reattach => "reattach",
            CustodyStart::Attach => "attach",
        }
    }
}

/// Why a custody interval ended: the release's reason, in words for CSV and tables.
pub fn end_str(r: ReleaseReason) -> &'static str {
    match r {
        ReleaseReason::ServerDeleted => "server_deleted",
        ReleaseReason::Resized => "resize",
        ReleaseReason::Migrated => "migration",
        ReleaseReason::GraceExpired => "invalidated_grace_expired",
        ReleaseReason::Invalidated => "invalidated_strict",
        ReleaseReason::BootFailed => "boot_failed",
    }
}

/// One enumeration's part of an interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodySegment {
    pub device_id: usbpt_schemas::DeviceId,
    pub host: HostName,
    pub port_path: PortPath,
    pub address: UsbAddress,
    /// How the server came to hold this enumeration.
    pub how: HoldKind,
    pub from: Stamp,
    /// When the agent attached it to the server's domain, if it did.
    pub attached: Option<Stamp>,
    /// When the server stopped holding this enumeration (released, or moved to the next one).
    pub to: Option<Stamp>,
    /// How this enumeration ended, if it did (e.g. `HostRebooted` before a re-attach).
    pub invalidation: Option<InvalidationReason>,
}

/// One interval in which one server held the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyInterval {
    pub server_id: ServerId,
    /// The server's name now (`None`: the view has no record of it).
    pub server_name: Option<ServerName>,
    /// The host of its first enumeration.
    pub host: HostName,
    pub started: CustodyStart,
    pub from: Stamp,
    /// `None` while the server still holds it.
    pub to: Option<Stamp>,
    pub ended: Option<ReleaseReason>,
    /// Who asked for the command that began it (the claim's origin); `None` for an interval an
    /// agent's event began, or one recorded before origins were.
    pub started_by: Option<Origin>,
    /// Who asked for the release that ended it (an operator's delete, the reactor's grace
    /// expiry); `None` while open or when the release carried no origin.
    pub ended_by: Option<Origin>,
    /// The enumerations it held, in order (more than one after re-attaches).
    pub segments: Vec<CustodySegment>,
}

impl CustodyInterval {
    /// Whether the interval overlaps `[since, until]` (either end open).
    pub fn overlaps(&self, since: Option<Timestamp>, until: Option<Timestamp>) -> bool {
        until.is_none_or(|u| self.from.at <= u)
            && since.is_none_or(|s| self.to.is_none_or(|to| to.at >= s))
    }
}

/// Why a hold that `how` began at `from` started, from what the server did next.
fn why_started(how: HoldKind, from: Stamp, server: Option<&Server>) -> CustodyStart {
    match how {
        HoldKind::Followed | HoldKind::Reattached => CustodyStart::Reattach,
        HoldKind::Attached => CustodyStart::Attach,
        HoldKind::Claimed => {
            let Some(s) = server else {
                return CustodyStart::Claim;
            };
            // The command that claims appends the claims first, then the placement.
            let mut next: Option<(u64, CustodyStart)> = s
                .scheduled
                .filter(|t| t.seq >= from.seq)
                .map(|t| (t.seq, CustodyStart::Boot));
            for m in &s.moves {
                let later = m.stamp.seq >= from.seq;
                if later && next.is_none_or(|(seq, _)| m.stamp.seq < seq) {
                    let why = if m.migration {
                        CustodyStart::Migration
                    } else {
                        CustodyStart::Resize
                    };
                    // A revert's way back re-uses claims the server kept: never a new claim.
                    if !matches!(m.end, Some((MoveEnd::IsRevert, _))) {
                        next = Some((m.stamp.seq, why));
                    }
                }
            }
            next.map_or(CustodyStart::Claim, |(_, why)| why)
        }
    }
}

fn segment(d: &Device, h: &Holding) -> CustodySegment {
    CustodySegment {
        device_id: d.id(),
        host: d.host().clone(),
        port_path: d.port_path().clone(),
        address: d.address(),
        how: h.how,
        from: h.from,
        attached: h.attached,
        to: h.ended.map(|(st, _)| st),
        invalidation: d.invalidation.and_then(|i| i.reason),
    }
}

/// The ledger of one lineage: `history` is its enumerations oldest first (as
/// [`Snapshot::lineage_history`] gives them), `servers` the records of the servers that held
/// them. Intervals are in the order they began.
///
/// A server's holds chain into one interval while they continue each other: a hold that begins
/// before the server's previous hold on this lineage was released (a followed or re-attached
/// enumeration) belongs to it; a hold that begins after the release starts a new interval.
pub fn ledger(history: &[Device], servers: &BTreeMap<ServerId, Server>) -> Vec<CustodyInterval> {
    let mut holds: Vec<(&Device, &Holding)> = history
        .iter()
        .flat_map(|d| d.holders.iter().map(move |h| (d, h)))
        .collect();
    holds.sort_by_key(|(d, h)| (h.from.seq, d.discovered.seq));
    let mut out: Vec<CustodyInterval> = Vec::new();
    for (d, h) in holds {
        let open = out
            .iter_mut()
            .rev()
            .find(|i| i.server_id == h.server_id && i.to.is_none_or(|to| h.from.seq <= to.seq));
        let interval = match open {
            Some(i) => i,
            None => {
                out.push(CustodyInterval {
                    server_id: h.server_id,
                    server_name: servers.get(&h.server_id).map(|s| s.name.clone()),
                    host: d.host().clone(),
                    started: why_started(h.how, h.from, servers.get(&h.server_id)),
                    from: h.from,
                    to: None,
                    ended: None,
                    started_by: h.started_by.clone(),
                    ended_by: None,
                    segments: Vec::new(),
                });
                let last = out.len() - 1;
                &mut out[last]
            }
        };
        interval.segments.push(segment(d, h));
        if let Some((st, HoldEnd::Released(reason))) = h.ended {
            if interval.to.is_none_or(|to| st.seq >= to.seq) {
                interval.to = Some(st);
                interval.ended = Some(reason);
                interval.ended_by = h.ended_by.clone();
            }
        }
    }
    out
}

impl Snapshot {
    /// The custody ledger of `lineage` ([`ledger`]); empty for an unknown lineage.
    pub fn custody(&self, lineage: &LineageId) -> Result<Vec<CustodyInterval>, ViewError> {
        let history = self.lineage_history(lineage)?;
        let mut servers = BTreeMap::new();
        for d in &history {
            for h in &d.holders {
                if let std::collections::btree_map::Entry::Vacant(slot) = servers.entry(h.server_id)
                {
                    if let Some(s) = self.server_by_id(&h.server_id)? {
                        slot.insert(s);
                    }
                }
            }
        }
        Ok(ledger(&history, &servers))
    }
}
