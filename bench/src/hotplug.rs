//! Hotplug → view: a device plugged or unplugged at the agent's source boundary (the simulated
//! source the demo uses, through the real agent loop: resolver, redb outbox, publisher) →
//! JetStream → the projector (durable pull consumer, fsynced redb batch, ack) → visible in a
//! view snapshot (the query path every API handler reads). One event at a time, timed from the
//! plug to the moment a reader woken by the view sees it.
//!
//! Afterwards, on the same view: the HTTP API's `GET /v1/devices/{id}` over loopback, and the
//! sizes of the JSON documents it serves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::{oneshot, watch};
use usbpt_agent::{progress, AgentConfig, BusTarget, Filter, Interface, UsbDevice};
use usbpt_projector::{DeviceStatus, Projector, ProjectorConfig, Snapshot, View, ViewSync};
use usbpt_schemas::{
    DeviceId, HostName, LineageId, LineageKey, PortPath, ProductId, UsbAddress, UsbDescriptors,
    VendorId,
};

use crate::report::Figure;
use crate::stats::Samples;
use crate::target::Target;

const SLOTS: usize = 16;
const WAIT: Duration = Duration::from_secs(30);
const VENDOR: VendorId = VendorId(0x136b);
const PRODUCT: ProductId = ProductId(0x0003);

fn device(slot: usize, devnum: u16) -> Result<UsbDevice> {
    let port_path: PortPath = format!("1-{}", slot + 1).parse()?;
    let mut desc = UsbDescriptors::new(UsbAddress::new(1, devnum)?, port_path, VENDOR, PRODUCT);
    desc.serial = Some(serial(slot));
    desc.manufacturer = Some("Bench".into());
    desc.product = Some("Licence key".into());
    desc.speed = Some("12".into());
    desc.usb_version = Some("2.00".into());
    Ok(UsbDevice::new(
        format!("/sys/devices/bench/usb1/1-{}", slot + 1),
        desc,
        vec![Interface::new(0x0b, 0, 0)],
    ))
}

fn serial(slot: usize) -> String {
    format!("BENCH-{slot:02}")
}

fn lineage(slot: usize) -> LineageId {
    LineageId::derive(&LineageKey::Serial {
        vendor: VENDOR,
        product: PRODUCT,
        serial: &serial(slot),
    })
}

/// Waits until `check` finds what it looks for in a fresh snapshot, re-checking each time the
/// view commits a batch.
async fn wait_view<T>(
    view: &View,
    applied: &mut watch::Receiver<u64>,
    what: &str,
    mut check: impl FnMut(&Snapshot) -> Result<Option<T>>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        applied.borrow_and_update();
        if let Some(found) = check(&view.snapshot()?)? {
            return Ok(found);
        }
        tokio::time::timeout_at(deadline, applied.changed())
            .await
            .with_context(|| format!("{what}: not visible in the view within {WAIT:?}"))?
            .context("the view was dropped")?;
    }
}

/// What [`hotplug_to_view`] measured.
#[derive(Debug)]
pub struct Hotplug {
    pub figures: Vec<Figure>,
}

/// The view's durability bound of the "lazy" hotplug figure (ADR 0015).
pub const LAZY_VIEW_SYNC: Duration = Duration::from_millis(100);

/// `events` plug/unplug events, one at a time, through agent → JetStream → projector → view,
/// the view committed as `view_sync` says. With `api`, also times `GET /v1/devices/{id}` on the
/// resulting view.
pub async fn hotplug_to_view(
    target: &Target,
    events: usize,
    api: bool,
    view_sync: ViewSync,
) -> Result<Hotplug> {
    let bus = target.fresh_bus().await?;
    let dir = tempfile::Builder::new().prefix("usbpt-bench-").tempdir()?;
    let view = Arc::new(View::open_for(dir.path().join("view.redb"), view_sync)?);
    let projector = Projector::new(
        bus.clone(),
        Arc::clone(&view),
        ProjectorConfig {
            consumer: "bench-hotplug".into(),
            view_sync,
            ..ProjectorConfig::default()
        },
    );
    let (stop_projector, projector_stopped) = oneshot::channel::<()>();
    let projecting = tokio::spawn(projector.run(async move {
        let _ = projector_stopped.await;
    }));

    let host = HostName::new("bench-host")?;
    let (source, sim) = usbpt_agent::source::simulated(Vec::new());
    let config = AgentConfig {
        host: host.clone(),
        boot_id: "bench-boot".into(),
        hypervisor_uri: "test:///default".into(),
        data_dir: dir.path().join("agent"),
        filter: Filter::default(),
        bus: BusTarget::new(target.url()),
        progress: progress::silent(),
        drain_on_stop: Duration::from_secs(2),
        // Every slot is re-plugged many times a second: flapping by design, not measured here.
        flap: usbpt_agent::FlapSettings {
            threshold: 0,
            ..usbpt_agent::FlapSettings::default()
        },
    };
    let (stop_agent, agent_stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(usbpt_agent::run(config, source, async move {
        let _ = agent_stopped.await;
    }));

    let mut applied = view.applied();
    wait_view(&view, &mut applied, "the agent's start", |s| {
        Ok(s.host(&host)?.map(|_| ()))
    })
    .await?;

    // Warm-up (not measured): every slot plugged, so the host holds 16 devices throughout.
    let mut devnum = 1u16;
    let mut next_devnum = || {
        devnum = devnum % 126 + 2;
        devnum
    };
    let mut current: Vec<DeviceId> = Vec::with_capacity(SLOTS);
    for slot in 0..SLOTS {
        sim.plug(device(slot, next_devnum())?);
        let l = lineage(slot);
        let id = wait_view(&view, &mut applied, "a warm-up plug", |s| {
            Ok(s.current_enumeration(&l)?.map(|d| d.id()))
        })
        .await?;
        current.push(id);
    }

    // Measured: unplug a slot, then plug it again with a new address; each is one event.
    let mut lat = Samples::with_capacity(events);
    let started = Instant::now();
    for i in 0..events {
        let slot = (i / 2) % SLOTS;
        let l = lineage(slot);
        let old = current[slot];
        if i % 2 == 0 {
            let t = Instant::now();
            sim.unplug(&device(slot, 2)?.syspath);
            wait_view(&view, &mut applied, "an unplug", |s| {
                Ok(s.device(&old)?
                    .filter(|d| d.status == DeviceStatus::Invalidated)
                    .map(|_| ()))
            })
            .await?;
            lat.push(t.elapsed());
        } else {
            let d = device(slot, next_devnum())?;
            let t = Instant::now();
            sim.plug(d);
            let id = wait_view(&view, &mut applied, "a plug", |s| {
                Ok(s.current_enumeration(&l)?
                    .filter(|d| d.id() != old && d.status != DeviceStatus::Invalidated)
                    .map(|d| d.id()))
            })
            .await?;
            current[slot] = id;
            lat.push(t.elapsed());
        }
    }
    let elapsed = started.elapsed();
    let stored = bus.last_sequence().await?;
    let expected = (1 + SLOTS + events) as u64;
    if stored != expected {
        bail!("the stream holds {stored} events, expected {expected} (1 start, {SLOTS} warm-up, {events} measured)");
    }
    let (p50, p99, max) = lat.summary();
    let (key, name) = match view_sync {
        ViewSync::EachCommit => (
            "hotplug_to_view".to_owned(),
            "hotplug → view: agent → JetStream → projector → snapshot".to_owned(),
        ),
        ViewSync::Within(d) => (
            format!("hotplug_to_view.view_sync_{}ms", d.as_millis()),
            format!("hotplug → view [view durable within {} ms]", d.as_millis()),
        ),
    };
    let mut figures = vec![Figure::new(key, name, events as u64)
        .rate(events as f64 / elapsed.as_secs_f64())
        .latency((p50, p99, max))
        .floor("p99 ≤ 2 ms (calm run)", p99 <= 2_000.0)
        .note(format!(
        "one event at a time (rate = 1 / latency); {stored} events stored, none lost or doubled{}",
        match view_sync {
            ViewSync::EachCommit => String::new(),
            ViewSync::Within(_) =>
                "; the view's fsync is off the path (--view-sync-ms, ADR 0015), the agent's stays"
                    .to_owned(),
        }
    ))];

    if api {
        figures.extend(api_figures(&view, &current, events.clamp(100, 2000)).await?);
    }

    let _ = stop_agent.send(());
    agent.await.context("agent task")??;
    let _ = stop_projector.send(());
    projecting.await.context("projector task")??;
    Ok(Hotplug { figures })
}

/// `GET /v1/devices/{id}` over loopback `n` times, the same lookup in-process, and the sizes
/// of the device documents the API serves.
async fn api_figures(view: &Arc<View>, ids: &[DeviceId], n: usize) -> Result<Vec<Figure>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let router = usbpt_api::router(usbpt_api::ApiState::new(Arc::clone(view)));
    let (stop, stopped) = oneshot::channel::<()>();
    // The bench's own in-process API on 127.0.0.1, read by the bench alone: no token.
    let serving = tokio::spawn(usbpt_api::serve(
        listener,
        router,
        usbpt_api::HttpPolicy::without_token(),
        async move {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    let mut http = Samples::with_capacity(n);
    let mut doc_size = 0usize;
    let started = Instant::now();
    for i in 0..n {
        let id = ids[i % ids.len()];
        let t = Instant::now();
        let resp = client
            .get(format!("http://{addr}/v1/devices/{id}"))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("GET /v1/devices/{id}: {}", resp.status());
        }
        let body = resp.bytes().await?;
        http.push(t.elapsed());
        doc_size = body.len();
    }
    let http_rate = n as f64 / started.elapsed().as_secs_f64();

    let mut local = Samples::with_capacity(n);
    let mut nova_size = 0usize;
    let started = Instant::now();
    for i in 0..n {
        let id = ids[i % ids.len()];
        let t = Instant::now();
        let d = view.snapshot()?.device(&id)?;
        local.push(t.elapsed());
        if let Some(d) = d {
            nova_size = serde_json::to_vec(&usbpt_api::docs::nova_device(&d))?.len();
        }
    }
    let local_rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(());
    serving.await.context("api task")??;
    Ok(vec![
        Figure::new(
            "view_device_lookup",
            "query: snapshot + device lookup, in-process",
            n as u64,
        )
        .rate(local_rate)
        .latency(local.summary())
        .note("redb read transaction, get, postcard decode"),
        Figure::new(
            "api_get_device",
            "query: HTTP GET /v1/devices/{id}, loopback",
            n as u64,
        )
        .rate(http_rate)
        .latency(http.summary())
        .note("one request at a time, keep-alive"),
        Figure::new(
            "size_api_device_json",
            "size: GET /v1/devices/{id} JSON document",
            1,
        )
        .value(doc_size as f64, "B"),
        Figure::new(
            "size_nova_device_json",
            "size: one Nova usb_device_stats entry (JSON)",
            1,
        )
        .value(nova_size as f64, "B"),
    ])
}
