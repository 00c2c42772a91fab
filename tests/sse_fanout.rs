//! Live events at scale: 2,000 idle dashboards on a real `usbpt serve` (real TCP, real
//! nats-server) cost the stream one consumer, not 2,000; a new agent (the real `usbpt agent`
//! under umockdev) still creates its consumer and publishes, and a new dashboard still sees its
//! events live; the client past the cap gets 503 with `Retry-After`; a client resuming from
//! old history uses a catch-up reader whose consumer goes away after it leaves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;
mod projector_support;

use std::time::Duration;

use agent_support::{host_recording, AgentHome, AgentProcess};
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use projector_support::Serve;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use usbpt_bus::Bus;
use usbpt_schemas::{Envelope, Event, HostAgentStarted, HostName};
use usbpt_testkit::umockdev::{umockdev_test, Testbed};
use usbpt_testkit::{eventually, TestNats};

const IDLE: usize = 2_000;
const WAIT: Duration = Duration::from_secs(30);

/// Each idle client holds a socket here and one in `serve` (which inherits the limit).
fn raise_open_files_limit(need: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < need {
        if hard < need {
            bail!("RLIMIT_NOFILE hard limit {hard} < {need}: this test needs {need} open files");
        }
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(())
}

/// A dashboard's connection, read by hand: the response head and SSE text as they arrive.
struct Client {
    tcp: TcpStream,
    text: String,
}

impl Client {
    async fn open(addr: &str, path: &str) -> Result<Self> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
                projector_support::API_TOKEN
            )
            .as_bytes(),
        )
        .await?;
        Ok(Self {
            tcp,
            text: String::new(),
        })
    }

    /// Reads until the text holds `needle`.
    async fn until(&mut self, needle: &str) -> Result<()> {
        let mut buf = [0u8; 8192];
        tokio::time::timeout(WAIT, async {
            while !self.text.contains(needle) {
                let n = self.tcp.read(&mut buf).await?;
                if n == 0 {
                    bail!("connection closed before {needle:?}; got {:?}", self.text);
                }
                self.text.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            Ok(())
        })
        .await
        .with_context(|| format!("{needle:?} not seen; got {:?}", self.text))?
    }
}

async fn consumers(bus: &Bus) -> Result<Vec<String>> {
    let mut names: Vec<String> = bus
        .stream()
        .consumer_names()
        .map(|n| n.map_err(anyhow::Error::from))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    names.sort();
    Ok(names)
}

/// `serve`'s resident memory (for the log: what 2,000 clients cost).
fn rss_kb(serve: &Serve) -> Result<u64> {
    let pid = serve.child.id().context("serve pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

async fn consumer_count(bus: &Bus) -> Result<usize> {
    let mut stream = bus.stream().clone();
    Ok(stream.info().await?.state.consumer_count)
}

#[test]
fn two_thousand_idle_dashboards_leave_room_for_a_new_agent() {
    umockdev_test(
        "two_thousand_idle_dashboards_leave_room_for_a_new_agent",
        || async {
            raise_open_files_limit(2 * IDLE as u64 + 1_000)?;
            let tb = Testbed::new()?;
            tb.add_recording(&host_recording()?)?;
            let nats = TestNats::start().await?;
            let bus = nats.bus().await?;
            let data = tempfile::tempdir()?;
            let cap = (IDLE + 1).to_string();
            let serve =
                Serve::start_with(&nats.url(), data.path(), &["--sse-max-clients", &cap]).await?;
            serve.commands_ready().await?;
            let addr = serve.api.trim_start_matches("http://").to_owned();
            // History older than the shared feed (which starts with the first dashboard).
            let early = bus
                .publish(&Envelope::new(Event::HostAgentStarted(HostAgentStarted {
                    host: HostName::new("early-host")?,
                    boot_id: "early-boot".into(),
                    agent_version: "0.1.0".into(),
                    hypervisor_uri: "test:///default".into(),
                })))
                .await?
                .sequence;
            serve.wait_applied(early).await?;
            let before = consumer_count(&bus).await?;
            eprintln!(
                "consumers before any dashboard: {before} {:?}",
                consumers(&bus).await?
            );

            let rss_before = rss_kb(&serve)?;
            // 2,000 dashboards connect and sit idle.
            let t0 = std::time::Instant::now();
            let idle: Vec<Client> = futures::stream::iter(0..IDLE)
                .map(|_| {
                    let addr = addr.clone();
                    async move {
                        let mut c = Client::open(&addr, "/v1/events").await?;
                        c.until("event: subscribed").await?;
                        Ok::<_, anyhow::Error>(c)
                    }
                })
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_>>()?;
            eprintln!(
                "{IDLE} idle SSE clients subscribed in {:?}; serve's resident memory {} kB (before: {rss_before} kB)",
                t0.elapsed(),
                rss_kb(&serve)?
            );
            assert!(idle.iter().all(|c| c.text.starts_with("HTTP/1.1 200")));
            let with_idle = consumer_count(&bus).await?;
            eprintln!(
                "consumers with {IDLE} dashboards: {with_idle} {:?}",
                consumers(&bus).await?
            );
            assert!(
                with_idle <= before + 1,
                "{IDLE} dashboards took {} consumers (before: {before})",
                with_idle - before
            );

            // One more dashboard (the last place under the cap), then a new agent joins.
            let mut watcher = Client::open(&addr, "/v1/events").await?;
            watcher.until("event: subscribed").await?;
            let home = AgentHome::new("late-host", "late-boot-1")?;
            let agent = AgentProcess::start(&home, &nats.url()).await?;
            watcher.until("event: HostAgentStarted").await?;
            watcher.until("\"host\":\"late-host\"").await?;
            watcher.until("event: DeviceDiscovered").await?;
            // The agent opens its control consumer beside publishing: awaited, not assumed.
            let mut agent = agent;
            agent.expect("listening").await?;
            let names = consumers(&bus).await?;
            assert!(
                names.iter().any(|n| n == "agent-late-host"),
                "the agent's consumer exists: {names:?}"
            );
            assert!(
                names.len() <= before + 2,
                "consumers: {names:?} (before the dashboards: {before})"
            );

            // Past the cap: a clear 503 with Retry-After, and nothing else leaks.
            let mut refused = Client::open(&addr, "/v1/events").await?;
            refused.until("\r\n\r\n").await?;
            assert!(refused.text.starts_with("HTTP/1.1 503"), "{}", refused.text);
            assert!(
                refused.text.to_ascii_lowercase().contains("retry-after: 5"),
                "{}",
                refused.text
            );
            refused.until("too many live-event clients").await?;
            let metrics = serve.get_text("/metrics").await?;
            for want in [
                format!("usbpt_sse_clients {}\n", IDLE + 1),
                format!("usbpt_sse_max_clients {}\n", IDLE + 1),
                "usbpt_sse_refused_total 1\n".to_owned(),
            ] {
                assert!(metrics.contains(&want), "/metrics lacks {want:?}");
            }

            // Idle clients leave: their places come back.
            drop(idle);
            // A dashboard asking for the whole history (older than the shared feed's window) gets
            // it through a catch-up reader, then the live feed.
            let mut resumer = eventually(WAIT, || async {
                let mut c = Client::open(&addr, "/v1/events?from=1").await.ok()?;
                c.until("\r\n\r\n").await.ok()?;
                c.text.starts_with("HTTP/1.1 200").then_some(c)
            })
            .await
            .context("a place under the cap after the idle clients left")?;
            resumer
                .until(&format!("id: {early}\nevent: HostAgentStarted"))
                .await?;
            resumer.until("\"host\":\"early-host\"").await?;
            resumer.until("\"host\":\"late-host\"").await?;
            let reading = consumer_count(&bus).await?;
            assert!(
                reading >= before + 3,
                "a catch-up reader ran: {reading} consumers (before the dashboards: {before})"
            );
            drop(resumer);
            // Its consumer is gone soon after its client left.
            let settled = eventually(Duration::from_secs(60), || async {
                let n = consumer_count(&bus).await.ok()?;
                (n <= before + 2).then_some(n)
            })
            .await
            .context("the catch-up reader's consumer was not removed")?;
            eprintln!(
                "consumers after the dashboards left: {settled} {:?}",
                consumers(&bus).await?
            );
            agent.stop().await?;
            drop(watcher);
            Ok(())
        },
    );
}
