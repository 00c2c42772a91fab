//! The generated identities against a real nats-server enforcing them (ADR 0005): every forged
//! input from host-a's credentials is refused by the server, and every role can still do its
//! own work.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../schemas/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use usbpt_bus::auth::{self, Role};
use usbpt_bus::{Bus, StreamSettings};
use usbpt_schemas::heartbeat::Heartbeat;
use usbpt_schemas::{subjects, Envelope, Event};
use usbpt_testkit::TestNats;

fn body(kind: &str) -> Event {
    common::sample_bodies()
        .into_iter()
        .find(|b| b.kind() == kind)
        .expect("a sample of every kind")
}

/// A host-a `DeviceDiscovered` (the samples are host-b's).
fn own_device() -> Envelope {
    let mut b = body("DeviceDiscovered");
    if let Event::DeviceDiscovered(d) = &mut b {
        d.host = common::host("host-a");
    }
    Envelope::new(b)
}

fn agent(h: &str) -> Role {
    Role::Agent(common::host(h))
}

/// A publish must fail and store nothing.
async fn refused(bus: &Bus, admin: &Bus, env: Envelope) -> Result<()> {
    let before = admin.last_sequence().await?;
    let r = bus.publish(&env).await;
    assert!(
        r.is_err(),
        "{} on {} was stored",
        env.body.kind(),
        subjects::for_event(&env)
    );
    assert_eq!(admin.last_sequence().await?, before);
    Ok(())
}

#[tokio::test]
async fn host_a_credentials_cannot_forge_anything() -> Result<()> {
    let (nats, creds) = TestNats::start_secured(&["host-a", "host-b"]).await?;
    let r = forgeries(&nats, &creds).await;
    if r.is_err() {
        eprintln!("{}", nats.log());
    }
    r
}

async fn forgeries(nats: &TestNats, creds: &usbpt_bus::auth::CredsDir) -> Result<()> {
    // Anonymous clients are refused outright.
    assert!(Bus::connect(&nats.url(), None, &StreamSettings::default())
        .await
        .is_err());
    let admin = nats.bus_as(creds, &Role::Admin).await?;
    assert!(admin.server_info().auth_required);
    let a = nats.bus_as(creds, &agent("host-a")).await?;

    // Its own events are fine, and so is asking whether one is stored.
    let own = own_device();
    a.publish(&own).await?;
    assert!(a
        .last_message_id(&subjects::for_event(&own))
        .await?
        .is_some());

    // host-b's subjects, claim, flavor, server and control subjects: refused by the server.
    let forged = [
        Envelope::new(body("DeviceDiscovered")),
        Envelope::new(body("HostAgentStarted")),
        Envelope::new(body("DeviceClaimed")),
        Envelope::new(body("FlavorCreated")),
        Envelope::new(body("ServerBootRequested")),
        Envelope::new(body("ServerActionRequested")),
    ];
    let mut ctl_a = body("ServerActionRequested");
    if let Event::ServerActionRequested(e) = &mut ctl_a {
        e.host = common::host("host-a");
    }
    let checks = forged
        .into_iter()
        .chain([Envelope::new(ctl_a)])
        .map(|env| refused(&a, &admin, env));
    for r in futures::future::join_all(checks).await {
        r?;
    }

    // Each refusal below ends in a request timeout (the server drops a forbidden publish), so
    // they run at once.
    let b_ctl = subjects::control_for_host_all(&common::host("host-b"));
    let js = a.jetstream();
    let mut weaker = StreamSettings::default().config();
    weaker.deny_delete = false;
    let (cmd, own_name, snoop, ordered, delete, update, purge) = tokio::join!(
        // A command request (an unauthenticated `usbpt.cmd.delete` deleted a server on main).
        tokio::time::timeout(
            Duration::from_secs(10),
            a.request(subjects::command("delete"), b"{}".to_vec()),
        ),
        // Reading host-b's control work, or everything.
        a.pull_consumer("agent-host-a", Some(b_ctl), 0),
        a.pull_consumer("snoop", None, 0),
        a.reader(usbpt_bus::StartAt::Beginning, None),
        // The audit trail: neither deleting nor changing nor purging the stream.
        js.delete_stream(subjects::STREAM),
        js.update_stream(weaker),
        a.stream().purge(),
    );
    assert!(cmd.map_or(true, |r| r.is_err()), "a command was answered");
    assert!(own_name.is_err(), "host-a read host-b's control work");
    assert!(snoop.is_err() && ordered.is_err(), "host-a read the stream");
    assert!(delete.is_err() && update.is_err() && purge.is_err());
    assert!(admin.last_sequence().await? >= 1);
    Ok(())
}

#[tokio::test]
async fn each_role_does_its_own_work_and_no_more() -> Result<()> {
    let (nats, creds) = TestNats::start_secured(&["host-a"]).await?;
    let r = own_work(&nats, &creds).await;
    if r.is_err() {
        eprintln!("{}", nats.log());
    }
    r
}

async fn own_work(nats: &TestNats, creds: &usbpt_bus::auth::CredsDir) -> Result<()> {
    let admin = nats.bus_as(creds, &Role::Admin).await?;
    let commands = nats.bus_as(creds, &Role::Commands).await?;
    let projector = nats.bus_as(creds, &Role::Projector).await?;
    let auditor = nats.bus_as(creds, &Role::Auditor).await?;
    let a = nats.bus_as(creds, &agent("host-a")).await?;

    // The command handler appends control work for host-a, fenced claims, flavors; never a
    // host's events, never the stream's config.
    let mut work = body("ServerActionRequested");
    if let Event::ServerActionRequested(e) = &mut work {
        e.host = common::host("host-a");
    }
    let work = Envelope::new(work);
    commands.publish(&work).await?;
    let claim = Envelope::new(body("DeviceClaimed"));
    let subject = subjects::for_event(&claim);
    let expected = commands.last_subject_sequence(&subject).await?;
    commands.publish_fenced(&claim, expected).await?;
    refused(&commands, &admin, own_device()).await?;
    assert!(commands
        .jetstream()
        .delete_stream(subjects::STREAM)
        .await
        .is_err());

    // host-a's agent receives its work on its own consumer, signed by the command handler.
    let consumer = a
        .pull_consumer(
            &subjects::agent_consumer(&common::host("host-a")),
            Some(subjects::control_for_host_all(&common::host("host-a"))),
            0,
        )
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(5))
        .messages()
        .await?;
    let msg = batch
        .next()
        .await
        .expect("the work")
        .map_err(anyhow::Error::msg)?;
    assert_eq!(msg.subject.as_str(), subjects::for_event(&work));
    let sig = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(auth::SIGNATURE_HEADER))
        .map(|v| v.as_str().to_owned())
        .expect("signed");
    let signer = commands.public_key().expect("an nkey identity");
    assert!(auth::verify(&signer, &msg.payload, &sig));
    assert!(!auth::verify(
        &a.public_key().expect("nkey"),
        &msg.payload,
        &sig
    ));
    msg.ack().await.map_err(anyhow::Error::msg)?;

    // Readers read everything and publish nothing.
    for reader in [&projector, &auditor] {
        let mut all = reader.reader(usbpt_bus::StartAt::Beginning, None).await?;
        let first = tokio::time::timeout(Duration::from_secs(5), all.next()).await??;
        assert_eq!(first.seq, 1);
        refused(reader, &admin, own_device()).await?;
        refused(reader, &admin, Envelope::new(body("FlavorCreated"))).await?;
        // A dashboard's catch-up reader (the API serves live events as the projector).
        let mut catch_up = reader
            .reader_with(
                usbpt_bus::StartAt::Sequence(1),
                None,
                usbpt_bus::ReaderOptions {
                    inactive: Duration::from_secs(5),
                    ..Default::default()
                },
            )
            .await?;
        let first = tokio::time::timeout(Duration::from_secs(5), catch_up.next()).await??;
        assert_eq!(first.seq, 1);
    }
    // Heartbeats (core NATS, ADR 0008): host-a beats on its own subject only; the readers see
    // it. The forged beat for host-b goes first: the server drops it, so host-a's own beat,
    // published after it on the same connection, is the first to arrive.
    // `Bus::heartbeats` returns once the server holds the subscription (a request on the same
    // connection after the SUB), so host-a (another connection) publishes after it.
    let mut beats = projector.heartbeats().await?;
    let alive = Heartbeat::Alive {
        interval: Duration::from_millis(2000),
    };
    a.beat(&common::host("host-b"), &alive).await?;
    a.beat(&common::host("host-a"), &alive).await?;
    let first = tokio::time::timeout(Duration::from_secs(5), beats.next())
        .await?
        .expect("a beat");
    assert_eq!(first.host, common::host("host-a"));

    let durable = projector.pull_consumer("usbpt-projector", None, 0).await?;
    assert!(durable.cached_info().config.filter_subject.is_empty());

    // Only the admin may delete the stream (and it can: the refusals above are permissions).
    admin.jetstream().delete_stream(subjects::STREAM).await?;
    Ok(())
}

#[tokio::test]
async fn a_revoked_identity_is_refused_after_a_reload() -> Result<()> {
    let (mut nats, creds) = TestNats::start_secured(&["host-a", "host-b"]).await?;
    // Only the admin may create the stream: the others find it.
    nats.bus_as(&creds, &Role::Admin).await?;
    nats.bus_as(&creds, &agent("host-b")).await?;
    let seed = std::fs::read(creds.path(&agent("host-b")))?;
    creds.revoke(&agent("host-b"))?;
    creds.write_auth_conf()?;
    nats.server().reload()?;
    let stolen = creds.dir().join("stolen.seed");
    auth::write_private(&stolen, &seed)?;
    // The reload is asynchronous: wait until the server refuses the revoked key.
    let mut refused = false;
    for _ in 0..50 {
        if Bus::connect(&nats.url(), Some(&stolen), &StreamSettings::default())
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "host-b's revoked key still connects");
    nats.bus_as(&creds, &agent("host-a")).await?;
    assert!(creds.revoke(&Role::Admin).is_err());
    Ok(())
}
