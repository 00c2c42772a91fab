//! nats-server SIGKILLed (twice) and restarted during a burst of hotplugs, with the agent loop
//! (simulated source, real redb outbox) and a projector running throughout: every event is in
//! the stream exactly once and in order, the view shows what is plugged in, and the view equals
//! a clean replay. Real nats-server, real redb files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;
mod faults_support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use agent_support::{check_history, count, discovered, live, StreamLog};
use anyhow::{anyhow, Result};
use faults_support::LiveProjector;
use tokio::sync::{mpsc, oneshot};
use usbpt_agent::source::simulated;
use usbpt_agent::{AgentConfig, BusTarget, Filter, Interface, Progress, UsbDevice};
use usbpt_schemas::{HostName, PortPath, ProductId, UsbAddress, UsbDescriptors, VendorId};
use usbpt_testkit::TestNats;

const WAIT: Duration = Duration::from_secs(60);
const PAIRS: usize = 60;

fn device(port: &str, devnum: u16, serial: &str) -> UsbDevice {
    let port_path: PortPath = port.parse().unwrap();
    let syspath = format!("/sys/devices/sim/usb{}/{port}", port_path.bus());
    let mut desc = UsbDescriptors::new(
        UsbAddress::new(port_path.bus(), devnum).unwrap(),
        port_path,
        VendorId(0x0781),
        ProductId(0x5567),
    );
    desc.serial = Some(serial.into());
    desc.manufacturer = Some("SanDisk".into());
    desc.product = Some("Cruzer Blade".into());
    desc.speed = Some("480".into());
    desc.usb_version = Some("2.00".into());
    UsbDevice::new(syspath, desc, vec![Interface::new(0x08, 0x06, 0x50)])
}

async fn next_progress(
    rx: &mut mpsc::UnboundedReceiver<Progress>,
    what: &str,
    check: impl Fn(&Progress) -> bool,
) -> Result<Progress> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let p = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| anyhow!("no {what} progress within {WAIT:?}"))?
            .ok_or_else(|| anyhow!("the agent stopped before {what}"))?;
        if check(&p) {
            return Ok(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_twice_during_a_hotplug_burst_loses_and_doubles_nothing_and_the_view_equals_a_replay(
) -> Result<()> {
    let mut nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let projector = LiveProjector::start(&nats.url()).await?;

    let host = HostName::new("host-f")?;
    let keys = vec![
        device("1-1", 2, "KEEP-1"),
        device("1-2", 3, "KEEP-2"),
        device("1-3", 4, "KEEP-3"),
    ];
    let (source, sim) = simulated(keys);
    let (tx, mut progress) = mpsc::unbounded_channel();
    let dir = tempfile::tempdir()?;
    let config = AgentConfig {
        host: host.clone(),
        boot_id: "boot-1".into(),
        hypervisor_uri: "test:///default".into(),
        data_dir: dir.path().to_owned(),
        filter: Filter::default(),
        bus: BusTarget::new(nats.url()),
        progress: Arc::new(move |p: &Progress| {
            let _ = tx.send(p.clone());
        }),
        drain_on_stop: Duration::from_secs(2),
        flap: usbpt_agent::FlapSettings::default(),
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(usbpt_agent::run(config, source, async move {
        let _ = stopped.await;
    }));
    next_progress(&mut progress, "drained", |p| {
        matches!(p, Progress::Drained { .. })
    })
    .await?;

    // A burst of sticks plugged in and pulled out, one pair after the other; each observation
    // is in the outbox (queued) before the next. The server dies twice in the middle.
    for i in 0..PAIRS {
        match i {
            15 | 40 => nats.kill().await,
            25 | 50 => nats.restart().await?,
            _ => {}
        }
        let stick = device(
            &format!("2-{}", 1 + i % 5),
            2 + (i % 120) as u16,
            &format!("STICK-{i:03}"),
        );
        sim.plug(stick.clone());
        next_progress(&mut progress, "queued (plug)", |p| {
            matches!(p, Progress::Queued { .. })
        })
        .await?;
        sim.unplug(&stick.syspath);
        next_progress(&mut progress, "queued (unplug)", |p| {
            matches!(p, Progress::Queued { .. })
        })
        .await?;
    }

    // Everything arrives: the start, 3 keys, and a discovery and an invalidation per stick.
    let total = 1 + 3 + 2 * PAIRS;
    let mut log = StreamLog::open(&bus).await?;
    log.until(&format!("{total} events"), |e| e.len() >= total)
        .await?;
    assert_eq!(
        bus.last_sequence().await?,
        total as u64,
        "nothing more is stored: no event twice"
    );
    let events = log.envelopes();
    check_history(&events)?;
    assert_eq!(count(&events, "DeviceDiscovered"), 3 + PAIRS);
    assert_eq!(count(&events, "DeviceInvalidated"), PAIRS);
    // In the order they happened.
    let serials: Vec<String> = discovered(&events[4..])
        .iter()
        .map(|d| d.descriptors.serial.clone().unwrap_or_default())
        .collect();
    let expected: Vec<String> = (0..PAIRS).map(|i| format!("STICK-{i:03}")).collect();
    assert_eq!(serials, expected);

    // What the stream says is plugged in, what the view says, and what is plugged in agree.
    let present: BTreeSet<_> = sim
        .present()
        .into_iter()
        .map(|d| {
            (
                d.syspath,
                d.descriptors.address.bus(),
                d.descriptors.address.devnum(),
                d.descriptors.serial,
            )
        })
        .collect();
    assert_eq!(present.len(), 3);
    let in_stream: BTreeSet<_> = live(&events)
        .into_values()
        .map(|d| {
            (
                d.syspath,
                d.descriptors.address.bus(),
                d.descriptors.address.devnum(),
                d.descriptors.serial,
            )
        })
        .collect();
    assert_eq!(in_stream, present);
    projector.caught_up(&bus).await?;
    assert_eq!(projector.present(&host)?, present);
    projector.assert_equals_replay(&bus).await?;

    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent).await???;
    projector.stop().await?;
    Ok(())
}
