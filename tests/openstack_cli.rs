//! The real OpenStack clients against usbpt: python-openstackclient and python-novaclient, pinned
//! and hash-pinned in `.tools/osc-venv` by `scripts/setup`, drive `usbpt serve` (real
//! nats-server, real redb) with two hosts whose agents run the real agent loop over simulated
//! USB devices and the real libvirt executor on libvirt's test driver (as `usbpt demo` does).
//! Each `openstack` command's exit code and `-f json` output is checked; see
//! `docs/openstack.md` for the routes and microversions this exercises.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod projector_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use projector_support::Serve;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use usbpt_agent::source::{simulated, simulated_device, SimulatedHost};
use usbpt_agent::{progress, AgentConfig, BusTarget, Filter, UsbDevice};
use usbpt_libvirt::{test_driver_uri, Executor, ExecutorConfig};
use usbpt_schemas::HostName;
use usbpt_testkit::{eventually, TestNats};

/// libvirt's test driver needs a node description.
const NODE_XML: &str = "<node>\n  <cpu><mhz>2400</mhz><model>x86_64</model></cpu>\n  <memory>8388608</memory>\n</node>\n";

/// How long one `openstack` call may take (start-up is 1-2 s).
const CALL_LIMIT: Duration = Duration::from_secs(60);

fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/osc-venv/bin")
}

/// Fails (never skips) when the pinned clients are not installed.
fn require_clients() -> PathBuf {
    let bin = venv();
    assert!(
        bin.join("openstack").is_file() && bin.join("python").is_file(),
        "the pinned OpenStack clients are not installed at {}: run scripts/setup",
        bin.display()
    );
    bin
}

/// A simulated hypervisor host: simulated devices feeding the real agent loop, the real executor
/// on libvirt's test driver.
struct SimHost {
    _devices: SimulatedHost,
    executor: Arc<Executor>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimHost {
    async fn start(name: &str, root: &Path, url: &str, devices: Vec<UsbDevice>) -> Result<Self> {
        let host = HostName::new(name)?;
        let data = root.join(name);
        std::fs::create_dir_all(&data)?;
        let node = data.join("libvirt-node.xml");
        std::fs::write(&node, NODE_XML)?;
        let executor = Arc::new(
            Executor::connect(ExecutorConfig::new(host.clone(), test_driver_uri(&node)?))
                .await
                .with_context(|| format!("libvirt test driver for {name}"))?,
        );
        let (source, handle) = simulated(devices);
        let config = AgentConfig {
            host,
            boot_id: format!("boot-{name}"),
            hypervisor_uri: executor.uri().to_owned(),
            data_dir: data,
            filter: Filter::default(),
            bus: BusTarget::new(url.to_owned()),
            progress: progress::silent(),
            drain_on_stop: Duration::from_secs(2),
            flap: usbpt_agent::FlapSettings::default(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let kept = Arc::clone(&executor);
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) =
                usbpt_agent::run_with_executor(config, source, Some(executor), shutdown).await
            {
                eprintln!("simulated agent failed: {e}");
            }
        });
        Ok(Self {
            _devices: handle,
            executor: kept,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The agent loop dropped mid-run, as a crash: no last beat.
    fn crash(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

fn usb_device(
    port: &str,
    devnum: u16,
    ids: (u16, u16),
    serial: &str,
    names: (&str, &str),
) -> Result<UsbDevice> {
    Ok(simulated_device(port, devnum, ids, Some(serial), 3, names)?)
}

/// One finished client run.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr)
        })
    }
    fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "exit {}:\n{}\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

struct Clients {
    bin: PathBuf,
    config: PathBuf,
    calls: usize,
    spent: Duration,
}

impl Clients {
    fn new(bin: PathBuf, dir: &Path, api: &str) -> Result<Self> {
        let config = dir.join("clouds.yaml");
        std::fs::write(
            &config,
            format!(
                "clouds:\n  usbpt:\n    auth_type: admin_token\n    auth:\n      endpoint: {api}/v2.1\n      \
                 token: {token}\n    \
                 compute_endpoint_override: {api}/v2.1\n    identity_endpoint_override: \
                 {api}/identity/v3\n",
                token = projector_support::API_TOKEN
            ),
        )?;
        Ok(Self {
            bin,
            config,
            calls: 0,
            spent: Duration::ZERO,
        })
    }

    async fn run(&mut self, program: &str, args: &[&str]) -> Result<Run> {
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(self.bin.join(program));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OS_") {
                cmd.env_remove(k);
            }
        }
        let out = tokio::time::timeout(
            CALL_LIMIT,
            cmd.args(args)
                .env("OS_CLIENT_CONFIG_FILE", &self.config)
                .env("OS_CLOUD", "usbpt")
                // The token for novaclient (an environment variable, not an argument `ps` shows).
                .env("USBPT_API_TOKEN", projector_support::API_TOKEN)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("{program} {args:?} took over {CALL_LIMIT:?}"))??;
        self.calls += 1;
        self.spent += started.elapsed();
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!(
            "$ {program} {} -> {} ({:.1} s)",
            args.join(" "),
            run.code,
            started.elapsed().as_secs_f64()
        );
        Ok(run)
    }

    async fn openstack(&mut self, args: &[&str]) -> Result<Run> {
        self.run("openstack", args).await
    }
}

/// Waits until `GET /v2.1/os-services?host={host}` shows the service `state`.
async fn service_becomes(serve: &Serve, host: &str, state: &str) -> Result<()> {
    let path = format!("/v2.1/os-services?host={host}");
    eventually(Duration::from_secs(30), || {
        let path = path.clone();
        async move {
            let (_, doc) = serve.get(&path).await.ok()?;
            (doc["services"][0]["state"] == state).then_some(())
        }
    })
    .await
    .with_context(|| format!("{host} never became {state}"))
}

/// Waits until `GET /v2.1/servers/{name}` shows `status`.
async fn status_becomes(serve: &Serve, name: &str, status: &str) -> Result<Value> {
    let path = format!("/v2.1/servers/{name}");
    eventually(Duration::from_secs(30), || {
        let path = path.clone();
        async move {
            let (code, doc) = serve.get(&path).await.ok()?;
            (code == 200 && doc["server"]["status"] == status).then_some(doc)
        }
    })
    .await
    .with_context(|| format!("server {name} never became {status}"))
}

fn string_set(v: &Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e[key].as_str().unwrap_or_default().to_owned())
        .collect();
    out.sort();
    out
}

const NOVACLIENT: &str = r#"
import json, os, sys
from keystoneauth1 import session
from keystoneauth1.token_endpoint import Token
from novaclient import client

api, token = sys.argv[1], os.environ["USBPT_API_TOKEN"]
nova = client.Client("2.88", session=session.Session(auth=Token(api + "/v2.1", token)),
                     endpoint_override=api + "/v2.1")
hv = nova.hypervisors.get("host-b")
flavor = nova.flavors.find(name="erp-key")
server = nova.servers.create("nova-1", image=None, flavor=flavor.id, nics="none",
                             block_device_mapping_v2=[{"boot_index": 0, "source_type": "blank",
                                                       "destination_type": "local",
                                                       "volume_size": 1}])
rebuilt = nova.servers.rebuild(nova.servers.find(name="erp-1"), None)
print(json.dumps({
    "rebuilt": {"id": rebuilt.id, "name": rebuilt.name},
    "hypervisor_hostname": hv.hypervisor_hostname,
    "usb_device_stats": hv.usb_device_stats,
    "server_id": server.id,
    "server_links": server.links,
    "flavor_extra_specs": flavor.get_keys(),
}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstack_cli_and_novaclient_drive_usbpt() -> Result<()> {
    let bin = require_clients();
    let total = Instant::now();
    let nats = TestNats::start().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let hosts_dir = tempfile::tempdir()?;
    let host_a = SimHost::start(
        "host-a",
        hosts_dir.path(),
        &nats.url(),
        vec![usb_device(
            "1-3",
            4,
            (0x1050, 0x0407),
            "YK-1",
            ("Yubico", "Key"),
        )?],
    )
    .await?;
    let host_b = SimHost::start(
        "host-b",
        hosts_dir.path(),
        &nats.url(),
        vec![
            usb_device("2-1.4", 3, (0x136b, 0x0003), "ERP-1", ("Acme", "ERP key"))?,
            usb_device("2-1.5", 5, (0x136b, 0x0003), "ERP-2", ("Acme", "ERP key"))?,
        ],
    )
    .await?;
    // Both agents have published their devices.
    eventually(Duration::from_secs(30), || async {
        let (_, doc) = serve.get("/v1/devices").await.ok()?;
        (doc["devices"].as_array()?.len() == 3).then_some(())
    })
    .await
    .context("the agents' devices never reached the view")?;

    // Each agent's first heartbeat arrives on its own connection, about when its devices do.
    service_becomes(&serve, "host-a", "up").await?;
    service_becomes(&serve, "host-b", "up").await?;
    let mut os = Clients::new(bin, data.path(), &serve.api)?;

    // Hypervisors: both hosts, UUID ids (2.53+), up.
    let list = os
        .openstack(&["hypervisor", "list", "-f", "json"])
        .await?
        .ok()
        .json();
    assert_eq!(
        string_set(&list, "Hypervisor Hostname"),
        ["host-a", "host-b"]
    );
    for h in list.as_array().unwrap() {
        assert_eq!(h["State"], "up", "{h}");
        assert!(
            h["ID"].as_str().unwrap().parse::<uuid::Uuid>().is_ok(),
            "{h}"
        );
    }
    let hv = os
        .openstack(&["hypervisor", "show", "host-b", "-f", "json"])
        .await?
        .ok()
        .json();
    assert_eq!(hv["hypervisor_hostname"], "host-b", "{hv}");
    assert_eq!(hv["state"], "up", "{hv}");
    assert_eq!(hv["service_host"], "host-b", "{hv}");

    // A USB flavor through the standard extra-spec route, and a refused one.
    let spec = r#"[{"vendor_id":"136b","product_id":"0003","count":1}]"#;
    let flavor = os
        .openstack(&[
            "flavor",
            "create",
            "--property",
            &format!("usb_devices={spec}"),
            "erp-key",
            "-f",
            "json",
        ])
        .await?
        .ok()
        .json();
    let usb = flavor["properties"]["usb_devices"]
        .as_str()
        .unwrap_or_default();
    assert!(
        usb.contains("\"136b\"") && usb.contains("\"count\":1"),
        "{flavor}"
    );
    let shown = os
        .openstack(&["flavor", "show", "erp-key", "-f", "json"])
        .await?
        .ok()
        .json();
    assert_eq!(shown["id"], flavor["id"]);
    assert_eq!(shown["properties"], flavor["properties"]);
    let bad = os
        .openstack(&[
            "flavor",
            "create",
            "--property",
            r#"usb_devices=[{"vendor_id":"zz"}]"#,
            "bad-key",
        ])
        .await?;
    // `flavor create` only logs a failed extra spec (python-openstackclient's behaviour): the
    // flavor exists without a USB request. `flavor set` exits non-zero.
    assert_eq!(bad.code, 0, "{bad:?}");
    assert!(
        bad.stderr.contains("extra_specs.usb_devices") && bad.stderr.contains("vendor id"),
        "{bad:?}"
    );
    let set = os
        .openstack(&[
            "flavor",
            "set",
            "--property",
            r#"usb_devices=[{"id":"x"}]"#,
            "bad-key",
        ])
        .await?;
    assert_ne!(set.code, 0, "{set:?}");
    assert!(set.stderr.contains("extra_specs.usb_devices"), "{set:?}");
    // The usbpt view recorded the request (FlavorUsbSet), vendor/product as given.
    let (_, doc) = serve.get("/v2.1/flavors/erp-key").await?;
    assert_eq!(
        doc["flavor"]["usb_devices"].as_array().unwrap().len(),
        1,
        "{doc}"
    );

    // Boot: scheduled where the key is (host-b), ACTIVE through the test driver.
    let server = os
        .openstack(&[
            "server",
            "create",
            "--flavor",
            "erp-key",
            "--block-device",
            "source_type=blank,destination_type=local,boot_index=0,volume_size=1",
            "--nic",
            "none",
            "--wait",
            "erp-1",
            "-f",
            "json",
        ])
        .await?
        .ok()
        .json();
    assert_eq!(server["status"], "ACTIVE", "{server}");
    assert_eq!(server["OS-EXT-SRV-ATTR:host"], "host-b", "{server}");
    let id = server["id"].as_str().unwrap().to_owned();

    let list = os
        .openstack(&["server", "list", "-f", "json"])
        .await?
        .ok()
        .json();
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["Name"] == "erp-1")
        .unwrap_or_else(|| panic!("erp-1 not listed: {list}"));
    assert_eq!(row["ID"], id.as_str());
    assert_eq!(row["Status"], "ACTIVE");
    assert_eq!(row["Flavor"], "erp-key", "{row}");

    let show = os
        .openstack(&["server", "show", "erp-1", "-f", "json"])
        .await?
        .ok()
        .json();
    assert_eq!(show["id"], id.as_str());
    assert_eq!(show["OS-EXT-STS:vm_state"], "active", "{show}");
    assert_eq!(
        show["OS-EXT-SRV-ATTR:hypervisor_hostname"], "host-b",
        "{show}"
    );
    assert!(show["created"].as_str().unwrap().ends_with('Z'), "{show}");
    assert!(show.get("fault").is_none_or(Value::is_null), "{show}");

    // A flavor with no USB request runs on any host with an agent (the first by name).
    os.openstack(&["flavor", "create", "plain"]).await?.ok();
    let plain = os
        .openstack(&[
            "server",
            "create",
            "--flavor",
            "plain",
            "--block-device",
            "source_type=blank,destination_type=local,boot_index=0,volume_size=1",
            "--wait",
            "plain-1",
            "-f",
            "json",
        ])
        .await?
        .ok()
        .json();
    assert_eq!(plain["status"], "ACTIVE", "{plain}");
    assert_eq!(plain["OS-EXT-SRV-ATTR:host"], "host-a", "{plain}");

    // Cold migration of a USB-less server to a chosen host (2.56+ for --host).
    os.openstack(&[
        "--os-compute-api-version",
        "2.56",
        "server",
        "migrate",
        "--host",
        "host-b",
        "--wait",
        "plain-1",
    ])
    .await?
    .ok();
    let moved = os
        .openstack(&["server", "show", "plain-1", "-f", "json"])
        .await?
        .ok()
        .json();
    assert_eq!(moved["status"], "ACTIVE", "{moved}");
    assert_eq!(moved["OS-EXT-SRV-ATTR:host"], "host-b", "{moved}");
    // The destination's agent defined and started the domain: its report is the server's state
    // (the source's teardown report, which once made this flaky, is not).
    let path = "/v2.1/servers/plain-1";
    let doc = eventually(Duration::from_secs(30), || async {
        let (_, doc) = serve.get(path).await.ok()?;
        let detail = doc["server"]["state_detail"].as_str()?.to_owned();
        detail
            .contains("cold migration from host host-a")
            .then_some(doc)
    })
    .await
    .context("host-b never reported plain-1 running")?;
    assert_eq!(doc["server"]["status"], "ACTIVE", "{doc}");

    // PUT /servers/{id}: rename and describe (2.19+), recorded as ServerUpdated.
    os.openstack(&[
        "server",
        "set",
        "--name",
        "plain-2",
        "--description",
        "no USB; moved to host-b",
        "plain-1",
    ])
    .await?
    .ok();
    let renamed = os
        .openstack(&["server", "show", "plain-2", "-f", "json"])
        .await?
        .ok()
        .json();
    assert_eq!(renamed["id"], moved["id"], "{renamed}");
    assert_eq!(
        renamed["description"], "no USB; moved to host-b",
        "{renamed}"
    );
    let gone = os.openstack(&["server", "show", "plain-1"]).await?;
    assert_ne!(gone.code, 0, "the old name is free: {gone:?}");
    os.openstack(&["server", "unset", "--description", "plain-2"])
        .await?
        .ok();
    let (_, _, body) = raw(
        reqwest::Method::GET,
        &format!("{}/v2.1/servers/plain-2", serve.api),
        &[("OpenStack-API-Version", "compute 2.19")],
        None,
    )
    .await?;
    let doc: Value = serde_json::from_str(&body)?;
    assert_eq!(doc["server"]["description"], "", "{doc}");

    // Flavor resources: recorded from `flavor create` (FlavorSized) and shown.
    let sized = os
        .openstack(&[
            "flavor", "create", "--ram", "512", "--vcpus", "2", "--disk", "10", "sized", "-f",
            "json",
        ])
        .await?
        .ok()
        .json();
    assert_eq!(
        (&sized["ram"], &sized["vcpus"], &sized["disk"]),
        (&Value::from(512), &Value::from(2), &Value::from(10)),
        "{sized}"
    );
    let shown = os
        .openstack(&["flavor", "show", "sized", "-f", "json"])
        .await?
        .ok()
        .json();
    assert_eq!(shown["ram"], 512, "{shown}");

    // Live migration of a server holding a host USB device is refused, with the reason.
    let live = os
        .openstack(&["server", "migrate", "--live-migration", "erp-1"])
        .await?;
    assert_ne!(live.code, 0, "{live:?}");
    assert!(
        live.stderr.contains("409") && live.stderr.contains("live migration"),
        "{live:?}"
    );

    // Resize to a flavor asking for the other key by serial: VERIFY_RESIZE, both keys reserved;
    // revert gives erp-1 its old flavor and key back (in the libvirt domain on host-b, through
    // the claims it kept); a second resize is confirmed, releasing the old key.
    let (_, doc) = serve.get("/v2.1/servers/erp-1").await?;
    let old_device = doc["server"]["usb_devices"][0]["device_id"].clone();
    let (_, devices) = serve.get("/v1/devices").await?;
    let device = |id: &Value| -> Value {
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| &d["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("device {id} not in {devices}"))
    };
    let old = device(&old_device);
    let other = if old["serial"] == "ERP-1" {
        "ERP-2"
    } else {
        "ERP-1"
    };
    let hostdev = |d: &Value| format!("<address bus='{}' device='{}'/>", d["bus"], d["devnum"]);
    let erp_1 = usbpt_schemas::ServerId(id.parse::<uuid::Uuid>()?);
    let domain = |want: String, not: String| {
        let executor = Arc::clone(&host_b.executor);
        async move {
            eventually(Duration::from_secs(30), || {
                let (executor, want, not) = (Arc::clone(&executor), want.clone(), not.clone());
                async move {
                    let xml = executor
                        .domain_xml(erp_1, true)
                        .await
                        .ok()?
                        .replace('"', "'");
                    (xml.contains(&want) && !xml.contains(&not)).then_some(xml)
                }
            })
            .await
        }
    };
    let spec2 = format!(
        r#"[{{"vendor_id":"136b","product_id":"0003","serial":"{other}","controller":"xhci"}}]"#
    );
    os.openstack(&[
        "flavor",
        "create",
        "--property",
        &format!("usb_devices={spec2}"),
        "erp-key-2",
    ])
    .await?
    .ok();
    let resize = [
        "server",
        "resize",
        "--flavor",
        "erp-key-2",
        "--wait",
        "erp-1",
    ];
    os.openstack(&resize).await?.ok();
    let (_, doc) = serve.get("/v2.1/servers/erp-1").await?;
    assert_eq!(doc["server"]["status"], "VERIFY_RESIZE", "{doc}");
    assert_eq!(doc["server"]["OS-EXT-STS:vm_state"], "resized", "{doc}");
    let new_device = doc["server"]["usb_devices"][0]["device_id"].clone();
    assert_ne!(new_device, old_device, "{doc}");
    let new = device(&new_device);
    // Both keys are erp-1's until the resize is confirmed or reverted: no third server fits.
    let (_, devices_now) = serve.get("/v1/devices").await?;
    for d in devices_now["devices"].as_array().unwrap() {
        if d["id"] == old_device || d["id"] == new_device {
            assert_ne!(d["status"], "available", "{d}");
        }
    }
    domain(hostdev(&new), hostdev(&old))
        .await
        .context("the new key never reached erp-1's domain")?;
    os.openstack(&["server", "resize", "revert", "erp-1"])
        .await?
        .ok();
    let reverted = status_becomes(&serve, "erp-1", "ACTIVE").await?;
    assert_eq!(
        reverted["server"]["flavor"]["name"], "erp-key",
        "{reverted}"
    );
    assert_eq!(
        reverted["server"]["usb_devices"][0]["device_id"], old_device,
        "{reverted}"
    );
    let xml = domain(hostdev(&old), hostdev(&new))
        .await
        .context("erp-1's domain never got its old key back")?;
    assert_eq!(xml.matches("<hostdev").count(), 1, "{xml}");
    let (_, devices_now) = serve.get("/v1/devices").await?;
    let freed = devices_now["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == new_device)
        .cloned()
        .unwrap();
    assert_eq!(freed["status"], "available", "{freed}");
    let again = os
        .openstack(&["server", "resize", "confirm", "erp-1"])
        .await?;
    assert_ne!(again.code, 0, "nothing to confirm: {again:?}");

    os.openstack(&resize).await?.ok();
    os.openstack(&["server", "resize", "confirm", "erp-1"])
        .await?
        .ok();
    let (_, doc) = serve.get("/v2.1/servers/erp-1").await?;
    assert_eq!(doc["server"]["flavor"]["name"], "erp-key-2", "{doc}");
    assert_eq!(doc["server"]["status"], "ACTIVE", "{doc}");
    let (_, devices_now) = serve.get("/v1/devices").await?;
    let released = devices_now["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == old_device)
        .cloned()
        .unwrap();
    assert_eq!(released["status"], "available", "{released}");

    // Power actions, observed through the agent and the view.
    os.openstack(&["server", "stop", "erp-1"]).await?.ok();
    status_becomes(&serve, "erp-1", "SHUTOFF").await?;
    os.openstack(&["server", "start", "erp-1"]).await?.ok();
    status_becomes(&serve, "erp-1", "ACTIVE").await?;

    os.openstack(&["server", "reboot", "--wait", "erp-1"])
        .await?
        .ok();
    status_becomes(&serve, "erp-1", "ACTIVE").await?;

    // The history as instance actions: create, then the refused live migration, stop, start.
    let events = os
        .openstack(&["server", "event", "list", "erp-1", "-f", "json"])
        .await?
        .ok()
        .json();
    let actions = string_set(&events, "Action");
    // The view keeps a server's last power action (here the reboot), not each one.
    for a in [
        "create",
        "live-migration",
        "resize",
        "revertResize",
        "confirmResize",
        "reboot",
    ] {
        assert!(actions.contains(&a.to_owned()), "{a} missing: {events}");
    }
    let (_, migrations) = serve.get("/v2.1/os-migrations").await?;
    // The reverted resize and the confirmed one; the way back of the revert is not a migration.
    let kinds: Vec<(String, String)> = migrations["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["migration_type"].as_str().unwrap().to_owned(),
                m["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("resize".into(), "confirmed".into()),
            ("resize".into(), "reverted".into()),
            ("live-migration".into(), "error".into()),
            ("migration".into(), "confirmed".into()),
        ],
        "{migrations}"
    );

    let services = os
        .openstack(&["compute", "service", "list", "-f", "json"])
        .await?
        .ok()
        .json();
    assert_eq!(string_set(&services, "Host"), ["host-a", "host-b"]);
    for s in services.as_array().unwrap() {
        assert_eq!(s["Binary"], "nova-compute", "{s}");
        assert_eq!(s["State"], "up", "{s}");
    }

    // novaclient: usb_device_stats, and servers.create returns a server.
    let nova = os
        .run("python", &["-c", NOVACLIENT, &serve.api])
        .await?
        .ok()
        .json();
    assert_eq!(nova["hypervisor_hostname"], "host-b");
    let stats = nova["usb_device_stats"].as_array().unwrap();
    assert_eq!(stats.len(), 2, "{nova}");
    for key in [
        "id",
        "compute_node_id",
        "address",
        "product_id",
        "vendor_id",
        "bus_id",
        "device_id",
        "port_id",
        "status",
        "extra_info",
        "instance_uuid",
    ] {
        assert!(stats[0].get(key).is_some(), "{key} missing: {}", stats[0]);
    }
    assert!(
        stats.iter().any(|d| d["instance_uuid"] == id.as_str()),
        "erp-1 holds a device: {nova}"
    );
    assert!(
        nova["server_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{nova}"
    );
    let nova_1 = status_becomes(&serve, "nova-1", "ACTIVE").await?;
    assert_eq!(nova_1["server"]["id"], nova["server_id"]);
    assert_eq!(
        nova["rebuilt"]["id"],
        id.as_str(),
        "rebuild answers with the server: {nova}"
    );
    status_becomes(&serve, "erp-1", "ACTIVE").await?;

    // Delete both; the servers are gone from the list.
    os.openstack(&["server", "delete", "--wait", "erp-1", "nova-1", "plain-2"])
        .await?
        .ok();
    let list = os
        .openstack(&["server", "list", "-f", "json"])
        .await?
        .ok()
        .json();
    assert_eq!(list, Value::Array(vec![]), "{list}");

    eprintln!(
        "{} client runs took {:.1} s ({:.2} s each); the whole test {:.1} s",
        os.calls,
        os.spent.as_secs_f64(),
        os.spent.as_secs_f64() / os.calls as f64,
        total.elapsed().as_secs_f64()
    );

    // Liveness (ADR 0008): a cleanly stopped agent's last beat says so, and its host is down at
    // once, in os-services and os-hypervisors alike.
    host_a.stop().await;
    service_becomes(&serve, "host-a", "down").await?;
    let services = os
        .openstack(&["compute", "service", "list", "-f", "json"])
        .await?
        .ok()
        .json();
    let states: Vec<(String, String)> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["Host"].as_str().unwrap().to_owned(),
                s["State"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("host-a".into(), "down".into()),
            ("host-b".into(), "up".into())
        ],
        "{services}"
    );
    let list = os
        .openstack(&["hypervisor", "list", "-f", "json"])
        .await?
        .ok()
        .json();
    for h in list.as_array().unwrap() {
        let want = if h["Hypervisor Hostname"] == "host-a" {
            "down"
        } else {
            "up"
        };
        assert_eq!(h["State"], want, "{h}");
    }
    // A crashed agent sends no last beat: its host is down once three beats are missed.
    let crashed = Instant::now();
    host_b.crash();
    service_becomes(&serve, "host-b", "down").await?;
    let took = crashed.elapsed();
    eprintln!(
        "a crashed agent's host went down after {:.1} s",
        took.as_secs_f64()
    );
    assert!(
        took >= Duration::from_secs(3),
        "down before a beat was missed: {took:?}"
    );
    drop(serve);
    Ok(())
}

/// One raw request: status, headers, body text.
async fn raw(
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Result<(u16, reqwest::header::HeaderMap, String)> {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .header("x-auth-token", projector_support::API_TOKEN);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    Ok((status, headers, resp.text().await?))
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

#[tokio::test]
async fn discovery_microversions_errors_and_extra_specs_are_novas() -> Result<()> {
    use reqwest::Method;
    let nats = TestNats::start().await?;
    let data = tempfile::tempdir()?;
    let serve = Serve::start(&nats.url(), data.path()).await?;
    let api = serve.api.clone();
    let json =
        |s: &str| -> Value { serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}")) };

    // Version discovery: JSON by content negotiation at `/`, the dashboard for browsers.
    let (code, h, body) = raw(
        Method::GET,
        &format!("{api}/"),
        &[("Accept", "application/json")],
        None,
    )
    .await?;
    assert_eq!(code, 200);
    let v = json(&body);
    assert_eq!(v["versions"][0]["id"], "v2.1", "{v}");
    assert_eq!(v["versions"][0]["min_version"], "2.1");
    assert_eq!(v["versions"][0]["version"], "2.88");
    assert!(
        header(&h, "x-openstack-request-id").starts_with("req-"),
        "{h:?}"
    );
    let (code, h, body) = raw(
        Method::GET,
        &format!("{api}/"),
        &[(
            "Accept",
            "text/html,application/xhtml+xml,application/json;q=0.9",
        )],
        None,
    )
    .await?;
    assert_eq!(code, 200);
    assert!(header(&h, "content-type").starts_with("text/html") && body.contains("<html"));
    for path in ["/v2.1", "/v2.1/"] {
        let (code, _, body) = raw(Method::GET, &format!("{api}{path}"), &[], None).await?;
        assert_eq!(code, 200, "{path}");
        assert_eq!(json(&body)["version"]["status"], "CURRENT", "{body}");
    }

    // Microversions: negotiated from either header, echoed with Vary; 406 outside the range.
    let (code, h, _) = raw(
        Method::GET,
        &format!("{api}/v2.1/flavors"),
        &[("OpenStack-API-Version", "compute 2.60")],
        None,
    )
    .await?;
    assert_eq!(code, 200);
    assert_eq!(header(&h, "openstack-api-version"), "compute 2.60");
    assert_eq!(header(&h, "x-openstack-nova-api-version"), "2.60");
    assert!(
        header(&h, "vary").contains("OpenStack-API-Version"),
        "{h:?}"
    );
    let (_, h, _) = raw(
        Method::GET,
        &format!("{api}/v2.1/flavors"),
        &[("X-OpenStack-Nova-API-Version", "2.53")],
        None,
    )
    .await?;
    assert_eq!(header(&h, "openstack-api-version"), "compute 2.53");
    let (_, h, _) = raw(
        Method::GET,
        &format!("{api}/v2.1/flavors"),
        &[("OpenStack-API-Version", "compute latest")],
        None,
    )
    .await?;
    assert_eq!(header(&h, "openstack-api-version"), "compute 2.88");
    let (_, h, _) = raw(Method::GET, &format!("{api}/v2.1/flavors"), &[], None).await?;
    assert_eq!(header(&h, "openstack-api-version"), "compute 2.1");
    for bad in ["compute 9.99", "compute 2.0", "compute 2.89"] {
        let (code, _, body) = raw(
            Method::GET,
            &format!("{api}/v2.1/flavors"),
            &[("OpenStack-API-Version", bad)],
            None,
        )
        .await?;
        assert_eq!(code, 406, "{bad}: {body}");
        assert!(json(&body)["computeFault"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum is 2.88"));
    }
    let (code, _, _) = raw(
        Method::GET,
        &format!("{api}/v2.1/flavors"),
        &[("OpenStack-API-Version", "compute two")],
        None,
    )
    .await?;
    assert_eq!(code, 400);

    // Nova's error envelope, its fault name first, with usbpt's own "error" key beside it.
    let (code, _, body) = raw(Method::GET, &format!("{api}/v2.1/servers/nope"), &[], None).await?;
    assert_eq!(code, 404);
    assert!(body.starts_with(r#"{"itemNotFound":{"#), "{body}");
    let e = json(&body);
    assert_eq!(e["itemNotFound"], e["error"]);
    assert_eq!(e["itemNotFound"]["code"], 404);
    let (code, _, _) = raw(
        Method::GET,
        &format!("{api}/v2.1/servers?deleted=False"),
        &[],
        None,
    )
    .await?;
    assert_eq!(code, 200);
    let (code, _, body) = raw(
        Method::GET,
        &format!("{api}/v2.1/servers/detail?deleted=maybe"),
        &[],
        None,
    )
    .await?;
    assert_eq!(code, 400);
    assert!(
        json(&body)["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("deleted"),
        "{body}"
    );

    // Flavors: the create reply carries the flavor; usb_devices is an extra spec (2.61+).
    let (code, _, body) = raw(
        Method::POST,
        &format!("{api}/v2.1/flavors"),
        &[],
        Some(serde_json::json!(
        {"flavor": {"name": "erp-key", "ram": 256, "vcpus": 1, "disk": 0, "id": null}})),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let flavor = json(&body)["flavor"].clone();
    let fid = flavor["id"].as_str().unwrap().to_owned();
    assert_eq!(flavor["name"], "erp-key");
    let specs_url = format!("{api}/v2.1/flavors/{fid}/os-extra_specs");
    for (bad, field) in [
        (
            serde_json::json!({"extra_specs": {"usb_devices": "[{\"vendor_id\":\"zz\",\"product_id\":\"0003\"}]"}}),
            "extra_specs.usb_devices",
        ),
        (
            serde_json::json!({"extra_specs": {"usb_devices": "[{\"vendor_id\":\"136b\"}]"}}),
            "extra_specs.usb_devices[0]",
        ),
        (
            serde_json::json!({"extra_specs": {"usb_devices": "not json"}}),
            "extra_specs.usb_devices",
        ),
        (
            serde_json::json!({"extra_specs": {"hw:cpu_policy": "dedicated"}}),
            "extra_specs.hw:cpu_policy",
        ),
    ] {
        let (code, _, body) = raw(Method::POST, &specs_url, &[], Some(bad.clone())).await?;
        assert_eq!(code, 400, "{bad}: {body}");
        assert!(
            json(&body)["badRequest"]["message"]
                .as_str()
                .unwrap()
                .contains(field),
            "{field}: {body}"
        );
    }
    let spec = r#"[{"vendor_id":"136b","product_id":"0003","serial":"ERP-1","count":1,"controller":"xhci","follow":"strict"}]"#;
    let (code, _, body) = raw(
        Method::POST,
        &specs_url,
        &[],
        Some(serde_json::json!({"extra_specs": {"usb_devices": spec}})),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let got: Value =
        serde_json::from_str(json(&body)["extra_specs"]["usb_devices"].as_str().unwrap())?;
    assert_eq!(got, json(spec), "the request reads back as given");
    let (_, _, body) = raw(
        Method::GET,
        &format!("{api}/v2.1/flavors/{fid}"),
        &[("OpenStack-API-Version", "compute 2.61")],
        None,
    )
    .await?;
    assert_eq!(
        json(&body)["flavor"]["extra_specs"]["usb_devices"].as_str(),
        Some(got.to_string().as_str())
    );
    let (_, _, body) = raw(Method::GET, &format!("{api}/v2.1/flavors/{fid}"), &[], None).await?;
    assert!(
        json(&body)["flavor"].get("extra_specs").is_none(),
        "not before 2.61: {body}"
    );
    let (code, _, body) = raw(
        Method::DELETE,
        &format!("{specs_url}/usb_devices"),
        &[],
        None,
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let (_, _, body) = raw(Method::GET, &specs_url, &[], None).await?;
    assert_eq!(json(&body), serde_json::json!({"extra_specs": {}}));

    // The fingerprint policy is a sibling extra spec: hold (the default) is not listed.
    let (code, _, body) = raw(
        Method::POST,
        &specs_url,
        &[],
        Some(serde_json::json!({"extra_specs": {"usb:on_fingerprint_change": "sometimes"}})),
    )
    .await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        json(&body)["badRequest"]["message"]
            .as_str()
            .unwrap()
            .contains("extra_specs.usb:on_fingerprint_change"),
        "{body}"
    );
    let (code, _, body) = raw(
        Method::PUT,
        &format!("{specs_url}/usb:on_fingerprint_change"),
        &[],
        Some(serde_json::json!({"usb:on_fingerprint_change": "follow"})),
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({"usb:on_fingerprint_change": "follow"})
    );
    let (_, _, body) = raw(Method::GET, &format!("{api}/v2.1/flavors/{fid}"), &[], None).await?;
    assert_eq!(json(&body)["flavor"]["on_fingerprint_change"], "follow");
    let (code, _, body) = raw(
        Method::DELETE,
        &format!("{specs_url}/usb:on_fingerprint_change"),
        &[],
        None,
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    let (_, _, body) = raw(Method::GET, &format!("{api}/v2.1/flavors/{fid}"), &[], None).await?;
    assert_eq!(json(&body)["flavor"]["on_fingerprint_change"], "hold");
    let (_, _, body) = raw(Method::GET, &specs_url, &[], None).await?;
    assert_eq!(json(&body), serde_json::json!({"extra_specs": {}}));

    // A boot no host can take: 202 with the server (and Location), which is then in ERROR with
    // a fault saying why, as Nova leaves it.
    let ghost = r#"[{"vendor_id":"0001","product_id":"0001"}]"#;
    raw(
        Method::PUT,
        &format!("{specs_url}/usb_devices"),
        &[],
        Some(serde_json::json!({"usb_devices": ghost})),
    )
    .await?;
    let (code, h, body) = raw(Method::POST, &format!("{api}/v2.1/servers"), &[], Some(serde_json::json!(
        {"server": {"name": "doomed", "flavorRef": format!("{api}/v2.1/flavors/{fid}"), "imageRef": "", "networks": "none"}}))).await?;
    assert_eq!(code, 202, "{body}");
    let sid = json(&body)["server"]["id"].as_str().unwrap().to_owned();
    assert!(
        header(&h, "location").ends_with(&format!("/v2.1/servers/{sid}")),
        "{h:?}"
    );
    let (_, _, body) = raw(Method::GET, &format!("{api}/v2.1/servers/{sid}"), &[], None).await?;
    let doomed = json(&body)["server"].clone();
    assert_eq!(doomed["status"], "ERROR", "{doomed}");
    assert!(
        !doomed["fault"]["message"]
            .as_str()
            .unwrap_or_default()
            .is_empty(),
        "{doomed}"
    );
    // PUT /servers/{id}: a description needs 2.19; a bad name is a 400 naming the field.
    let put = |body: Value, version: &'static str| {
        let url = format!("{api}/v2.1/servers/{sid}");
        async move {
            raw(
                Method::PUT,
                &url,
                &[("OpenStack-API-Version", version)],
                Some(body),
            )
            .await
        }
    };
    let (code, _, body) = put(
        serde_json::json!({"server": {"description": "d"}}),
        "compute 2.18",
    )
    .await?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("server.description"), "{body}");
    let (code, _, body) = put(
        serde_json::json!({"server": {"name": "no spaces allowed"}}),
        "compute 2.19",
    )
    .await?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("server.name"), "{body}");
    let (code, _, body) = put(
        serde_json::json!({"server": {"name": "doomed-2", "description": "kept"}}),
        "compute 2.19",
    )
    .await?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["server"]["name"], "doomed-2");
    assert_eq!(json(&body)["server"]["description"], "kept");
    let (code, _, body) = raw(
        Method::DELETE,
        &format!("{api}/v2.1/servers/{sid}"),
        &[],
        None,
    )
    .await?;
    assert_eq!((code, body.as_str()), (204, ""));

    // A bad server body is a 400 and creates nothing.
    let (code, _, body) = raw(
        Method::POST,
        &format!("{api}/v2.1/servers"),
        &[],
        Some(serde_json::json!({"server": {"name": "x"}})),
    )
    .await?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("flavorRef"), "{body}");
    let (_, _, body) = raw(Method::GET, &format!("{api}/v2.1/servers"), &[], None).await?;
    assert_eq!(json(&body), serde_json::json!({"servers": []}));

    // Hypervisor routes with no hosts yet; removed routes at 2.88.
    let (code, _, body) = raw(
        Method::GET,
        &format!("{api}/v2.1/os-hypervisors?hypervisor_hostname_pattern=host"),
        &[],
        None,
    )
    .await?;
    assert_eq!(code, 404, "{body}");
    let (code, _, body) = raw(
        Method::GET,
        &format!("{api}/v2.1/os-hypervisors/statistics"),
        &[],
        None,
    )
    .await?;
    assert_eq!(
        (code, json(&body)["hypervisor_statistics"]["count"].as_u64()),
        (200, Some(0))
    );
    let (code, _, _) = raw(
        Method::GET,
        &format!("{api}/v2.1/os-hypervisors/statistics"),
        &[("OpenStack-API-Version", "compute 2.88")],
        None,
    )
    .await?;
    assert_eq!(code, 404);
    let (_, _, body) = raw(Method::GET, &format!("{api}/v2.1/os-aggregates"), &[], None).await?;
    assert_eq!(json(&body), serde_json::json!({"aggregates": []}));
    Ok(())
}

/// Nova's `resize_confirm_window` (`usbpt serve --resize-confirm-window 1`): a resize left in
/// VERIFY_RESIZE is confirmed by the control plane once the window has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_confirm_window_confirms_a_pending_resize() -> Result<()> {
    use reqwest::Method;
    let nats = TestNats::start().await?;
    let data = tempfile::tempdir()?;
    let serve =
        Serve::start_with(&nats.url(), data.path(), &["--resize-confirm-window", "1"]).await?;
    let hosts = tempfile::tempdir()?;
    let host = SimHost::start("host-a", hosts.path(), &nats.url(), vec![]).await?;
    let api = serve.api.clone();
    let json =
        |s: &str| -> Value { serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}")) };
    let mut flavor_ids = Vec::new();
    for name in ["small", "big"] {
        let (code, _, body) = raw(
            Method::POST,
            &format!("{api}/v2.1/flavors"),
            &[],
            Some(serde_json::json!({"flavor": {"name": name, "ram": 64, "vcpus": 1, "disk": 0}})),
        )
        .await?;
        assert_eq!(code, 200, "{body}");
        flavor_ids.push(json(&body)["flavor"]["id"].as_str().unwrap().to_owned());
    }
    // The agent has announced host-a: a flavor without USB can be scheduled there.
    eventually(Duration::from_secs(30), || async {
        let (_, doc) = serve.get("/v2.1/os-hypervisors").await.ok()?;
        (doc["hypervisors"].as_array()?.len() == 1).then_some(())
    })
    .await?;
    let (code, _, body) = raw(
        Method::POST,
        &format!("{api}/v2.1/servers"),
        &[],
        Some(serde_json::json!({"server": {
            "name": "w-1", "flavorRef": flavor_ids[0], "networks": "none"}})),
    )
    .await?;
    assert_eq!(code, 202, "{body}");
    status_becomes(&serve, "w-1", "ACTIVE").await?;
    let resized = Instant::now();
    let (code, _, body) = raw(
        Method::POST,
        &format!("{api}/v2.1/servers/w-1/action"),
        &[],
        Some(serde_json::json!({"resize": {"flavorRef": flavor_ids[1]}})),
    )
    .await?;
    assert_eq!(code, 202, "{body}");
    let (_, doc) = serve.get("/v2.1/servers/w-1").await?;
    assert_eq!(doc["server"]["status"], "VERIFY_RESIZE", "{doc}");
    let confirmed = eventually(Duration::from_secs(30), || async {
        let (_, doc) = serve.get("/v2.1/os-migrations").await.ok()?;
        (doc["migrations"][0]["status"] == "confirmed").then_some(doc)
    })
    .await
    .context("the resize was never confirmed")?;
    let took = resized.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "before the window: {took:?}"
    );
    eprintln!(
        "auto-confirmed after {:.1} s: {confirmed}",
        took.as_secs_f64()
    );
    let doc = status_becomes(&serve, "w-1", "ACTIVE").await?;
    assert_eq!(
        doc["server"]["flavor"]["id"],
        flavor_ids[1].as_str(),
        "{doc}"
    );
    host.stop().await;
    Ok(())
}
