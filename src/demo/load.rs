//! `usbpt demo --scenario FILE`: a load story instead of the built-in one. N simulated hosts with
//! M devices each come up, then devices are re-plugged (new device number, same port) at a
//! given rate for a while; at the end the view must show exactly what the hosts have, and a
//! replay must equal the live view.
//!
//! ```toml
//! [load]
//! hosts = 20              # simulated hypervisor hosts
//! devices_per_host = 8    # USB devices on each (half with serials, half without)
//! churn_per_second = 50   # re-plugs per second, across all hosts
//! duration_seconds = 20
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use usbpt_bus::Bus;
use usbpt_projector::{DeviceStatus, View};
use usbpt_schemas::{HostName, UsbAddress};

use super::hosts::{usb_device, SimHost};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub load: Load,
}

/// The name of simulated host `h`.
fn host_name(h: u16) -> String {
    format!("load-{h:04}")
}

impl Scenario {
    /// The simulated hosts' names (each gets an identity on a private bus).
    pub fn host_names(&self) -> Result<Vec<HostName>> {
        (0..self.load.hosts)
            .map(|h| Ok(HostName::new(host_name(h))?))
            .collect()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    pub hosts: u16,
    pub devices_per_host: u8,
    #[serde(default)]
    pub churn_per_second: u32,
    #[serde(default)]
    pub duration_seconds: u32,
}

impl Scenario {
    /// Reads and validates a scenario file; errors name the file and the problem.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading scenario {}", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).with_context(|| format!("scenario {}", path.display()))?;
        let l = &s.load;
        if !(1..=1000).contains(&l.hosts) {
            bail!(
                "scenario {}: hosts must be 1..=1000, not {}",
                path.display(),
                l.hosts
            );
        }
        if !(1..=100).contains(&l.devices_per_host) {
            bail!(
                "scenario {}: devices_per_host must be 1..=100, not {}",
                path.display(),
                l.devices_per_host
            );
        }
        if l.churn_per_second > 10_000 {
            bail!(
                "scenario {}: churn_per_second must be at most 10000",
                path.display()
            );
        }
        Ok(s)
    }
}

/// Plays the scenario; returns the simulated hosts with their agents still running.
pub async fn play(
    scenario: Scenario,
    bus: Bus,
    view: Arc<View>,
    url: String,
    root: PathBuf,
) -> Result<Vec<SimHost>> {
    let l = scenario.load;
    let started = Instant::now();
    println!(
        "[1/3] {} hosts with {} devices each come up",
        l.hosts, l.devices_per_host
    );
    let mut hosts = Vec::new();
    for h in 0..l.hosts {
        let name = host_name(h);
        let devices = (0..l.devices_per_host)
            .map(|d| {
                let serial = (d % 2 == 0).then(|| format!("L{h:04}-{d:03}"));
                usb_device(
                    &format!("{}-{}", 1 + d / 15, 1 + d % 15),
                    2 + u16::from(d % 100),
                    (0x136b, 0x0003),
                    serial.as_deref(),
                    3,
                    ("Acme", "Licence key"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mut host = SimHost::new(&name, &root, &url, devices).await?;
        host.start_agent("boot-1");
        hosts.push(host);
    }
    let expected = usize::from(l.hosts) * usize::from(l.devices_per_host);
    wait_view(
        &bus,
        &view,
        |present| present == expected,
        "every device in the view",
    )
    .await?;
    println!(
        "       {expected} devices in the view after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    println!(
        "[2/3] re-plugging {} devices per second for {} s",
        l.churn_per_second, l.duration_seconds
    );
    let mut replugs = 0u64;
    if l.churn_per_second > 0 && l.duration_seconds > 0 {
        let total = u64::from(l.churn_per_second) * u64::from(l.duration_seconds);
        let mut tick = tokio::time::interval(Duration::from_secs(1) / l.churn_per_second);
        let churn_started = Instant::now();
        for i in 0..total {
            tick.tick().await;
            let host = &hosts[(i as usize) % hosts.len()];
            let present = host.devices.present();
            let Some(dev) = present.get((i as usize / hosts.len()) % present.len()) else {
                continue;
            };
            let mut next = dev.clone();
            let devnum = if dev.descriptors.address.devnum() >= 127 {
                2
            } else {
                dev.descriptors.address.devnum() + 1
            };
            next.descriptors.address = UsbAddress::new(dev.descriptors.address.bus(), devnum)?;
            host.devices.unplug(&dev.syspath);
            host.devices.plug(next);
            replugs += 1;
        }
        println!(
            "       {replugs} re-plugs in {:.1} s",
            churn_started.elapsed().as_secs_f64()
        );
    }

    println!("[3/3] the view matches every host, and a replay matches the view");
    // The agents publish asynchronously: wait until the view shows what every host has.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut applied = view.applied();
    loop {
        let mismatch = mismatch(&view, &hosts)?;
        let Some(why) = mismatch else { break };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{why}");
        }
        let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), applied.changed()).await;
    }
    let head = bus.last_sequence().await?;
    let scratch = tempfile::tempdir()?;
    let rebuilt = Arc::new(View::open_private(scratch.path().join("replay.redb"))?);
    let report = usbpt_projector::replay::rebuild(&bus, Arc::clone(&rebuilt), head, |_| {}).await?;
    if let Some(d) =
        usbpt_projector::digest::first_difference(&rebuilt.snapshot()?, &view.snapshot()?)?
    {
        bail!("the replayed view differs at {} {}", d.table, d.key);
    }
    println!(
        "       {} events; replay of all of them in {:.2} s; views identical",
        report.last_seq,
        report.elapsed.as_secs_f64()
    );
    Ok(hosts)
}

/// The first host whose present devices (port, devnum) differ from the view's, if any.
fn mismatch(view: &View, hosts: &[SimHost]) -> Result<Option<String>> {
    let snap = view.snapshot()?;
    for host in hosts {
        let want: BTreeSet<(String, u16)> = host
            .devices
            .present()
            .iter()
            .map(|d| {
                (
                    d.descriptors.port_path.to_string(),
                    d.descriptors.address.devnum(),
                )
            })
            .collect();
        let got: BTreeSet<(String, u16)> = snap
            .host_devices(&host.name)?
            .iter()
            .filter(|d| d.status != DeviceStatus::Invalidated)
            .map(|d| (d.port_path().to_string(), d.address().devnum()))
            .collect();
        if want != got {
            return Ok(Some(format!(
                "host {}: the view shows {got:?}, the host has {want:?}",
                host.name
            )));
        }
    }
    Ok(None)
}

/// Waits until the view has applied the stream's head and the number of present devices
/// satisfies `done`.
async fn wait_view(bus: &Bus, view: &View, done: impl Fn(usize) -> bool, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut applied = view.applied();
    loop {
        let head = bus.last_sequence().await?;
        let snap = view.snapshot()?;
        if snap.last_applied_seq()? >= head {
            let present = snap
                .hosts()?
                .iter()
                .map(|h| {
                    snap.host_devices(&h.name).map(|ds| {
                        ds.iter()
                            .filter(|d| d.status != DeviceStatus::Invalidated)
                            .count()
                    })
                })
                .sum::<Result<usize, _>>()?;
            if done(present) {
                return Ok(());
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{what}: not reached within 300 s");
        }
        // Woken by every applied batch; re-checked at least each second while agents publish.
        let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), applied.changed()).await;
    }
}
