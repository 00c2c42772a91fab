//! The udev source against real libudev under umockdev: what it reads from the four recorded
//! devices, and what its monitor reports for hotplug.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use usbpt_agent::source::{self, SourceEvent};
use usbpt_agent::{Action, DeviceSource, Filter, Interface, Observation, UdevSource, UsbDevice};
use usbpt_schemas::{ProductId, UsbAddress, VendorId};
use usbpt_testkit::umockdev::{four_recordings, recorded, umockdev_test, Testbed, UsbDeviceSpec};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/umockdev")
}

fn find<'a>(devices: &'a [UsbDevice], syspath: &str) -> &'a UsbDevice {
    devices
        .iter()
        .find(|d| d.syspath == syspath)
        .unwrap_or_else(|| panic!("{syspath} not enumerated"))
}

#[test]
fn enumeration_reads_the_recorded_devices() {
    umockdev_test("enumeration_reads_the_recorded_devices", || async {
        let tb = Testbed::new()?;
        tb.add_recording(&four_recordings(&fixtures())?)?;
        let devices = source::enumerate()?;
        let mut names: Vec<String> = devices
            .iter()
            .map(|d| d.descriptors.port_path.to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "1-1",
                "1-1.5",
                "1-1.5.2",
                "1-1.5.2.3",
                "1-1.5.2.4",
                "1-1.5.4",
                "1-1.5.4.2",
                "3-2",
                "3-2.3",
                "usb1",
                "usb3"
            ]
        );

        let key = find(&devices, recorded::YUBIKEY);
        assert_eq!(
            (key.descriptors.vendor_id, key.descriptors.product_id),
            (VendorId(0x1050), ProductId(0x0120))
        );
        assert_eq!(key.descriptors.address, UsbAddress::new(3, 12)?);
        assert_eq!(
            key.descriptors.serial, None,
            "the YubiKey has no serial attribute"
        );
        assert_eq!(key.interfaces(), [Interface::new(3, 0, 0)]);
        assert_eq!(key.descriptors.vendor_db.as_deref(), Some("Yubico.com"));
        assert_eq!(
            key.descriptors.model_db.as_deref(),
            Some("Yubikey Touch U2F Security Key")
        );
        assert_eq!(key.descriptors.manufacturer.as_deref(), Some("Yubico"));
        assert_eq!(
            key.descriptors.product.as_deref(),
            Some("Security Key by Yubico")
        );
        assert_eq!(key.descriptors.speed.as_deref(), Some("12"));
        assert_eq!(
            key.descriptors.usb_version.as_deref(),
            Some("2.00"),
            "trimmed"
        );

        let phone = find(&devices, recorded::PHONE);
        assert_eq!(
            phone.descriptors.serial.as_deref(),
            Some("0123456789ABCDEF")
        );
        assert_eq!(
            phone.interfaces(),
            [Interface::new(0xff, 0xff, 0)],
            "from ID_USB_INTERFACES"
        );
        assert_eq!(phone.descriptors.address, UsbAddress::new(1, 24)?);

        let camera = find(&devices, recorded::CAMERA);
        assert_eq!(
            camera.descriptors.serial.as_deref(),
            Some("C767F1C714174C309255F70E4A7B2EE2")
        );
        assert_eq!(camera.interfaces(), [Interface::new(6, 1, 1)]);
        assert_eq!(
            camera.descriptors.manufacturer.as_deref(),
            Some("Canon Inc.")
        );
        assert_eq!(
            camera.descriptors.vendor_db, None,
            "not recorded for the camera"
        );

        let keyboard = find(&devices, recorded::KEYBOARD);
        assert_eq!(keyboard.interfaces()[0], Interface::new(3, 1, 1));
        assert_eq!(keyboard.descriptors.usb_version.as_deref(), Some("1.10"));

        let filter = Filter::default();
        let mut candidates: Vec<&str> = devices
            .iter()
            .filter(|d| filter.decide(d).is_candidate())
            .map(|d| d.syspath.as_str())
            .collect();
        candidates.sort();
        let mut expected = [recorded::CAMERA, recorded::PHONE, recorded::YUBIKEY];
        expected.sort();
        assert_eq!(candidates, expected);
        Ok(())
    });
}

/// The next observations (a loss report fails the test: nothing here overflows).
async fn next(source: &mut UdevSource) -> Result<Vec<Observation>> {
    match tokio::time::timeout(Duration::from_secs(10), source.next()).await {
        Ok(Ok(SourceEvent::Observed(obs))) => Ok(obs),
        Ok(Ok(SourceEvent::Lost(why))) => bail!("unexpected loss report: {why}"),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!("no observation within 10 s"),
    }
}

#[test]
fn the_monitor_reports_hotplug_of_usb_devices_only() {
    umockdev_test(
        "the_monitor_reports_hotplug_of_usb_devices_only",
        || async {
            let tb = Testbed::new()?;
            tb.add_recording(&four_recordings(&fixtures())?)?;
            let mut source = UdevSource::open()?;

            let stick = UsbDeviceSpec::new(recorded::HUB_3_2, "3-2.4", 3, 14, 0x0781, 0x5567)
                .serial("4C530001230101116155")
                .interface(8, 6, 0x50)
                .strings("SanDisk", "Cruzer Blade")
                .hwdb("SanDisk Corp.", "Cruzer Blade");
            // umockdev sends the interface's add, then the device's: only the device is observed.
            let path = tb.plug(&stick)?;
            let obs = next(&mut source).await?;
            let [Observation::Present {
                action: Action::Add,
                device,
            }] = obs.as_slice()
            else {
                bail!("expected one add, got {obs:?}")
            };
            assert_eq!(device.syspath, path);
            assert_eq!(device.descriptors.address, UsbAddress::new(3, 14)?);
            assert_eq!(device.interfaces(), [Interface::new(8, 6, 0x50)]);
            assert_eq!(
                device.descriptors.vendor_db.as_deref(),
                Some("SanDisk Corp.")
            );
            assert_eq!(
                device.descriptors.serial.as_deref(),
                Some("4C530001230101116155")
            );

            // Unplugged, plugged back at the same place with a new devnum, unplugged again.
            let removed = |devnum| Observation::Removed {
                syspath: path.clone(),
                address: UsbAddress::new(3, devnum).ok(),
            };
            tb.unplug(&path)?;
            assert_eq!(next(&mut source).await?, [removed(14)]);
            tb.plug(&stick.renumbered(15))?;
            let obs = next(&mut source).await?;
            assert!(
                matches!(obs.as_slice(), [Observation::Present { action: Action::Add, device }] if device.descriptors.address == UsbAddress::new(3, 15)?),
                "{obs:?}"
            );
            tb.unplug(&path)?;
            assert_eq!(next(&mut source).await?, [removed(15)]);

            // Plugged and pulled before the source reads it: sysfs no longer has it, so the add is
            // described from the event's own properties (what udevd recorded), then its remove.
            tb.plug(&stick.renumbered(16))?;
            tb.unplug(&path)?;
            tb.plug(&stick.renumbered(17))?;
            let mut seen = Vec::new();
            while seen.len() < 3 {
                seen.extend(next(&mut source).await?);
            }
            let Observation::Present { device: gone, .. } = &seen[0] else {
                bail!("expected the add of devnum 16, got {seen:?}")
            };
            assert_eq!(gone.descriptors.address, UsbAddress::new(3, 16)?);
            assert_eq!(
                gone.descriptors.serial.as_deref(),
                Some("4C530001230101116155")
            );
            assert_eq!(gone.interfaces(), [Interface::new(8, 6, 0x50)]);
            assert_eq!(gone.descriptors.manufacturer.as_deref(), Some("SanDisk"));
            assert_eq!(gone.descriptors.product.as_deref(), Some("Cruzer Blade"));
            assert_eq!(gone.descriptors.speed, None, "not in the event");
            assert_eq!(seen[1], removed(16));
            assert!(
                matches!(&seen[2], Observation::Present { device, .. } if device.descriptors.address.devnum() == 17 && device.descriptors.speed.as_deref() == Some("480")),
                "{seen:?}"
            );

            // A recorded device (loaded before the monitor opened) can be unplugged too.
            tb.unplug(recorded::YUBIKEY)?;
            let obs = next(&mut source).await?;
            assert_eq!(obs.len(), 1, "{obs:?}");
            assert_eq!(obs[0].syspath(), recorded::YUBIKEY);
            assert!(
                matches!(obs[0], Observation::Removed { address: Some(a), .. } if a == UsbAddress::new(3, 12)?)
            );
            Ok(())
        },
    );
}
