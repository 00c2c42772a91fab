//! The agent checks its work (ADR 0005): with a real nats-server enforcing usbpt's generated
//! identities and libvirt's test driver, control work that is not signed by the command handler
//! — here a `Teardown` published by an identity that may write control subjects but is not the
//! command handler — is refused, logged and counted, and the running domain is untouched; the
//! command handler's own signed work is carried out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod libvirt_support;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use usbpt_agent::source::simulated;
use usbpt_agent::{AgentConfig, BusTarget, Filter, Progress};
use usbpt_bus::auth::Role;
use usbpt_bus::Bus;
use usbpt_libvirt::Executor;
use usbpt_schemas::{
    Envelope, Event, FlavorId, HostName, ServerAction, ServerActionRequested, ServerId,
    ServerScheduled,
};
use usbpt_testkit::TestNats;

const WAIT: Duration = Duration::from_secs(30);

/// Waits until the executor holds (or no longer holds) `server`'s domain.
async fn until_defined(exec: &Executor, server: ServerId, defined: bool) {
    tokio::time::timeout(WAIT, async {
        loop {
            if exec.servers().await.unwrap().contains(&server) == defined {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the domain's state");
}

async fn next_refusal(progress: &mut mpsc::UnboundedReceiver<Progress>) -> (String, u64) {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(Progress::WorkRefused {
                reason, refused, ..
            }) = progress.recv().await
            {
                return (reason, refused);
            }
        }
    })
    .await
    .expect("a refusal")
}

fn teardown(host: &HostName, server: ServerId) -> Envelope {
    Envelope::new(Event::ServerActionRequested(ServerActionRequested {
        server_id: server,
        host: host.clone(),
        action: ServerAction::Teardown,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_control_work_is_refused_and_signed_work_is_done() {
    let (nats, creds) = TestNats::start_secured(&["sim-1"]).await.unwrap();
    let admin: Bus = nats.bus_as(&creds, &Role::Admin).await.unwrap();
    let commands = nats.bus_as(&creds, &Role::Commands).await.unwrap();
    let host = HostName::new("sim-1").unwrap();
    let lv = libvirt_support::host("sim-1", &[]).await;
    let exec = Arc::new(lv.exec);

    let (tx, mut progress) = mpsc::unbounded_channel();
    let data = tempfile::tempdir().unwrap();
    let config = AgentConfig {
        host: host.clone(),
        boot_id: "boot-1".into(),
        hypervisor_uri: exec.uri().to_owned(),
        data_dir: data.path().to_owned(),
        filter: Filter::default(),
        bus: BusTarget {
            creds: Some(creds.path(&Role::Agent(host.clone()))),
            require_auth: true,
            control_key: commands.public_key(),
            ..BusTarget::new(nats.url())
        },
        progress: Arc::new(move |p: &Progress| {
            let _ = tx.send(p.clone());
        }),
        drain_on_stop: Duration::from_secs(2),
        flap: usbpt_agent::FlapSettings::default(),
    };
    let (_, devices) = simulated(Vec::new());
    let (stop, stopped) = oneshot::channel::<()>();
    let agent = tokio::spawn(usbpt_agent::run_with_executor(
        config,
        devices.source(),
        Some(Arc::clone(&exec)),
        async move {
            let _ = stopped.await;
        },
    ));

    // The command handler schedules a server here: signed, carried out.
    let server = ServerId::new_v7();
    commands
        .publish(&Envelope::new(Event::ServerScheduled(ServerScheduled {
            server_id: server,
            host: host.clone(),
            flavor_id: FlavorId::new_v7(),
            devices: Vec::new(),
        })))
        .await
        .unwrap();
    until_defined(&exec, server, true).await;

    // A Teardown from an identity that is not the command handler (the admin may write control
    // subjects; a misconfigured server might let others): signed by the wrong key.
    let before = usbpt_agent::guard::refused_total();
    admin.publish(&teardown(&host, server)).await.unwrap();
    let (reason, refused) = next_refusal(&mut progress).await;
    assert!(reason.contains("not the command handler's"), "{reason}");
    assert!(refused > before);
    // Unsigned (a plain core publish, as any NATS client would send it).
    let payload = usbpt_schemas::codec::encode(&teardown(&host, server)).unwrap();
    admin
        .jetstream()
        .publish(
            usbpt_schemas::subjects::control_for_host(&host, &server),
            payload.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let (reason, _) = next_refusal(&mut progress).await;
    assert!(reason.contains("not signed"), "{reason}");
    assert!(
        exec.servers().await.unwrap().contains(&server),
        "the forged teardowns left the domain alone"
    );

    // Work for another host on this host's subject (misrouted): refused too.
    let other = HostName::new("sim-2").unwrap();
    let mut misrouted = usbpt_schemas::codec::encode(&teardown(&other, server)).unwrap();
    let sig = usbpt_bus::auth::hex(
        &usbpt_bus::auth::read_seed(&creds.path(&Role::Commands))
            .unwrap()
            .sign(&misrouted)
            .unwrap(),
    );
    admin
        .publish_raw(
            &usbpt_schemas::subjects::control_for_host(&host, &server),
            std::mem::take(&mut misrouted),
            Some(&sig),
        )
        .await
        .unwrap();
    let (reason, _) = next_refusal(&mut progress).await;
    assert!(reason.contains("does not belong"), "{reason}");
    assert!(exec.servers().await.unwrap().contains(&server));

    // The command handler's own Teardown is carried out.
    commands.publish(&teardown(&host, server)).await.unwrap();
    until_defined(&exec, server, false).await;

    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}
