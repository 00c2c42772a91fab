//! The demo story, step by step. Every step checks what it claims against the view (or
//! the hypervisor) and fails naming itself; waits are on the view's applied sequence, never
//! sleeps.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use usbpt_bus::Bus;
use usbpt_commands::handler::request;
use usbpt_projector::{Device, DeviceStatus, Snapshot, View};
use usbpt_schemas::commands::{Command, CommandReply};
use usbpt_schemas::{
    FlavorName, HostName, InvalidationReason, ServerName, ServerState, UsbRequest,
};

use super::hosts::{usb_device, SimHost};

const STEP_LIMIT: Duration = Duration::from_secs(30);
const STEPS: usize = 12;

/// The story's two simulated hosts.
pub const HOSTS: [&str; 2] = ["host-a", "host-b"];

pub struct Story {
    bus: Bus,
    view: Arc<View>,
    url: String,
    root: PathBuf,
}

fn h(s: &str) -> Result<HostName> {
    Ok(HostName::new(s)?)
}

impl Story {
    pub fn new(bus: Bus, view: Arc<View>, url: String, root: PathBuf) -> Self {
        Self {
            bus,
            view,
            url,
            root,
        }
    }

    /// Re-reads the view each time it applies more events, until `check` returns `Some`.
    async fn until<T>(
        &self,
        what: &str,
        mut check: impl FnMut(&Snapshot) -> Result<Option<T>>,
    ) -> Result<T> {
        let mut applied = self.view.applied();
        let deadline = tokio::time::Instant::now() + STEP_LIMIT;
        loop {
            if let Some(v) = check(&self.view.snapshot()?)? {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, applied.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("the projector stopped while waiting for {what}"),
                Err(_) => bail!("{what}: not seen within {STEP_LIMIT:?}"),
            }
        }
    }

    async fn command(&self, cmd: Command) -> Result<std::result::Result<String, String>> {
        match request(&self.bus, &cmd, STEP_LIMIT)
            .await
            .map_err(|e| anyhow!(e))?
        {
            CommandReply::Accepted { message, .. } => Ok(Ok(message)),
            CommandReply::Rejected { kind, reason } => Ok(Err(format!("{kind}: {reason}"))),
        }
    }

    async fn accepted(&self, cmd: Command) -> Result<String> {
        self.command(cmd)
            .await?
            .map_err(|r| anyhow!("the command was rejected: {r}"))
    }

    fn present_on(s: &Snapshot, host: &HostName, ids: (u16, u16)) -> Result<Option<Device>> {
        Ok(s.host_devices(host)?.into_iter().find(|d| {
            d.vendor_id().0 == ids.0
                && d.product_id().0 == ids.1
                && d.status != DeviceStatus::Invalidated
        }))
    }

    /// Plays the story; returns the simulated hosts with their agents still running, so the
    /// demo can go on serving them.
    pub async fn play(self) -> Result<Vec<SimHost>> {
        let mut n = 0;
        let mut step = |title: &str| {
            n += 1;
            println!("[{n}/{STEPS}] {title}");
        };
        let say = |line: String| println!("       {line}");

        step("two hypervisor hosts come up, each with a usbpt agent");
        let printer = usb_device(
            "1-3",
            4,
            (0x04b8, 0x0005),
            Some("EPS-7731"),
            7,
            ("EPSON", "Receipt printer"),
        )?;
        let mut host_a = SimHost::new(HOSTS[0], &self.root, &self.url, vec![printer]).await?;
        let mut host_b = SimHost::new(HOSTS[1], &self.root, &self.url, vec![]).await?;
        host_a.start_agent("boot-a-1");
        host_b.start_agent("boot-b-1");
        let (a, b) = (h("host-a")?, h("host-b")?);
        self.until("both hosts' agents", |s| {
            Ok((s.host(&a)?.is_some() && s.host(&b)?.is_some()).then_some(()))
        })
        .await
        .context("step 1 (hosts come up)")?;
        say("host-a: a receipt printer 04b8:0005; host-b: nothing plugged in yet".into());

        step("a USB licence key (136b:0003, no serial) is plugged into host-b, port 2-1.4");
        let key = (0x136b, 0x0003);
        host_b.devices.plug(usb_device(
            "2-1.4",
            3,
            key,
            None,
            3,
            ("Acme", "ERP licence key"),
        )?);
        let first = self
            .until("the key in the view", |s| Self::present_on(s, &b, key))
            .await
            .context("step 2 (the key is discovered)")?;
        say(format!(
            "discovered as device {} at {} (port {}), lineage {} ({:?}: it has no serial)",
            first.id(),
            first.address().nova_address(),
            first.port_path(),
            first.lineage_id(),
            first.discovery.lineage_kind
        ));

        step("the administrator lists host-b's USB devices (the Nova hypervisor document)");
        let snap = self.view.snapshot()?;
        let host = snap
            .host(&b)?
            .ok_or_else(|| anyhow!("step 3: host-b unknown"))?;
        let doc = usbpt_api::hypervisor_doc(&host, &snap.host_devices(&b)?);
        let stats = doc["hypervisor"]["usb_device_stats"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if stats.is_empty() {
            bail!("step 3: host-b's document lists no USB device");
        }
        for d in &stats {
            say(format!(
                "{}  {}:{}  {}  {}",
                d["address"].as_str().unwrap_or("?"),
                d["vendor_id"].as_str().unwrap_or("?"),
                d["product_id"].as_str().unwrap_or("?"),
                d["status"].as_str().unwrap_or("?"),
                d["id"].as_str().unwrap_or("?"),
            ));
        }

        step("a flavor binds the key by its device id ({\"usb_devices\":[{\"id\": …}]})");
        let spec: UsbRequest = format!("id={},controller=ehci", first.id()).parse()?;
        let erp_key = FlavorName::new("erp-key")?;
        say(self
            .accepted(Command::CreateFlavor {
                resources: Default::default(),
                name: erp_key.clone(),
                usb: vec![spec],
                on_fingerprint_change: None,
            })
            .await
            .context("step 4 (flavor create)")?);

        step("a server boots with that flavor: it is scheduled on host-b (not host-a) and gets the key");
        let erp = ServerName::new("erp-1")?;
        say(self
            .accepted(Command::Boot {
                name: erp.clone(),
                flavor: erp_key,
                host: None,
            })
            .await
            .context("step 5 (boot)")?);
        let server = self
            .until("erp-1 active with its key attached", |s| {
                let Some(srv) = s.server_by_name(&erp)? else {
                    return Ok(None);
                };
                let attached = s
                    .device(&first.id())?
                    .is_some_and(|d| d.status == DeviceStatus::Attached);
                Ok((srv.state == ServerState::Active && attached).then_some(srv))
            })
            .await
            .context("step 5 (the key is attached)")?;
        if server.host.as_ref() != Some(&b) {
            bail!(
                "step 5: erp-1 was scheduled on {:?}, not host-b",
                server.host
            );
        }
        let xml = self.executor_xml(&host_b, &server.id).await?;
        say(format!(
            "domain {} defined and running on host-b; its <hostdev> points at bus {} device {}",
            server.id,
            first.address().bus(),
            first.address().devnum()
        ));
        if !xml.contains(&format!("device='{}'", first.address().devnum())) {
            bail!("step 5: the domain XML does not hold the key's address");
        }

        step("host-b reboots: the key re-enumerates with a new device number");
        host_b.stop_agent().await;
        host_b.devices.change_silently(|present| {
            if let Some(d) = present
                .values_mut()
                .find(|d| d.descriptors.vendor_id.0 == key.0)
            {
                if let Ok(a) = usbpt_schemas::UsbAddress::new(d.descriptors.address.bus(), 7) {
                    d.descriptors.address = a;
                }
            }
        });
        host_b.start_agent("boot-b-2");
        let second = self
            .until("the key's new enumeration", |s| {
                Ok(Self::present_on(s, &b, key)?.filter(|d| d.id() != first.id()))
            })
            .await
            .context("step 6 (re-enumeration)")?;
        let old = self
            .view
            .snapshot()?
            .device(&first.id())?
            .ok_or_else(|| anyhow!("step 6: old enumeration gone"))?;
        let reason = old.invalidation.as_ref().and_then(|i| i.reason);
        if reason != Some(InvalidationReason::HostRebooted)
            || second.discovery.supersedes != Some(first.id())
        {
            bail!("step 6: expected HostRebooted and a superseding enumeration, got {reason:?} / {:?}", second.discovery.supersedes);
        }
        say(format!(
            "device {} invalidated: {:?}",
            first.id(),
            InvalidationReason::HostRebooted
        ));
        say(format!(
            "device {} discovered at {} (was {}), same lineage {}",
            second.id(),
            second.address().nova_address(),
            first.address().nova_address(),
            second.lineage_id()
        ));

        step("the server keeps its key: the new enumeration is re-attached (follow=lineage)");
        let second_id = second.id();
        let d = self
            .until("the new enumeration attached to erp-1", |s| {
                Ok(s.device(&second_id)?
                    .filter(|d| d.status == DeviceStatus::Attached && d.holder == Some(server.id)))
            })
            .await
            .context("step 7 (re-attach)")?;
        let xml = self.executor_xml(&host_b, &server.id).await?;
        if !xml.contains(&format!("device='{}'", d.address().devnum())) {
            bail!("step 7: the domain definition does not hold the new address");
        }
        say(format!(
            "erp-1 holds device {} at {}; libvirt's definition was updated ({})",
            d.id(),
            d.address().nova_address(),
            d.attachment
                .as_ref()
                .map(|a| a.detail.clone())
                .unwrap_or_default()
        ));

        step("resize erp-1 to a flavor with a security token (1050:0120) plugged into host-b");
        let token = (0x1050, 0x0120);
        host_b.devices.plug(usb_device(
            "2-2",
            9,
            token,
            Some("YK-5521"),
            3,
            ("Yubico", "Security Key"),
        )?);
        let tok = self
            .until("the token in the view", |s| Self::present_on(s, &b, token))
            .await
            .context("step 8 (token discovered)")?;
        let erp_token = FlavorName::new("erp-token")?;
        self.accepted(Command::CreateFlavor {
            resources: Default::default(),
            name: erp_token.clone(),
            usb: vec!["vendor=1050,product=0120,controller=xhci".parse()?],
            on_fingerprint_change: None,
        })
        .await
        .context("step 8 (flavor create)")?;
        say(self
            .accepted(Command::Resize {
                name: erp.clone(),
                flavor: erp_token,
            })
            .await
            .context("step 8 (resize)")?);
        // The resize awaits confirmation (Nova's VERIFY_RESIZE), the key still reserved.
        say(self
            .accepted(Command::ConfirmResize { name: erp.clone() })
            .await
            .context("step 8 (confirm the resize)")?);
        let tok_id = tok.id();
        self.until("the token attached and the key released", |s| {
            let t = s
                .device(&tok_id)?
                .is_some_and(|d| d.status == DeviceStatus::Attached && d.holder == Some(server.id));
            let k = s
                .device(&second_id)?
                .is_some_and(|d| d.status == DeviceStatus::Available);
            Ok((t && k).then_some(()))
        })
        .await
        .context("step 8 (token attached, key released)")?;
        say(format!(
            "erp-1 now holds the token {}; the licence key is available again",
            tok_id
        ));

        step("live migration of erp-1 is refused, with the reason");
        match self
            .command(Command::Migrate {
                name: erp.clone(),
                live: true,
                host: Some(a.clone()),
            })
            .await?
        {
            Ok(m) => bail!("step 9: live migration was accepted: {m}"),
            Err(reason) => say(format!("refused: {reason}")),
        }
        self.until("the refusal recorded", |s| {
            Ok(s.server_by_name(&erp)?
                .filter(|srv| !srv.migration_refusals.is_empty())
                .map(|_| ()))
        })
        .await
        .context("step 9 (refusal recorded)")?;

        step("a strict binding: a scanner is re-plugged under server scan-1");
        let scanner = (0x04a9, 0x1909);
        host_b.devices.plug(usb_device(
            "2-3",
            11,
            scanner,
            Some("SC-88"),
            0xff,
            ("Canon", "Document scanner"),
        )?);
        let sc = self
            .until("the scanner in the view", |s| {
                Self::present_on(s, &b, scanner)
            })
            .await
            .context("step 10 (scanner discovered)")?;
        let strict = FlavorName::new("scan-strict")?;
        self.accepted(Command::CreateFlavor {
            resources: Default::default(),
            name: strict.clone(),
            usb: vec![format!("id={},follow=strict", sc.id()).parse()?],
            on_fingerprint_change: None,
        })
        .await
        .context("step 10 (flavor create)")?;
        let scan = ServerName::new("scan-1")?;
        self.accepted(Command::Boot {
            name: scan.clone(),
            flavor: strict,
            host: None,
        })
        .await
        .context("step 10 (boot)")?;
        let sc_id = sc.id();
        self.until("the scanner attached to scan-1", |s| {
            Ok(s.device(&sc_id)?
                .filter(|d| d.status == DeviceStatus::Attached)
                .map(|_| ()))
        })
        .await
        .context("step 10 (scanner attached)")?;
        let syspath = sc.discovery.syspath.clone();
        host_b.devices.unplug(&syspath);
        host_b.devices.plug(usb_device(
            "2-3",
            12,
            scanner,
            Some("SC-88"),
            0xff,
            ("Canon", "Document scanner"),
        )?);
        let replugged = self
            .until(
                "the scanner's new enumeration, free, and scan-1 still active",
                |s| {
                    let new = Self::present_on(s, &b, scanner)?
                        .filter(|d| d.id() != sc_id && d.status == DeviceStatus::Available);
                    let active = s
                        .server_by_name(&scan)?
                        .is_some_and(|srv| srv.state == ServerState::Active);
                    let claim_gone = s.claim(&sc.lineage_id())?.is_none();
                    Ok(new.filter(|_| active && claim_gone))
                },
            )
            .await
            .context("step 10 (strict: released, not followed)")?;
        say(format!(
            "device {} invalidated; its claim was released at once (follow=strict); the new enumeration {} is available",
            sc_id,
            replugged.id()
        ));
        say("scan-1 keeps running without it (startupPolicy='optional'); a resize to a flavor with the new device binds it".into());

        step("erp-1 is deleted: its token is released");
        say(self
            .accepted(Command::Delete { name: erp.clone() })
            .await
            .context("step 11 (delete)")?);
        self.until("the token available again", |s| {
            Ok(s.device(&tok_id)?
                .filter(|d| d.status == DeviceStatus::Available)
                .map(|_| ()))
        })
        .await
        .context("step 11 (token released)")?;
        say(format!(
            "token {tok_id} is available; host-b's agent tears erp-1's domain down"
        ));

        step(
            "audit: replay the whole history into a fresh view and verify it against the live one",
        );
        // The agents may still be reporting (host-b's teardown outcome): compare at one sequence,
        // replaying again when the live view moved past the head the replay stopped at.
        let scratch = tempfile::tempdir()?;
        let mut attempt = 0;
        let (report, digest) = loop {
            attempt += 1;
            let head = self.bus.last_sequence().await?;
            self.view.wait_applied(head, STEP_LIMIT).await;
            let rebuilt = Arc::new(View::open_private(
                scratch.path().join(format!("replay-{attempt}.redb")),
            )?);
            let report =
                usbpt_projector::replay::rebuild(&self.bus, Arc::clone(&rebuilt), head, |_| {})
                    .await?;
            let live = self.view.snapshot()?;
            if live.last_applied_seq()? != head && attempt < 5 {
                continue;
            }
            match usbpt_projector::digest::compare(&live, &rebuilt.snapshot()?)? {
                Ok(digest) => break (report, digest),
                Err(d) => bail!(
                    "step 12: the replayed view differs from the live one at {} {}",
                    d.table,
                    d.key
                ),
            }
        };
        say(format!(
            "{} events replayed in {:.0} ms; views identical ({digest})",
            report.last_seq,
            report.elapsed.as_secs_f64() * 1000.0
        ));
        Ok(vec![host_a, host_b])
    }

    async fn executor_xml(
        &self,
        host: &SimHost,
        server: &usbpt_schemas::ServerId,
    ) -> Result<String> {
        host.executor
            .domain_xml(*server, true)
            .await
            .map_err(|e| anyhow!("reading the domain from libvirt: {e}"))
    }
}
