//! Issue 18: while a lineage flaps, the agent does not re-attach each of its enumerations (the
//! guest is not bounced every time); when the episode clears it re-attaches the present one
//! once. The agent loop in-process with the simulated source, its executor on libvirt's test
//! driver holding the lineage in a running domain, a real nats-server and a real redb file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod libvirt_support;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use usbpt_agent::source::simulated;
use usbpt_agent::{AgentConfig, BusTarget, Filter, FlapSettings, Interface, Progress, UsbDevice};
use usbpt_bus::{Bus, Reader, StartAt};
use usbpt_schemas::{
    AssignedDevice, ControllerModel, DeviceDiscovered, Envelope, Event, FlavorId, FollowPolicy,
    HostName, PortPath, ProductId, ServerId, ServerScheduled, ServerState, UsbAddress,
    UsbDescriptors, VendorId,
};
use usbpt_testkit::TestNats;

const WAIT: Duration = Duration::from_secs(30);

fn key(devnum: u16) -> UsbDevice {
    let port_path: PortPath = "1-4".parse().unwrap();
    let mut desc = UsbDescriptors::new(
        UsbAddress::new(1, devnum).unwrap(),
        port_path,
        VendorId(0x1050),
        ProductId(0x0407),
    );
    desc.serial = Some("FLAPPY".into());
    desc.manufacturer = Some("Yubico".into());
    desc.product = Some("YubiKey".into());
    desc.speed = Some("12".into());
    desc.usb_version = Some("2.00".into());
    UsbDevice::new(
        "/sys/devices/sim/usb1/1-4".into(),
        desc,
        vec![Interface::new(0x0b, 0, 0)],
    )
}

/// The stream from its beginning, read as far as a test needs.
struct Log {
    reader: Reader,
    events: Vec<Envelope>,
}

impl Log {
    async fn until(&mut self, what: &str, done: impl Fn(&[Envelope]) -> bool) -> &[Envelope] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(&self.events) {
            let msg = tokio::time::timeout_at(deadline, self.reader.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{what} not in the stream within {WAIT:?}: {:?}",
                        kinds(&self.events)
                    )
                })
                .unwrap();
            self.events.push(msg.decode().unwrap());
        }
        &self.events
    }

    async fn until_count(&mut self, kind: &str, n: usize) -> &[Envelope] {
        self.until(&format!("{n} × {kind}"), |e| count(e, kind) >= n)
            .await
    }
}

fn fact(e: &Envelope) -> &'static str {
    match e.body.discovery() {
        Some(_) => "DeviceDiscovered",
        None => e.body.kind(),
    }
}
fn kinds(events: &[Envelope]) -> Vec<&'static str> {
    events.iter().map(fact).collect()
}
fn count(events: &[Envelope], kind: &str) -> usize {
    events.iter().filter(|e| fact(e) == kind).count()
}
fn last_discovery(events: &[Envelope]) -> DeviceDiscovered {
    events
        .iter()
        .rev()
        .find_map(|e| e.body.discovery().map(|(d, _)| d.clone()))
        .unwrap()
}
fn position(events: &[Envelope], kind: &str) -> usize {
    events
        .iter()
        .position(|e| fact(e) == kind)
        .unwrap_or_else(|| panic!("no {kind} in {:?}", kinds(events)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_lineage_is_not_reattached_until_its_episode_clears_then_once() {
    let nats = TestNats::start().await.unwrap();
    let bus: Bus = nats.bus().await.unwrap();
    let lv = libvirt_support::host("sim-1", &[]).await;
    let exec = Arc::new(lv.exec);
    let host = HostName::new("sim-1").unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = AgentConfig {
        host: host.clone(),
        boot_id: "boot-1".into(),
        hypervisor_uri: exec.uri().to_owned(),
        data_dir: data.path().to_owned(),
        filter: Filter::default(),
        bus: BusTarget::new(nats.url()),
        progress: Arc::new(|_: &Progress| {}),
        drain_on_stop: Duration::from_secs(2),
        // More than 2 enumerations within 10 minutes; over after 3 quiet seconds.
        flap: FlapSettings {
            threshold: 2,
            window: Duration::from_secs(600),
            quiet: Duration::from_secs(3),
        },
    };
    let (_, sim) = simulated(vec![key(2)]);
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(usbpt_agent::run_with_executor(
        config,
        sim.source(),
        Some(Arc::clone(&exec)),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut log = Log {
        reader: bus.reader(StartAt::Beginning, None).await.unwrap(),
        events: Vec::new(),
    };
    let first = last_discovery(log.until_count("HostAgentStarted", 1).await);

    // A running domain holds the key's lineage (follow: lineage).
    let server = ServerId::new_v7();
    bus.publish(&Envelope::new(Event::ServerScheduled(ServerScheduled {
        server_id: server,
        host: host.clone(),
        flavor_id: FlavorId::new_v7(),
        devices: vec![AssignedDevice {
            request_index: 0,
            device_id: first.device_id,
            lineage_id: first.lineage_id,
            controller: ControllerModel::Xhci,
            follow: FollowPolicy::Lineage,
        }],
    })))
    .await
    .unwrap();
    let events = log
        .until("the domain running", |e| {
            e.iter().any(|e| {
                matches!(&e.body, Event::ServerStateChanged(s) if s.state == ServerState::Active)
            })
        })
        .await;
    assert_eq!(
        count(events, "DeviceAttachFailed"),
        0,
        "{:?}",
        kinds(events)
    );

    // Re-plug 1 (enumeration 2): below the threshold, re-attached as before.
    let replug = |devnum: u16| {
        sim.unplug("/sys/devices/sim/usb1/1-4");
        sim.plug(key(devnum));
    };
    replug(3);
    log.until_count("DeviceReattached", 1).await;
    // Re-plugs 2 to 4: the third enumeration opens an episode; none of them is re-attached.
    for devnum in 4..7 {
        let n = count(&log.events, "DeviceDiscovered");
        replug(devnum);
        log.until_count("DeviceDiscovered", n + 1).await;
    }
    let latest = last_discovery(&log.events);
    assert_eq!(latest.lineage_id, first.lineage_id);
    // Quiet: cleared, then the present enumeration re-attached once.
    let events = log.until_count("DeviceReattached", 2).await.to_vec();
    let raised = position(&events, "PortFlapping");
    let cleared = position(&events, "PortFlappingCleared");
    let reattached: Vec<(usize, &Envelope)> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| fact(e) == "DeviceReattached")
        .collect();
    assert_eq!(count(&events, "PortFlapping"), 1, "{:?}", kinds(&events));
    assert_eq!(count(&events, "PortFlappingCleared"), 1);
    assert!(
        reattached[0].0 < raised && reattached[1].0 > cleared,
        "one re-attach before the episode, one after it, none during: {:?}",
        kinds(&events)
    );
    let Event::DeviceReattached(r) = &reattached[1].1.body else {
        unreachable!()
    };
    assert_eq!(r.lineage_id, first.lineage_id);
    assert_eq!(r.new_device_id, latest.device_id);
    assert_eq!(r.address, UsbAddress::new(1, 6).unwrap());
    assert_eq!(r.server_id, server);

    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
