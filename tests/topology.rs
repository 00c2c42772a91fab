//! The deployment of docs/operations.md on loopback: a 3-node nats-server cluster (JetStream, the
//! stream created with 3 replicas from the config file's `nats.stream_replicas`), two host
//! agents (real libudev under umockdev), two `usbpt serve` replicas, each configured by its own
//! usbpt.toml as an operator would. Mid-traffic one NATS node and one serve replica are
//! SIGKILLed: the other replica keeps answering commands and reads, every acknowledged command
//! and every agent's event is in the stream and the view, the killed replica catches up on
//! restart, and `usbpt replay --verify` agrees with both views.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agent_support::*;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use usbpt_testkit::umockdev::{recorded, umockdev_test, Testbed, UsbDeviceSpec};
use usbpt_testkit::{eventually, TestCluster};

const FLAVORS: usize = 24;

/// One serve replica's (or a CLI's) config file, as docs/operations.md writes it.
fn config(dir: &Path, name: &str, urls: &str, consumer: &str) -> Result<PathBuf> {
    let urls: Vec<String> = urls.split(',').map(|u| format!("{u:?}")).collect();
    let path = dir.join(format!("{name}.toml"));
    // One API token for the deployment (ADR 0006), in a file the config names.
    let token = dir.join("api-token");
    usbpt_api::ApiToken::ensure(&token)?;
    std::fs::write(
        &path,
        format!(
            "data_dir = {data:?}\n\
             [nats]\nurls = [{urls}]\ninsecure = true\nstream_replicas = 3\n\
             [serve]\nlisten = \"127.0.0.1:0\"\n\
             [api]\ntoken_file = {token:?}\n\
             [projector]\nconsumer = {consumer:?}\n",
            data = dir.join(name).display().to_string(),
            urls = urls.join(", "),
            token = token.display().to_string(),
        ),
    )?;
    Ok(path)
}

fn usbpt(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_usbpt"));
    for v in ["NATS_URL", "USBPT_INSECURE", "USBPT_DATA_DIR", "USBPT_API"] {
        c.env_remove(v);
    }
    c.arg("--config").arg(config).env("USBPT_LOG", "warn");
    c
}

/// A running `usbpt serve` replica.
struct Replica {
    child: Child,
    config: PathBuf,
    api: String,
    token: String,
}

impl Replica {
    async fn start(config: &Path) -> Result<Self> {
        let mut child = usbpt(config)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn usbpt serve")?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let api = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                eprintln!("[serve] {line}");
                if let Some(url) = line.split("listening on ").nth(1) {
                    return Ok(url.trim().to_owned());
                }
            }
            bail!("usbpt serve exited before listening")
        })
        .await
        .context("usbpt serve did not announce its address")??;
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[serve] {line}");
            }
        });
        // The socket is bound before the bus is connected and the stream created; the first
        // HTTP answer comes once all of that is done (the connection waits in the backlog).
        let token = std::fs::read_to_string(config.with_file_name("api-token"))?
            .trim()
            .to_owned();
        tokio::time::timeout(
            Duration::from_secs(60),
            reqwest::Client::new()
                .get(format!("{api}/v1/status"))
                .bearer_auth(&token)
                .send(),
        )
        .await
        .context("usbpt serve never answered")??
        .error_for_status()?;
        Ok(Self {
            child,
            config: config.to_path_buf(),
            api,
            token,
        })
    }

    async fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = usbpt(&self.config)
            .args(["--api", &self.api])
            .args(args)
            .output()
            .await?;
        Ok((
            out.status.success(),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    }

    async fn json(&self, args: &[&str]) -> Result<Value> {
        let (ok, out, err) = self.cli(args).await?;
        if !ok {
            bail!("usbpt {args:?}: {err}");
        }
        Ok(serde_json::from_str(&out)?)
    }

    /// Waits (server side) until the view has applied `seq`.
    async fn wait_applied(&self, seq: u64) -> Result<()> {
        let doc: Value = reqwest::Client::new()
            .get(format!(
                "{}/v1/status?min_seq={seq}&timeout_ms=60000",
                self.api
            ))
            .bearer_auth(&self.token)
            .send()
            .await?
            .json()
            .await?;
        if doc["reached"] != Value::Bool(true) {
            bail!("view at {} did not reach {seq}: {doc}", self.api);
        }
        Ok(())
    }

    async fn flavor_names(&self) -> Result<Vec<String>> {
        let doc = self.json(&["flavor", "list", "--json"]).await?;
        let rows = doc
            .as_array()
            .or_else(|| doc["flavors"].as_array())
            .with_context(|| format!("flavor list: {doc}"))?;
        let mut names: Vec<String> = rows
            .iter()
            .filter_map(|f| f["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }
}

/// A stick at port 3-2.`port` (behind the recorded hub).
fn stick(port: u16, devnum: u16) -> UsbDeviceSpec {
    UsbDeviceSpec::new(
        recorded::HUB_3_2,
        &format!("3-2.{port}"),
        3,
        devnum,
        0x0781,
        0x5567,
    )
    .serial(&format!("TOPO{port:04}"))
    .strings("SanDisk", "Cruzer Blade")
}

/// `usbpt flavor create` through whichever command handler answers. A command that times out
/// during the failover is sent again; "exists" then means the first one was applied.
async fn create_flavor(r: &Replica, name: &str) -> Result<()> {
    eventually(Duration::from_secs(60), || async {
        let (ok, _, err) = r
            .cli(&[
                "flavor",
                "create",
                name,
                "--usb",
                "vendor=0781,product=5567",
            ])
            .await
            .ok()?;
        if !ok {
            eprintln!("[cli] flavor create {name}: {}", err.trim());
        }
        (ok || err.contains("exists")).then_some(())
    })
    .await
    .with_context(|| format!("flavor {name} was never accepted"))
}

async fn stream_head(url: &str) -> Result<(u64, u64, usize)> {
    let admin = usbpt_bus::admin::StreamAdmin::connect(url).await?;
    let state = admin
        .stream_state(usbpt_schemas::subjects::STREAM)
        .await
        .context("the stream")?;
    Ok((state.last_sequence, state.messages, state.replicas))
}

#[test]
fn a_nats_node_and_a_serve_replica_die_mid_traffic_and_nothing_is_lost() {
    umockdev_test(
        "a_nats_node_and_a_serve_replica_die_mid_traffic_and_nothing_is_lost",
        || async {
            let t0 = Instant::now();
            let tb = Testbed::new()?;
            tb.add_recording(&host_recording()?)?;
            let mut cluster = TestCluster::start(3).await?;
            let url = cluster.url();
            let dir = tempfile::Builder::new()
                .prefix("usbpt-topology-")
                .tempdir()?;
            let c1 = config(dir.path(), "serve-1", &url, "usbpt-serve-1")?;
            let c2 = config(dir.path(), "serve-2", &url, "usbpt-serve-2")?;
            let mut r1 = Replica::start(&c1).await?;
            let r2 = Replica::start(&c2).await?;
            let (_, _, replicas) = stream_head(&url).await?;
            assert_eq!(
                replicas, 3,
                "the config file's stream_replicas made the stream R3"
            );

            let home_a = AgentHome::new("host-a", "boot-a")?;
            let home_b = AgentHome::new("host-b", "boot-b")?;
            let mut agent_a = AgentProcess::start(&home_a, &url).await?;
            let mut agent_b = AgentProcess::start(&home_b, &url).await?;
            agent_a.expect("drained").await?;
            agent_b.expect("drained").await?;
            eprintln!("topology up in {:?}", t0.elapsed());

            // Traffic: commands through replica 1's command handler or replica 2's (NATS
            // queue group), devices plugged on both hosts.
            let names: Vec<String> = (0..FLAVORS).map(|i| format!("fl-{i:02}")).collect();
            for n in &names[..FLAVORS / 2] {
                create_flavor(&r2, n).await?;
            }
            // umockdev delivers a testbed's uevents to one monitor, the last one opened:
            // host-b's agent sees the plugs live; host-a's picks them up on its restart below
            // (a rolling upgrade).
            let first = tb.plug(&stick(10, 110))?;
            agent_b.expect("drained").await?;

            // A NATS node and a serve replica die, as a power cut would.
            cluster.nodes[0].kill().await;
            r1.child.kill().await?;
            let killed_at = Instant::now();

            for n in &names[FLAVORS / 2..] {
                create_flavor(&r2, n).await?;
            }
            let second = tb.plug(&stick(11, 111))?;
            agent_b.expect("drained").await?;
            // host-a's agent is upgraded (stopped, started) while a NATS node is down: it
            // reconciles its host on start and publishes what changed.
            agent_a.stop().await?;
            let mut agent_a = AgentProcess::start(&home_a, &url).await?;
            agent_a.expect("drained").await?;
            eprintln!(
                "second half of the traffic after the kills: {:?}",
                killed_at.elapsed()
            );

            // The surviving replica has everything acknowledged.
            let survivors = url.split(',').skip(1).collect::<Vec<_>>().join(",");
            let (head, messages, _) = stream_head(&survivors).await?;
            assert_eq!(messages, head, "no gap in the stream");
            r2.wait_applied(head).await?;
            assert_eq!(
                r2.flavor_names().await?,
                names,
                "every flavor created is in the view"
            );
            // Both hosts' discoveries of both sticks are in the stream (the two agents share
            // one testbed, so the view sees one serial lineage seen on two hosts), and the
            // view has both sticks.
            // (A JetStream API request can time out while the cluster elects a new meta
            // leader after the node's death: asked again until it answers.)
            let limit = head.to_string();
            let events = eventually(Duration::from_secs(60), || async {
                let (ok, out, err) = r2
                    .cli(&[
                        "events",
                        "tail",
                        "--from-start",
                        "--json",
                        "--limit",
                        &limit,
                    ])
                    .await
                    .ok()?;
                if !ok {
                    eprintln!("[cli] events tail: {}", err.trim());
                }
                ok.then_some(out)
            })
            .await?;
            for host in ["host-a", "host-b"] {
                for serial in ["TOPO0010", "TOPO0011"] {
                    assert!(
                        events.lines().any(|l| l.contains("DeviceDiscovered")
                            && l.contains(&format!("\"{host}\""))
                            && l.contains(serial)),
                        "no DeviceDiscovered of {serial} on {host} in the stream"
                    );
                }
            }
            let devs = r2.json(&["devices", "--json"]).await?.to_string();
            for serial in ["TOPO0010", "TOPO0011"] {
                assert!(devs.contains(serial), "the view lacks {serial}: {devs}");
            }
            drop((first, second));

            // The killed replica restarts on its view and consumer and catches up.
            let r1 = Replica::start(&c1).await?;
            r1.wait_applied(head).await?;
            assert_eq!(r1.flavor_names().await?, names);

            // A clean replay from sequence 1 agrees with both views.
            // A JetStream request that times out (the cluster still settling after the
            // node's loss) is asked again; a difference between the views fails at once.
            for r in [&r1, &r2] {
                let mut tries = 0;
                loop {
                    let (ok, out, err) = r.cli(&["replay", "--verify"]).await?;
                    if ok {
                        break;
                    }
                    tries += 1;
                    assert!(
                        err.contains("timed out") && tries < 5,
                        "replay --verify on {}: {out}{err}",
                        r.api
                    );
                    eprintln!("[cli] replay --verify: {}", err.trim());
                }
            }
            eprintln!("topology test done in {:?}", t0.elapsed());
            agent_a.stop().await?;
            agent_b.stop().await?;
            Ok(())
        },
    );
}
