//! The host agent's libvirt executor in a child process (ADR 0016): `usbpt agent-executor`
//! started for work, stopped when idle and started again for the next work; a child that dies
//! in the middle of work is replaced and the work carried out, and work no child could carry
//! out is reported as failed — never dropped. Against libvirt's test driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use usbpt_agent::libvirt::protocol::{frame, Reply};
use usbpt_agent::libvirt::{
    test_driver_uri, ChildExecutor, DeviceInfo, DeviceMap, ExecutorCommand, Hands,
};
use usbpt_schemas::{
    AssignedDevice, ControllerModel, DeviceId, Envelope, Event, FlavorId, FollowPolicy, HostName,
    LineageId, ProductId, ServerId, ServerScheduled, ServerState, UsbAddress, VendorId,
};

const LIMIT: Duration = Duration::from_secs(120);

/// The usbpt binary the child runs (`USBPT_EXECUTOR_BIN` measures another build, e.g. release).
fn usbpt() -> PathBuf {
    std::env::var_os("USBPT_EXECUTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_usbpt")))
}

struct Fixture {
    dir: tempfile::TempDir,
    host: HostName,
    uri: String,
    devices: DeviceMap,
    ids: Vec<(DeviceId, LineageId)>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.xml");
    std::fs::write(
        &node,
        "<?xml version=\"1.0\"?>\n<node>\n  <cpu><mhz>2400</mhz><model>x86_64</model><active>2</active><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>\n  <memory>8388608</memory>\n</node>\n",
    )
    .unwrap();
    let mut devices = HashMap::new();
    let mut ids = Vec::new();
    for n in 0..2u16 {
        let id = DeviceId::new_v7();
        devices.insert(
            id,
            DeviceInfo {
                vendor: VendorId(0x1050),
                product: ProductId(0x0400 + n),
                address: UsbAddress::new(1, n + 2).unwrap(),
                present: true,
                fingerprint: None,
            },
        );
        ids.push((id, LineageId::from_uuid(uuid::Uuid::new_v4())));
    }
    Fixture {
        uri: test_driver_uri(&node).unwrap(),
        dir,
        host: HostName::new("exec-host").unwrap(),
        devices,
        ids,
    }
}

impl Fixture {
    fn command(&self) -> ExecutorCommand {
        let mut c = ExecutorCommand::usbpt(usbpt(), &self.host, &self.uri);
        c.args.extend(["--config".into(), "/dev/null".into()]);
        c
    }

    /// `sh -c SCRIPT` in place of the child: the first start says it is ready, takes one byte
    /// of the request and dies (exit 3); later starts are the real `usbpt agent-executor`,
    /// unless `always` (then every start dies so).
    fn crashing_command(&self, always: bool) -> ExecutorCommand {
        let dir = self.dir.path();
        std::fs::write(
            dir.join("ready.bin"),
            frame(&Reply::Ready {
                domain_type: "kvm".into(),
            })
            .unwrap(),
        )
        .unwrap();
        let marker = if always {
            "/nonexistent/never"
        } else {
            "$D/crashed"
        };
        let script = format!(
            r#"D='{dir}'; if [ -e "{marker}" ]; then exec '{usbpt}' "$@"; fi; touch "$D/crashed"; cat "$D/ready.bin"; head -c 1 >/dev/null; exit 3"#,
            dir = dir.display(),
            usbpt = usbpt().display(),
        );
        let real = self.command();
        let mut args: Vec<std::ffi::OsString> = vec!["-c".into(), script.into(), "sh".into()];
        args.extend(real.args);
        ExecutorCommand {
            program: "/bin/sh".into(),
            args,
            envs: Vec::new(),
        }
    }

    fn scheduled(&self, server: ServerId) -> Envelope {
        Envelope::new(Event::ServerScheduled(ServerScheduled {
            server_id: server,
            host: self.host.clone(),
            flavor_id: FlavorId::new_v7(),
            devices: self
                .ids
                .iter()
                .map(|(id, lineage)| AssignedDevice {
                    request_index: 0,
                    device_id: *id,
                    lineage_id: *lineage,
                    controller: ControllerModel::Xhci,
                    follow: FollowPolicy::Lineage,
                })
                .collect(),
        }))
    }
}

fn state(events: &[Event]) -> (ServerState, String) {
    let s: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::ServerStateChanged(s) => Some((s.state, s.detail.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(s.len(), 1, "one ServerStateChanged in {events:#?}");
    s.into_iter().next().unwrap()
}

fn count(events: &[Event], kind: &str) -> usize {
    events.iter().filter(|e| e.kind() == kind).count()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executor_process_stops_when_idle_and_starts_again_for_work() {
    tokio::time::timeout(LIMIT, async {
        let f = fixture();
        let child = ChildExecutor::new(f.host.clone(), f.command(), Duration::from_millis(500));
        assert_eq!(child.pid().await, None, "nothing runs before there is work");

        // Work for another host asks nothing of libvirt: no child.
        let mut other = f.scheduled(ServerId::new_v7());
        if let Event::ServerScheduled(s) = &mut other.body {
            s.host = HostName::new("elsewhere").unwrap();
        }
        assert!(child.handle(&other, &f.devices).await.is_empty());
        assert_eq!(child.starts(), 0);

        let events = child
            .handle(&f.scheduled(ServerId::new_v7()), &f.devices)
            .await;
        assert_eq!(state(&events).0, ServerState::Active, "{events:#?}");
        assert_eq!(count(&events, "DeviceAttached"), 2, "{events:#?}");
        let first = child.pid().await.expect("the child runs after work");
        assert!(alive(first));
        assert_eq!(child.starts(), 1);

        // Idle: the child is told to go (its stdin closed) and is reaped.
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.pid().await.is_some() || alive(first) {
            assert!(Instant::now() < deadline, "the idle child did not exit");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The next work starts a new one.
        let events = child
            .handle(&f.scheduled(ServerId::new_v7()), &f.devices)
            .await;
        assert_eq!(state(&events).0, ServerState::Active, "{events:#?}");
        let second = child.pid().await.expect("a new child for the new work");
        assert_ne!(first, second);
        assert_eq!(child.starts(), 2);
        child.stop().await;
        assert!(!alive(second), "stop waits for the child");
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_lost_in_the_middle_of_work_is_replaced_and_the_work_carried_out() {
    tokio::time::timeout(LIMIT, async {
        let f = fixture();
        let child = ChildExecutor::new(
            f.host.clone(),
            f.crashing_command(false),
            Duration::from_secs(30),
        );
        let events = child
            .handle(&f.scheduled(ServerId::new_v7()), &f.devices)
            .await;
        assert_eq!(child.starts(), 2, "the lost child was replaced once");
        assert_eq!(state(&events).0, ServerState::Active, "{events:#?}");
        assert_eq!(count(&events, "DeviceAttached"), 2, "{events:#?}");
        child.stop().await;
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_no_child_could_carry_out_is_reported_as_failed() {
    tokio::time::timeout(LIMIT, async {
        let f = fixture();
        let child = ChildExecutor::new(
            f.host.clone(),
            f.crashing_command(true),
            Duration::from_secs(30),
        );
        let server = ServerId::new_v7();
        let events = child.handle(&f.scheduled(server), &f.devices).await;
        assert_eq!(child.starts(), 2, "tried on a second child");
        let (s, detail) = state(&events);
        assert_eq!(s, ServerState::Error, "{events:#?}");
        assert!(detail.contains("executor process was lost"), "{detail}");
        assert_eq!(count(&events, "DeviceAttachFailed"), 2, "{events:#?}");
        assert!(events.iter().all(|e| match e {
            Event::ServerStateChanged(c) => c.server_id == server && c.reported_by_agent,
            Event::DeviceAttachFailed(a) => a.server_id == server,
            _ => false,
        }));
        // The next work tries a child again (and fails again, reported again).
        let events = child.handle(&f.scheduled(server), &f.devices).await;
        assert_eq!(state(&events).0, ServerState::Error);
        assert_eq!(child.starts(), 4);
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hypervisor_the_child_cannot_reach_is_said_at_start() {
    tokio::time::timeout(LIMIT, async {
        let f = fixture();
        let command = ExecutorCommand::usbpt(usbpt(), &f.host, "test:///nonexistent/node.xml");
        let child = ChildExecutor::new(f.host.clone(), command, Duration::from_secs(30));
        let err = child.start().await.expect_err("no such node file");
        assert!(err.to_string().contains("cannot reach libvirt"), "{err}");
        assert_eq!(child.pid().await, None);
    })
    .await
    .expect("within the limit");
}

/// The price of stopping the child when idle: the first work after it pays for a process
/// start and a libvirt connection. Measured, not asserted (`docs/performance.md`); run with
/// `--nocapture`, and `USBPT_EXECUTOR_BIN=target/release/usbpt` for the release figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_work_after_idle_latency() {
    tokio::time::timeout(LIMIT, async {
        let f = fixture();
        let child = ChildExecutor::new(f.host.clone(), f.command(), Duration::from_millis(300));
        let mut cold = Vec::new();
        let mut warm = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let events = child.handle(&f.scheduled(ServerId::new_v7()), &f.devices).await;
            cold.push(t.elapsed());
            assert_eq!(state(&events).0, ServerState::Active);
            let t = Instant::now();
            let events = child.handle(&f.scheduled(ServerId::new_v7()), &f.devices).await;
            warm.push(t.elapsed());
            assert_eq!(state(&events).0, ServerState::Active);
            let pid = child.pid().await.expect("running");
            while alive(pid) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        cold.sort();
        warm.sort();
        println!(
            "boot work on libvirt's test driver through the executor process ({}): first after idle (start + connect + work) min {:?} median {:?} max {:?}; child running min {:?} median {:?} max {:?}",
            usbpt().display(),
            cold[0],
            cold[2],
            cold[4],
            warm[0],
            warm[2],
            warm[4]
        );
        assert_eq!(child.starts(), 5);
    })
    .await
    .expect("within the limit");
}
