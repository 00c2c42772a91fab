//! A cold migration end to end: `usbpt serve` on a real nats-server, two hosts whose agents run
//! the real agent loop (simulated device source, redb outbox) and the real libvirt executor on
//! libvirt's test driver. A serial-identified key is moved from host-a to host-b (plugged into
//! host-b before host-a reports it unplugged: the same serial lineage, held back as a lineage
//! conflict until host-a's report, then promoted), `usbpt migrate erp` is accepted, and
//! then libvirt on both hosts, the view (`server show`, the API document) and a replay agree:
//! the domain is gone from host-a and defined and running on host-b with a `<hostdev>` at the
//! key's address there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;
mod projector_support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agent_support::StreamLog;
use anyhow::{bail, Context, Result};
use projector_support::Serve;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use usbpt_agent::source::{simulated, simulated_device, SimulatedHost};
use usbpt_agent::{progress, AgentConfig, BusTarget, Filter, UsbDevice};
use usbpt_libvirt::inspect::observe_domain;
use usbpt_libvirt::{test_driver_uri, Executor, ExecutorConfig, XmlValidator};
use usbpt_schemas::{DeviceId, Envelope, Event, HostName, ServerId, ServerState};
use usbpt_testkit::TestNats;

const NODE_XML: &str = "<node>\n  <cpu><mhz>2400</mhz><model>x86_64</model></cpu>\n  <memory>8388608</memory>\n</node>\n";
const KEY: (u16, u16) = (0x1050, 0x0407);
const SERIAL: &str = "YK-0042";

/// A hypervisor host: a simulated device source feeding the real agent loop, and the real
/// executor on its own test-driver node (kept here, so the test reads libvirt on this host).
struct Host {
    name: HostName,
    devices: SimulatedHost,
    executor: Arc<Executor>,
    agent: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Host {
    async fn start(name: &str, root: &Path, url: &str, devices: Vec<UsbDevice>) -> Result<Self> {
        let name = HostName::new(name)?;
        let data = root.join(name.as_str());
        std::fs::create_dir_all(&data)?;
        let node = data.join("libvirt-node.xml");
        std::fs::write(&node, NODE_XML)?;
        let mut config = ExecutorConfig::new(name.clone(), test_driver_uri(&node)?);
        config.validator = Some(Arc::new(XmlValidator::new()));
        let executor = Arc::new(Executor::connect(config).await?);
        let (source, handle) = simulated(devices);
        let agent_config = AgentConfig {
            host: name.clone(),
            boot_id: format!("boot-{name}"),
            hypervisor_uri: executor.uri().to_owned(),
            data_dir: data,
            filter: Filter::default(),
            bus: BusTarget::new(url),
            progress: progress::silent(),
            drain_on_stop: Duration::from_secs(2),
            flap: usbpt_agent::FlapSettings::default(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let exec = Some(Arc::clone(&executor));
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) =
                usbpt_agent::run_with_executor(agent_config, source, exec, shutdown).await
            {
                panic!("agent failed: {e}");
            }
        });
        Ok(Self {
            name,
            devices: handle,
            executor,
            agent: Some((stop, task)),
        })
    }

    async fn stop(&mut self) -> Result<()> {
        if let Some((stop, task)) = self.agent.take() {
            let _ = stop.send(());
            task.await?;
        }
        Ok(())
    }
}

fn key_at(port: &str, devnum: u16) -> Result<UsbDevice> {
    let names = ("Yubico", "Security Key");
    Ok(simulated_device(port, devnum, KEY, Some(SERIAL), 3, names)?)
}

/// The stream sequence of the first event (read so far) that `pick` accepts.
fn seq_of(log: &StreamLog, pick: impl Fn(&Envelope) -> bool) -> Option<u64> {
    log.events
        .iter()
        .find(|(_, _, e)| pick(e))
        .map(|(seq, _, _)| *seq)
}

fn discovered_on(e: &Envelope, host: &HostName) -> Option<DeviceId> {
    match e.body.discovery() {
        Some((d, _)) if d.host == *host && d.descriptors.serial.as_deref() == Some(SERIAL) => {
            Some(d.device_id)
        }
        _ => None,
    }
}

fn reported(e: &Envelope, server: ServerId, host: &HostName, state: ServerState) -> bool {
    matches!(&e.body, Event::ServerStateChanged(s)
        if s.server_id == server && s.reported_by_agent && s.host.as_ref() == Some(host) && s.state == state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_migration_defines_the_domain_where_the_device_went_and_tears_it_down_where_it_was(
) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), scenario())
        .await
        .context("the cold migration scenario did not finish")?
}

async fn scenario() -> Result<()> {
    let nats = TestNats::start().await?;
    let bus = nats.bus().await?;
    let dir = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), &dir.path().join("control")).await?;
    let mut log = StreamLog::open(&bus).await?;

    // The key (serial lineage) on host-a at bus 1 device 5; host-b has nothing plugged in.
    let on_a = key_at("1-2", 5)?;
    let mut a = Host::start("host-a", dir.path(), &nats.url(), vec![on_a.clone()]).await?;
    let mut b = Host::start("host-b", dir.path(), &nats.url(), vec![]).await?;
    let (ha, hb) = (a.name.clone(), b.name.clone());
    log.until("both agents and the key on host-a", |es| {
        agent_support::count(es, "HostAgentStarted") == 2
            && es.iter().any(|e| discovered_on(e, &ha).is_some())
    })
    .await?;

    serve.commands_ready().await?;
    let ok = |what: &str, (ok, out, err): (bool, String, String)| -> Result<String> {
        if !ok {
            bail!("usbpt {what} failed: {err}");
        }
        Ok(out)
    };
    ok(
        "flavor create",
        serve
            .cli(&[
                "flavor",
                "create",
                "erp-key",
                "--usb",
                "vendor=1050,product=0407,controller=xhci",
            ])
            .await?,
    )?;
    // The command handler decides on the view: it must have the key before the boot.
    serve.wait_applied(bus.last_sequence().await?).await?;
    ok(
        "boot",
        serve.cli(&["boot", "erp", "--flavor", "erp-key"]).await?,
    )?;
    let server: ServerId = {
        let mut found = None;
        log.until("erp scheduled on host-a", |es| {
            es.iter()
                .any(|e| matches!(&e.body, Event::ServerScheduled(s) if s.host == ha))
        })
        .await?;
        for (_, _, e) in &log.events {
            if let Event::ServerScheduled(s) = &e.body {
                found = Some(s.server_id);
            }
        }
        found.context("scheduled")?
    };
    log.until("erp active on host-a", |es| {
        es.iter()
            .any(|e| reported(e, server, &ha, ServerState::Active))
    })
    .await?;
    assert_eq!(a.executor.servers().await?, vec![server]);
    assert!(b.executor.servers().await?.is_empty());

    // Move the key, in the order that used to lose it: plugged into host-b (bus 3 device 9)
    // *before* host-a reports it gone (the two agents' events race; a person with two keys, or
    // host-a's agent cut off, gives the same order). The fold holds host-b's enumeration back
    // as a lineage conflict and promotes it when host-a's invalidation arrives (ADR 0011).
    let first = log
        .envelopes()
        .iter()
        .find_map(|e| discovered_on(e, &ha))
        .context("first key")?;
    b.devices.plug(key_at("3-1", 9)?);
    log.until("the key discovered on host-b", |es| {
        es.iter().any(|e| discovered_on(e, &hb).is_some())
    })
    .await?;
    a.devices.unplug(&on_a.syspath);
    log.until("the key invalidated on host-a", |es| {
        es.iter()
            .any(|e| matches!(&e.body, Event::DeviceInvalidated(i) if i.device_id == first))
    })
    .await?;
    let moved = log
        .envelopes()
        .iter()
        .find_map(|e| discovered_on(e, &hb))
        .context("moved key")?;
    serve.wait_applied(bus.last_sequence().await?).await?;

    let out = ok("migrate", serve.cli(&["migrate", "erp"]).await?)?;
    assert!(
        out.contains("server erp migrated from host-a to host-b"),
        "{out}"
    );

    // Both agents' outcomes: host-b defines and starts the domain with the key attached, host-a
    // tears its domain down (in either order).
    let outcome = log
        .until("erp active on host-b and torn down on host-a", |es| {
            es.iter()
                .any(|e| reported(e, server, &hb, ServerState::Active))
                && es
                    .iter()
                    .any(|e| reported(e, server, &ha, ServerState::Shutoff))
                && es.iter().any(|e| {
                    matches!(&e.body, Event::DeviceAttached(d)
                    if d.server_id == server && d.device_id == moved && d.host == hb)
                })
        })
        .await;
    if let Err(e) = outcome {
        for (seq, subject, env) in &log.events {
            eprintln!("{seq} {subject} {:?}", env.body);
        }
        return Err(e);
    }
    let active_b = seq_of(&log, |e| reported(e, server, &hb, ServerState::Active)).unwrap();
    let shutoff_a = seq_of(&log, |e| reported(e, server, &ha, ServerState::Shutoff)).unwrap();
    let detail = log
        .events
        .iter()
        .find_map(|(seq, _, e)| match &e.body {
            Event::ServerStateChanged(c) if *seq == active_b => Some(c.detail.clone()),
            _ => None,
        })
        .context("host-b's report")?;
    assert!(
        detail.starts_with("cold migration from host host-a: "),
        "{detail}"
    );

    // libvirt on host-a: the domain is gone.
    assert!(a.executor.servers().await?.is_empty());
    assert!(a.executor.observe(server).await.is_err());
    // libvirt on host-b: defined (persistent), running, one <hostdev> at the key's address there.
    assert_eq!(b.executor.servers().await?, vec![server]);
    let observed = b.executor.observe(server).await?;
    assert_eq!(
        (observed.state, observed.libvirt.as_str()),
        (ServerState::Active, "running")
    );
    for inactive in [true, false] {
        let xml = b.executor.domain_xml(server, inactive).await?;
        let dom = observe_domain(&xml)?;
        assert_eq!(dom.hostdevs.len(), 1, "{xml}");
        let hd = &dom.hostdevs[0];
        assert_eq!(
            (hd.vendor, hd.product, hd.host_bus, hd.host_device),
            (Some(KEY.0), Some(KEY.1), Some(3), Some(9)),
            "{xml}"
        );
    }
    assert_eq!(b.executor.spec(server).await?.devices[0].device_id, moved);

    // The view: the API document and `server show` agree with libvirt.
    serve
        .wait_applied(active_b.max(shutoff_a).max(bus.last_sequence().await?))
        .await?;
    let (status, doc) = serve.get("/v2.1/servers/erp").await?;
    assert_eq!(status, 200, "{doc}");
    let s = &doc["server"];
    assert_eq!(s["host"], "host-b", "{s}");
    assert_eq!(s["state"], "ACTIVE", "{s}");
    assert_eq!(s["status"], "ACTIVE", "{s}");
    let usb = s["usb_devices"].as_array().context("usb_devices")?;
    assert_eq!(usb.len(), 1, "{s}");
    assert_eq!(usb[0]["device_id"], moved.to_string());
    assert_eq!(usb[0]["host"], "host-b");
    assert_eq!(usb[0]["address"], "usb_3_9");
    assert_eq!(usb[0]["status"], "attached");
    assert_eq!(usb[0]["held"], true);
    let mv = s["moves"].as_array().context("moves")?;
    assert_eq!(
        (&mv[0]["from_host"], &mv[0]["host"], &mv[0]["migration"]),
        (
            &Value::from("host-a"),
            &Value::from("host-b"),
            &Value::Bool(true)
        )
    );
    let shown = serve.cli_json(&["server", "show", "erp", "--json"]).await?;
    assert_eq!(shown, doc);

    // A replay of the whole stream gives the same view.
    let (ok_verify, text, err) = serve.cli(&["replay", "--verify"]).await?;
    assert!(ok_verify, "{err}");
    assert!(text.starts_with("verified: the live view"), "{text}");
    let replayed = serve.cli_json(&["replay", "--json"]).await?;
    let (_, detail) = serve.get("/v2.1/servers/detail").await?;
    assert_eq!(replayed["servers"], detail["servers"]);

    a.stop().await?;
    b.stop().await?;
    Ok(())
}
