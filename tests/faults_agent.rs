//! `usbpt agent` SIGKILLed again and again while devices change — in the middle of a burst of
//! hotplugs, and with devices leaving and arriving while it is dead — with a projector folding
//! throughout. Every restart reconciles: the history has no event twice, what left while the
//! agent was dead is invalidated as such, the stream and the view show exactly what a fresh
//! enumeration sees, and the view equals a clean replay. Real libudev under umockdev, real
//! nats-server, the real binary, real redb files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_support;
mod faults_support;

use std::collections::BTreeSet;

use agent_support::*;
use faults_support::LiveProjector;
use usbpt_agent::source;
use usbpt_agent::Filter;
use usbpt_schemas::{Event, HostName, InvalidationReason};
use usbpt_testkit::umockdev::{recorded, umockdev_test, Testbed, UsbDeviceSpec};
use usbpt_testkit::TestNats;

const ROUNDS: u16 = 4;

/// A USB stick at port 3-2.`port` (behind the YubiKey's hub), plugged as devnum `devnum`.
fn stick(port: u16, devnum: u16) -> UsbDeviceSpec {
    UsbDeviceSpec::new(
        recorded::HUB_3_2,
        &format!("3-2.{port}"),
        3,
        devnum,
        0x0781,
        0x5567,
    )
    .serial(&format!("4C53000{port:03}"))
    .strings("SanDisk", "Cruzer Blade")
}

#[test]
fn the_agent_sigkilled_repeatedly_while_devices_change_loses_and_doubles_nothing() {
    umockdev_test(
        "the_agent_sigkilled_repeatedly_while_devices_change_loses_and_doubles_nothing",
        || async {
            let tb = Testbed::new()?;
            tb.add_recording(&host_recording()?)?;
            let nats = TestNats::start().await?;
            let bus = nats.bus().await?;
            let projector = LiveProjector::start(&nats.url()).await?;
            let home = AgentHome::new("host-a", "boot-1")?;
            let mut agent = AgentProcess::start(&home, &nats.url()).await?;
            agent.expect("drained").await?;

            let mut keepers = Vec::new();
            let mut newcomers = Vec::new();
            for round in 0..ROUNDS {
                // A stick the agent sees and publishes before it dies.
                let keeper = tb.plug(&stick(40 + round, 100 + round))?;
                agent.expect("drained").await?;
                keepers.push(keeper.clone());
                // A burst it is in the middle of when SIGKILL comes.
                for i in 0..6u16 {
                    let path = tb.plug(&stick(10 + i % 5, 2 + round * 20 + i))?;
                    tb.unplug(&path)?;
                }
                agent.crash().await?;
                // While it is dead, the keeper leaves and a newcomer arrives.
                tb.unplug(&keeper)?;
                newcomers.push(tb.plug(&stick(50 + round, 110 + round))?);
                agent = AgentProcess::start(&home, &nats.url()).await?;
                agent.expect("drained").await?;
            }

            // What a fresh enumeration sees now, through the same reading and filter.
            let filter = Filter::default();
            let fresh: BTreeSet<(String, u16, u16, Option<String>)> = source::enumerate()?
                .into_iter()
                .filter(|d| filter.decide(d).is_candidate())
                .map(|d| {
                    (
                        d.syspath,
                        d.descriptors.address.bus(),
                        d.descriptors.address.devnum(),
                        d.descriptors.serial,
                    )
                })
                .collect();
            assert_eq!(
                fresh.len(),
                3 + usize::from(ROUNDS),
                "the recorded candidates and the newcomers"
            );
            let mut log = StreamLog::open(&bus).await?;
            let picture = |events: &[usbpt_schemas::Envelope]| -> BTreeSet<(String, u16, u16, Option<String>)> {
                live(events)
                    .into_values()
                    .map(|d| (d.syspath, d.descriptors.address.bus(), d.descriptors.address.devnum(), d.descriptors.serial))
                    .collect()
            };
            // The last run drained: everything it will ever publish is stored.
            let head = bus.last_sequence().await?;
            log.until(&format!("{head} events"), |e| e.len() as u64 >= head)
                .await?;
            let events = log.envelopes();
            assert_eq!(
                picture(&events),
                fresh,
                "the stream's picture is the host's"
            );
            check_history(&events)?;
            assert_eq!(
                count(&events, "HostAgentStarted"),
                1 + usize::from(ROUNDS),
                "one start per run"
            );
            // What changed while the agent was dead is in the history, as such.
            for keeper in &keepers {
                let d = discovered(&events)
                    .into_iter()
                    .find(|d| &d.syspath == keeper)
                    .unwrap_or_else(|| panic!("keeper {keeper} was never discovered"));
                let ended: Vec<_> = invalidated(&events)
                    .into_iter()
                    .filter(|i| i.device_id == d.device_id)
                    .collect();
                assert_eq!(ended.len(), 1, "keeper {keeper} invalidated once");
                assert_eq!(ended[0].reason, InvalidationReason::VanishedWhileAgentDown);
            }
            for n in &newcomers {
                assert!(
                    fresh.iter().any(|(path, ..)| path == n),
                    "newcomer {n} is present"
                );
            }
            assert!(events
                .iter()
                .all(|e| !matches!(&e.body, Event::DeviceClashDetected(_))));

            // The view folded through all of it: it shows the same devices and equals a replay.
            assert_eq!(
                projector.caught_up(&bus).await?,
                events.len() as u64,
                "nothing was stored after the last drain"
            );
            assert_eq!(projector.present(&HostName::new("host-a")?)?, fresh);
            projector.assert_equals_replay(&bus).await?;
            agent.stop().await?;
            projector.stop().await?;
            Ok(())
        },
    );
}
