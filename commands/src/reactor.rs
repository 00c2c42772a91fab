//! Reactions to what hosts report, decided purely and appended by [`run`]:
//!
//! - a claimed enumeration is invalidated and its claim is `follow=strict`: the claim is released
//!   at once (the blueprint: the server runs or boots without it; a resize binds the new one);
//! - a claimed enumeration is invalidated and its claim follows the lineage: if no new
//!   enumeration of the lineage has come within the grace window, the claim is released
//!   (`GraceExpired`); if one came, the agent re-attaches it and the claim stays.
//!
//! - an agent held a re-attach because the lineage came back with another fingerprint
//!   (`DeviceReattachHeld`): when the holding server's flavor says `on_fingerprint_change=follow`,
//!   the new fingerprint is accepted for it (`FingerprintAccepted { by_policy: true }`, work for
//!   that host: its agent re-attaches); with `hold` (the default) an operator accepts.
//!
//! Every command process may run the reactor; the releases are fenced, so one wins. An accept
//! appended twice is harmless: the second re-attach finds the domain already done.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use usbpt_bus::{Bus, BusError, StartAt};
use usbpt_schemas::{
    subjects, DeviceId, DeviceInvalidated, DeviceReattachHeld, DeviceReleased, Envelope, Event,
    FingerprintAccepted, FingerprintPolicy, FollowPolicy, LineageId, Origin, ReleaseReason,
};

use crate::decide::{Fence, Step};
use crate::handler::ViewSource;
use crate::view::{DeviceStatus, ViewError, ViewRead};

/// The default grace window.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(120);

/// What to do about an invalidated enumeration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reaction {
    Nothing,
    /// Release now (strict claims).
    Release(Box<Step>),
    /// Re-check after the grace window with [`grace_expired`].
    WaitGrace,
    /// Accept a changed fingerprint by the flavor's policy ([`on_reattach_held`]).
    Accept(Box<Step>),
}

fn release(
    view: &dyn ViewRead,
    inv_device: DeviceId,
    lineage: LineageId,
    reason: ReleaseReason,
) -> Result<Option<Step>, ViewError> {
    let Some(claim) = view.claim(&lineage)? else {
        return Ok(None);
    };
    if claim.device_id != inv_device {
        return Ok(None);
    }
    let event = Event::DeviceReleased(DeviceReleased {
        device_id: claim.device_id,
        lineage_id: lineage,
        host: claim.host,
        server_id: claim.server_id,
        reason,
    });
    let fence = Fence::Expect(view.subject_seq(&subjects::for_body(&event))?);
    Ok(Some(Step {
        event,
        fence,
        undo: None,
    }))
}

pub fn on_invalidated(view: &dyn ViewRead, inv: &DeviceInvalidated) -> Result<Reaction, ViewError> {
    let Some(claim) = view.claim(&inv.lineage_id)? else {
        return Ok(Reaction::Nothing);
    };
    if claim.device_id != inv.device_id {
        return Ok(Reaction::Nothing);
    }
    Ok(match claim.follow {
        FollowPolicy::Strict => release(
            view,
            inv.device_id,
            inv.lineage_id,
            ReleaseReason::Invalidated,
        )?
        .map_or(Reaction::Nothing, |s| Reaction::Release(Box::new(s))),
        FollowPolicy::Lineage => Reaction::WaitGrace,
    })
}

/// A re-attach held for a changed fingerprint: accepted by policy when the holding server's
/// flavor follows, and the server still holds the lineage's claim; nothing otherwise (`hold`:
/// the operator decides; a server gone or a claim moved: nothing left to re-attach). Pure.
pub fn on_reattach_held(
    view: &dyn ViewRead,
    held: &DeviceReattachHeld,
) -> Result<Reaction, ViewError> {
    let Some(server) = view.server_by_id(&held.server_id)? else {
        return Ok(Reaction::Nothing);
    };
    let Some(flavor) = view.flavor_by_id(&server.flavor_id)? else {
        return Ok(Reaction::Nothing);
    };
    if flavor.on_fingerprint_change != FingerprintPolicy::Follow {
        return Ok(Reaction::Nothing);
    }
    match view.claim(&held.lineage_id)? {
        Some(c) if c.server_id == held.server_id => {}
        _ => return Ok(Reaction::Nothing),
    }
    let event = Event::FingerprintAccepted(FingerprintAccepted {
        lineage_id: held.lineage_id,
        fingerprint: held.seen,
        device_id: Some(held.device_id),
        host: Some(held.host.clone()),
        server_id: Some(held.server_id),
        by_policy: true,
    });
    let subject = subjects::for_body(&event);
    let fence = if subjects::is_fenced(&subject) {
        Fence::Expect(view.subject_seq(&subject)?)
    } else {
        Fence::None
    };
    Ok(Reaction::Accept(Box::new(Step {
        event,
        fence,
        undo: None,
    })))
}

/// The reaction to one event of the stream; events the reactor does not watch give nothing.
/// Pure.
pub fn react(view: &dyn ViewRead, event: &Event) -> Result<Reaction, ViewError> {
    match event {
        Event::DeviceInvalidated(inv) => on_invalidated(view, inv),
        Event::DeviceReattachHeld(held) => on_reattach_held(view, held),
        _ => Ok(Reaction::Nothing),
    }
}

/// After the grace window: release the claim if it still points at the invalidated enumeration
/// and the lineage has no present enumeration.
pub fn grace_expired(
    view: &dyn ViewRead,
    device: DeviceId,
    lineage: LineageId,
) -> Result<Option<Step>, ViewError> {
    if let Some(cur) = view.current_enumeration(&lineage)? {
        if cur.status != DeviceStatus::Invalidated {
            return Ok(None);
        }
    }
    release(view, device, lineage, ReleaseReason::GraceExpired)
}

async fn append(bus: &Bus, step: Step, cause: &Envelope) {
    // The reactor decides for itself (ADR 0014): its events say so.
    let env = Envelope::new(step.event)
        .caused_by(cause)
        .with_origin(Some(Origin::policy("reactor")));
    let r = match step.fence {
        Fence::Expect(seq) => bus.publish_fenced(&env, seq).await,
        Fence::None => bus.publish(&env).await,
    };
    match r {
        Ok(_) => info!(kind = env.body.kind(), "reactor appended"),
        // Another command process released it first (or the claim moved): nothing to do.
        Err(BusError::Conflict { .. }) => {}
        Err(e) => warn!("reactor could not publish: {e}"),
    }
}

/// Watches invalidations from now on and reacts. Returns only when the stream cannot be read.
pub async fn run<V: ViewSource>(bus: Bus, view: Arc<V>, grace: Duration) -> Result<(), BusError> {
    let mut events = bus.reader(StartAt::New, None).await?;
    loop {
        let msg = events.next().await?;
        let Ok(env) = msg.decode() else {
            continue;
        };
        if !matches!(
            env.body,
            Event::DeviceInvalidated(_) | Event::DeviceReattachHeld(_)
        ) {
            continue;
        }
        let seq = msg.seq;
        // Decide against a view that has applied this event.
        view.wait_applied(seq, Duration::from_secs(10)).await;
        let reaction = match view.snapshot().and_then(|s| react(&s, &env.body)) {
            Ok(r) => r,
            Err(e) => {
                warn!("reactor: {e}");
                continue;
            }
        };
        match reaction {
            Reaction::Nothing => {}
            Reaction::Release(step) | Reaction::Accept(step) => append(&bus, *step, &env).await,
            Reaction::WaitGrace => {
                let Event::DeviceInvalidated(inv) = &env.body else {
                    continue;
                };
                let (bus, view, inv, env) =
                    (bus.clone(), Arc::clone(&view), inv.clone(), env.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    if let Ok(head) = bus.last_sequence().await {
                        view.wait_applied(head, Duration::from_secs(10)).await;
                    }
                    match view
                        .snapshot()
                        .and_then(|s| grace_expired(&s, inv.device_id, inv.lineage_id))
                    {
                        Ok(Some(step)) => append(&bus, step, &env).await,
                        Ok(None) => {}
                        Err(e) => warn!("reactor: {e}"),
                    }
                });
            }
        }
    }
}
