//! The agent's hands: work the control plane addresses to this host
//! (`usbpt.evt.ctl.{host}.>`: boot, resize, actions, delete, teardown) is carried out through
//! the libvirt executor ([`Hands`]: in a child process for the host agent, ADR 0016), and a held lineage that re-enumerates is re-attached. Every outcome
//! is an event that goes through the same outbox as the device events, so it is published once,
//! in order, even across NATS outages and agent restarts. A control message is acknowledged only
//! after its outcome is in the outbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Notify};
use tracing::{info, warn};
use usbpt_schemas::{subjects, DeviceId, Envelope, Event, LineageId};

use crate::guard;
use crate::libvirt::{DeviceInfo, Hands};
use crate::progress::{Progress, ProgressSink};
use crate::publisher::BusTarget;
use crate::store::{Store, StoreError};

/// What the agent knows of its devices, for the executor: present ones and recently ended ones.
pub type Devices = Arc<HashMap<DeviceId, DeviceInfo>>;

/// A held lineage came back as a new enumeration.
#[derive(Debug, Clone, Copy)]
pub struct Reenumerated {
    pub lineage: LineageId,
    pub device: DeviceId,
    pub info: DeviceInfo,
}

pub(crate) struct Control<H: Hands + ?Sized> {
    pub executor: Arc<H>,
    pub store: Arc<Store>,
    pub wake: Arc<Notify>,
    pub target: BusTarget,
    pub devices: watch::Receiver<Devices>,
    pub reenumerated: mpsc::UnboundedReceiver<Reenumerated>,
    /// The host rebooted since the agent last ran: start the domains that were running.
    pub resume_after_boot: bool,
    pub progress: ProgressSink,
}

const RETRY: Duration = Duration::from_secs(1);
/// Work items per fetch of the control consumer.
const CONTROL_BATCH: usize = 64;
/// How long one fetch of control work waits on the server (a long poll).
const CONTROL_FETCH_WAIT: Duration = Duration::from_secs(5);
/// After how long unacknowledged work is delivered again (the consumer's setting).
const CONTROL_ACK_WAIT: Duration = Duration::from_secs(30);

impl<H: Hands + ?Sized> Control<H> {
    fn enqueue(&self, events: Vec<Event>, cause: Option<&Envelope>) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let envelopes: Vec<Envelope> = events
            .into_iter()
            .map(|e| {
                let env = Envelope::new(e);
                match cause {
                    Some(c) => env.caused_by(c),
                    None => env,
                }
            })
            .collect();
        for e in &envelopes {
            info!(kind = e.body.kind(), "executor outcome queued");
        }
        self.store.enqueue(&envelopes)?;
        self.wake.notify_one();
        Ok(())
    }

    /// Logs and counts refused work ([`guard::check`]).
    fn refuse(&self, subject: &str, kind: &str, reason: String) {
        let refused = guard::count_refusal();
        warn!(%subject, kind, %reason, refused, "control: work refused");
        (self.progress)(&Progress::WorkRefused {
            subject: subject.to_owned(),
            kind: kind.to_owned(),
            reason,
            refused,
        });
    }

    async fn reattach(&self, r: Reenumerated) -> Result<(), StoreError> {
        let events = self
            .executor
            .reattach_lineage(r.lineage, r.device, r.info)
            .await;
        self.enqueue(events, None)
    }

    /// Runs until the store fails (fatal) or the task is dropped. NATS outages are waited out;
    /// re-attachments go on meanwhile.
    pub async fn run(mut self) -> Result<(), StoreError> {
        let host = self.executor.host().clone();
        let durable = subjects::agent_consumer(&host);
        if self.resume_after_boot {
            let devices = self.devices.borrow().clone();
            let events = self.executor.resume_after_host_boot(&devices).await;
            self.enqueue(events, None)?;
        }
        loop {
            let bus = tokio::select! {
                b = self.target.connect() => b,
                Some(r) = self.reenumerated.recv() => { self.reattach(r).await?; continue; }
            };
            let bus = match bus {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "control: bus unreachable; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let mut consumer = bus.durable(
                &durable,
                Some(subjects::control_for_host_all(&host)),
                CONTROL_ACK_WAIT,
            );
            if let Err(e) = consumer.open().await {
                warn!(error = %e, "control: cannot open the consumer; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
            // Fetches run on their own task so that a re-attach never cancels one in flight
            // (work delivered to a cancelled fetch would wait out the ack wait).
            let (work_tx, mut work) = mpsc::channel(CONTROL_BATCH);
            let fetcher = AbortOnDrop(tokio::spawn(async move {
                loop {
                    match consumer.fetch(CONTROL_BATCH, CONTROL_FETCH_WAIT).await {
                        Ok(batch) => {
                            for received in batch {
                                if work_tx.send(received).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "control: consumer interrupted; reconnecting");
                            return;
                        }
                    }
                }
            }));
            info!(consumer = %durable, "control: listening for work");
            (self.progress)(&Progress::Listening {
                consumer: durable.clone(),
            });
            loop {
                tokio::select! {
                    Some(r) = self.reenumerated.recv() => self.reattach(r).await?,
                    next = work.recv() => {
                        let Some(msg) = next else { break };
                        let d = &msg.delivery;
                        match d.decode() {
                            Ok(env) => match guard::check(&host, &d.subject, &d.payload, d.signature.as_deref(), &env, self.target.control_key.as_deref()) {
                                Ok(()) => {
                                    let devices = self.devices.borrow().clone();
                                    let events = self.executor.handle(&env, &devices).await;
                                    self.enqueue(events, Some(&env))?;
                                }
                                Err(reason) => self.refuse(&d.subject, env.body.kind(), reason),
                            },
                            Err(e) => warn!(subject = %d.subject, error = %e, "control: undecodable work skipped"),
                        }
                        if let Err(e) = msg.ack().await {
                            warn!(error = %e, "control: ack failed; the work may be redelivered");
                        }
                    }
                }
            }
            drop(fetcher);
        }
    }
}

/// Aborts the task when dropped: a stopped agent (or a control loop that reconnects) must not
/// leave a fetch running that would take work no one carries out (it would come back only
/// after the ack wait).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
