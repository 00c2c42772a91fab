//! The flavor policy end to end, on a real nats-server and a real `usbpt commands` process (its
//! projector view and its reactor): two servers hold a serial key each; both keys come back with
//! another fingerprint and their agents hold the re-attach (`DeviceReattachHeld`, published here
//! as the agent would). The server whose flavor says `on_fingerprint_change=follow` gets a
//! `FingerprintAccepted { by_policy: true }` addressed to its host (re-attach work); the one
//! whose flavor holds gets none.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command as Proc};
use usbpt_bus::{Bus, StartAt};
use usbpt_commands::handler::request;
use usbpt_schemas::commands::{Command, CommandReply};
use usbpt_schemas::*;
use usbpt_testkit::TestNats;

const A: Fingerprint = Fingerprint([0xa; 32]);
const B: Fingerprint = Fingerprint([0xb; 32]);

fn discovery(host: &HostName, serial: &str, devnum: u16, supersedes: Option<DeviceId>) -> Event {
    let (vendor, product) = (VendorId(0x136b), ProductId(0x0003));
    Event::discovered(
        DeviceDiscovered {
            device_id: DeviceId::new_v7(),
            lineage_id: LineageId::derive(&LineageKey::Serial {
                vendor,
                product,
                serial,
            }),
            lineage_kind: LineageKind::Serial,
            host: host.clone(),
            boot_id: "boot-1".into(),
            descriptors: UsbDescriptors {
                address: UsbAddress::new(1, devnum).unwrap(),
                port_path: format!("1-{devnum}").parse().unwrap(),
                vendor_id: vendor,
                product_id: product,
                serial: Some(serial.into()),
                device_class: 0,
                interface_classes: vec![3],
                manufacturer: None,
                product: Some("Licence key".into()),
                vendor_db: None,
                model_db: None,
                speed: None,
                usb_version: None,
            },
            syspath: format!("/sys/devices/test/usb1/1-{devnum}"),
            supersedes,
        },
        Some(if supersedes.is_some() { B } else { A }),
    )
}

async fn start_commands(nats: &str, data: &std::path::Path) -> Result<Child> {
    let mut child = Proc::new(env!("CARGO_BIN_EXE_usbpt"))
        .env("USBPT_INSECURE", "1")
        .args(["commands"])
        .env("NATS_URL", nats)
        .env("USBPT_DATA_DIR", data)
        .env("USBPT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("spawn usbpt commands")?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            eprintln!("[commands] {line}");
            if line.contains("usbpt commands: ready") {
                return Ok(());
            }
        }
        bail!("usbpt commands exited before it was ready")
    })
    .await??;
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[commands] {line}");
        }
    });
    Ok(child)
}

async fn accepted(bus: &Bus, cmd: Command) -> Result<()> {
    match request(bus, &cmd, Duration::from_secs(30))
        .await
        .map_err(anyhow::Error::msg)?
    {
        CommandReply::Accepted { .. } => Ok(()),
        other => bail!("{cmd:?}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_flavor_accepts_a_changed_fingerprint_and_a_hold_flavor_does_not() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let host = HostName::new("host-a")?;
    bus.publish(&Envelope::new(Event::HostAgentStarted(HostAgentStarted {
        host: host.clone(),
        boot_id: "boot-1".into(),
        agent_version: "test".into(),
        hypervisor_uri: "test:///default".into(),
    })))
    .await?;
    let keys = [
        discovery(&host, "KEY-HOLD", 2, None),
        discovery(&host, "KEY-FOLLOW", 3, None),
    ];
    for k in &keys {
        bus.publish(&Envelope::new(k.clone())).await?;
    }
    let data = tempfile::tempdir()?;
    let _commands = start_commands(&nats.url(), data.path()).await?;

    for (serial, policy) in [
        ("KEY-HOLD", None),
        ("KEY-FOLLOW", Some(FingerprintPolicy::Follow)),
    ] {
        let flavor = FlavorName::new(serial.to_lowercase())?;
        accepted(
            &bus,
            Command::CreateFlavor {
                name: flavor.clone(),
                usb: vec![format!("vendor=136b,product=0003,serial={serial}").parse()?],
                resources: Default::default(),
                on_fingerprint_change: policy,
            },
        )
        .await?;
        accepted(
            &bus,
            Command::Boot {
                name: ServerName::new(format!("srv-{}", serial.to_lowercase()))?,
                flavor,
                host: None,
            },
        )
        .await?;
    }

    // Read what the command side recorded: the boots' claims give the server ids.
    let mut stream = bus.reader(StartAt::Beginning, None).await?;
    let head = bus.last_sequence().await?;
    let mut claims = std::collections::BTreeMap::new();
    let mut policy_set = 0;
    loop {
        let msg = stream.next().await?;
        match msg.decode()?.body {
            Event::DeviceClaimed(c) => {
                claims.insert(c.lineage_id, c);
            }
            Event::FlavorFingerprintPolicySet(p) => {
                assert_eq!(p.on_fingerprint_change, FingerprintPolicy::Follow);
                policy_set += 1;
            }
            _ => {}
        }
        if msg.seq >= head {
            break;
        }
    }
    assert_eq!(policy_set, 1, "only the follow flavor records a policy");
    assert_eq!(claims.len(), 2);

    // Both keys re-enumerate with fingerprint B; the agents hold the re-attach. The hold
    // flavor's server first: the reactor decides in stream order.
    let mut held = Vec::new();
    for k in &keys {
        let (old, _) = k.discovery().unwrap();
        let claim = &claims[&old.lineage_id];
        bus.publish(&Envelope::new(Event::DeviceInvalidated(
            DeviceInvalidated {
                device_id: old.device_id,
                lineage_id: old.lineage_id,
                host: host.clone(),
                reason: InvalidationReason::Reenumerated,
                superseded_by: None,
            },
        )))
        .await?;
        let new = discovery(
            &host,
            old.descriptors.serial.as_deref().unwrap(),
            old.descriptors.address.devnum() + 10,
            Some(old.device_id),
        );
        bus.publish(&Envelope::new(new.clone())).await?;
        let (new_d, _) = new.discovery().unwrap();
        let h = DeviceReattachHeld {
            host: host.clone(),
            server_id: claim.server_id,
            lineage_id: old.lineage_id,
            device_id: new_d.device_id,
            expected: A,
            seen: B,
        };
        bus.publish(&Envelope::new(Event::DeviceReattachHeld(h.clone())))
            .await?;
        held.push(h);
    }

    // Await the accept; everything before it in the stream is what the reactor appended.
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        let mut accepts = Vec::new();
        loop {
            let msg = stream.next().await?;
            let env = msg.decode()?;
            if let Event::FingerprintAccepted(a) = env.body {
                let subject = msg.subject.clone();
                accepts.push((a, subject));
                if accepts
                    .iter()
                    .any(|(a, _)| a.server_id == Some(held[1].server_id))
                {
                    return anyhow::Ok(accepts);
                }
            }
        }
    })
    .await
    .context("no FingerprintAccepted for the follow flavor's server")??;
    assert_eq!(found.len(), 1, "none for the hold flavor: {found:?}");
    let (a, subject) = &found[0];
    assert_eq!(
        *a,
        FingerprintAccepted {
            lineage_id: held[1].lineage_id,
            fingerprint: B,
            device_id: Some(held[1].device_id),
            host: Some(host.clone()),
            server_id: Some(held[1].server_id),
            by_policy: true,
        }
    );
    assert_eq!(
        subject,
        &format!("usbpt.evt.ctl.host-a.server.{}", held[1].server_id),
        "work for the host's agent"
    );
    Ok(())
}
