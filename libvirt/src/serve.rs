//! The executor process, `usbpt agent-executor` (ADR 0016): connects to libvirt, says
//! [`Reply::Ready`] (or [`Reply::Refused`] and ends), then carries out each [`Request`] the
//! agent writes on stdin with the [`Executor`] and writes its events on stdout. It ends at the
//! end of its input: the agent closed it (idle) or the agent is gone.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{info, warn};
use usbpt_agent::libvirt::protocol::{read_frame, write_frame, Reply, Request};
use usbpt_agent::libvirt::{DeviceInfo, DeviceMap, ExecutorConfig, Hands};
use usbpt_schemas::{DeviceId, Envelope, Event, HostName, LineageId};

use crate::Executor;

/// Serves the agent on `input`/`output` until the input ends. `Err` only when the output
/// fails (the agent is gone) or libvirt could not be reached (after saying so).
pub async fn serve<R, W>(config: ExecutorConfig, mut input: R, mut output: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let uri = config.uri.clone();
    let executor = match Executor::connect(config).await {
        Ok(e) => e,
        Err(e) => {
            write_frame(
                &mut output,
                &Reply::Refused {
                    error: format!("{uri}: {e}"),
                },
            )
            .await?;
            return Err(std::io::Error::other(format!("libvirt {uri}: {e}")));
        }
    };
    write_frame(
        &mut output,
        &Reply::Ready {
            domain_type: executor.domain_type().as_str().to_owned(),
        },
    )
    .await?;
    let mut served = 0u64;
    loop {
        let request = match read_frame::<_, Request>(&mut input).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                warn!(error = %e, "agent-executor: unreadable request; stopping");
                return Err(e);
            }
        };
        let events = match request {
            Request::Handle { envelope, devices } => {
                let envelope = usbpt_schemas::codec::decode(&envelope).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                })?;
                let devices: HashMap<DeviceId, DeviceInfo> = devices.into_iter().collect();
                executor.handle(&envelope, &devices).await
            }
            Request::ReattachLineage {
                lineage,
                device,
                info,
            } => executor.reattach_lineage(lineage, device, info).await,
            Request::ResumeAfterHostBoot { devices } => {
                let devices: HashMap<DeviceId, DeviceInfo> = devices.into_iter().collect();
                executor.resume_after_host_boot(&devices).await
            }
        };
        write_frame(&mut output, &Reply::Events(events)).await?;
        served += 1;
    }
    info!(served, "agent-executor: input closed; exiting");
    Ok(())
}

/// The in-process executor as the agent's [`Hands`] (`usbpt up`, the demo, tests).
impl Hands for Executor {
    fn host(&self) -> &HostName {
        Executor::host(self)
    }

    fn handle<'a>(
        &'a self,
        env: &'a Envelope,
        devices: &'a DeviceMap,
    ) -> BoxFuture<'a, Vec<Event>> {
        Box::pin(Executor::handle(self, env, devices))
    }

    fn reattach_lineage(
        &self,
        lineage: LineageId,
        device: DeviceId,
        info: DeviceInfo,
    ) -> BoxFuture<'_, Vec<Event>> {
        Box::pin(Executor::reattach_lineage(self, lineage, device, info))
    }

    fn resume_after_host_boot<'a>(&'a self, devices: &'a DeviceMap) -> BoxFuture<'a, Vec<Event>> {
        Box::pin(Executor::resume_after_host_boot(self, devices))
    }
}

/// The in-process executor, shared.
pub fn hands(executor: Executor) -> Arc<dyn Hands> {
    Arc::new(executor)
}
