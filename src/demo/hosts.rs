//! A simulated hypervisor host: a simulated device source feeding the real agent loop, and the
//! real libvirt executor on libvirt's test driver. The executor outlives agent restarts, as a
//! hypervisor outlives its agent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use usbpt_agent::source::{simulated, SimulatedHost};
use usbpt_agent::{progress, AgentConfig, BusTarget, Filter, UsbDevice};
use usbpt_libvirt::{test_driver_uri, Executor, ExecutorConfig, XmlValidator};
use usbpt_schemas::HostName;

/// libvirt's test driver needs a node description.
const NODE_XML: &str = "<node>\n  <cpu><mhz>2400</mhz><model>x86_64</model></cpu>\n  <memory>8388608</memory>\n</node>\n";

pub struct SimHost {
    pub name: HostName,
    pub devices: SimulatedHost,
    pub executor: Arc<Executor>,
    data: PathBuf,
    target: BusTarget,
    running: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl SimHost {
    pub async fn new(name: &str, root: &Path, url: &str, devices: Vec<UsbDevice>) -> Result<Self> {
        let name = HostName::new(name)?;
        let data = root.join("hosts").join(name.as_str());
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        let node = data.join("libvirt-node.xml");
        std::fs::write(&node, NODE_XML)?;
        let mut config = ExecutorConfig::new(name.clone(), test_driver_uri(&node)?);
        if which("virt-xml-validate") {
            config.validator = Some(Arc::new(XmlValidator::new()));
        }
        let executor = Arc::new(
            Executor::connect(config)
                .await
                .with_context(|| format!("libvirt test driver for {name}"))?,
        );
        let (_, handle) = simulated(devices);
        let target = match crate::cmd_up::PrivateCreds::open(root)? {
            Some(creds) => creds.agent_target(url, &name),
            None => BusTarget::new(url),
        };
        Ok(Self {
            name,
            devices: handle,
            executor,
            data,
            target,
            running: None,
        })
    }

    /// Starts (or restarts) this host's agent with `boot_id`.
    pub fn start_agent(&mut self, boot_id: &str) {
        let config = AgentConfig {
            host: self.name.clone(),
            boot_id: boot_id.to_owned(),
            hypervisor_uri: self.executor.uri().to_owned(),
            data_dir: self.data.clone(),
            filter: Filter::default(),
            bus: self.target.clone(),
            progress: progress::silent(),
            drain_on_stop: Duration::from_secs(2),
            flap: usbpt_agent::FlapSettings::default(),
        };
        let (stop, stopped) = oneshot::channel();
        let source = self.devices.source();
        let executor = Some(Arc::clone(&self.executor));
        let host = self.name.clone();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = usbpt_agent::run_with_executor(config, source, executor, shutdown).await
            {
                tracing::error!(%host, error = %e, "simulated agent failed");
            }
        });
        self.running = Some((stop, task));
    }

    /// Stops the agent (as a host shutting down would) and waits for it.
    pub async fn stop_agent(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// A USB device as the kernel would show it at `port` with `devnum`.
pub fn usb_device(
    port: &str,
    devnum: u16,
    ids: (u16, u16),
    serial: Option<&str>,
    class: u8,
    names: (&str, &str),
) -> Result<UsbDevice> {
    Ok(usbpt_agent::source::simulated_device(
        port, devnum, ids, serial, class, names,
    )?)
}
