#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Given a view / when `label_lineage` / then a `LineageLabeled` or a rejection naming `label`.
//! The in-memory view exists only for this pure unit test of the decision.

use std::collections::BTreeMap;

use usbpt_commands::decide::Reply;
use usbpt_commands::schedule::Weigh;
use usbpt_commands::*;
use usbpt_schemas::commands::{Command, RejectKind};
use usbpt_schemas::*;

/// A view that knows one enumeration of one lineage, and nothing else.
struct OneDevice(DeviceInfo);

impl ViewRead for OneDevice {
    fn flavor_by_name(&self, _: &FlavorName) -> Result<Option<FlavorInfo>, ViewError> {
        Ok(None)
    }
    fn flavor_by_id(&self, _: &FlavorId) -> Result<Option<FlavorInfo>, ViewError> {
        Ok(None)
    }
    fn server_by_name(&self, _: &ServerName) -> Result<Option<ServerInfo>, ViewError> {
        Ok(None)
    }
    fn server_by_id(&self, _: &ServerId) -> Result<Option<ServerInfo>, ViewError> {
        Ok(None)
    }
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceInfo>, ViewError> {
        Ok((self.0.device_id == *id).then(|| self.0.clone()))
    }
    fn current_enumeration(&self, l: &LineageId) -> Result<Option<DeviceInfo>, ViewError> {
        Ok((self.0.lineage_id == *l).then(|| self.0.clone()))
    }
    fn free_devices_matching(
        &self,
        _: VendorId,
        _: ProductId,
        _: Option<&str>,
    ) -> Result<BTreeMap<HostName, Vec<DeviceInfo>>, ViewError> {
        Ok(BTreeMap::new())
    }
    fn claim(&self, _: &LineageId) -> Result<Option<ClaimInfo>, ViewError> {
        Ok(None)
    }
    fn subject_seq(&self, _: &str) -> Result<u64, ViewError> {
        Ok(0)
    }
    fn host_known(&self, h: &HostName) -> Result<bool, ViewError> {
        Ok(self.0.host == *h)
    }
    fn lineage_alarms(&self, _: &LineageId) -> Result<LineageAlarms, ViewError> {
        Ok(LineageAlarms::default())
    }
}

fn ctx() -> Ctx {
    Ctx {
        server_id: ServerId(uuid::Uuid::from_u128(7)),
        flavor_id: FlavorId(uuid::Uuid::from_u128(8)),
        weigh: Weigh::Pack,
        lane: 0,
    }
}

#[test]
fn a_label_is_recorded_removed_validated_and_needs_a_known_lineage() {
    let lineage = LineageId(uuid::Uuid::from_u128(1001));
    let v = OneDevice(DeviceInfo {
        device_id: DeviceId(uuid::Uuid::from_u128(1)),
        lineage_id: lineage,
        lineage_kind: LineageKind::Serial,
        host: HostName::new("host-a").unwrap(),
        vendor_id: VendorId(0x136b),
        product_id: ProductId(3),
        serial: Some("A".into()),
        address: UsbAddress::new(2, 3).unwrap(),
        status: DeviceStatus::Available,
        holder: None,
    });
    let label = |lineage, label: Option<&str>| Command::LabelLineage {
        lineage,
        label: label.map(str::to_owned),
    };
    for want in [Some("ERP key #3"), None] {
        let d = decide(&v, &label(lineage, want), &ctx()).unwrap();
        assert!(matches!(d.reply, Reply::Accepted(_)), "{:?}", d.reply);
        match &d.steps[..] {
            [step] => {
                assert_eq!(
                    step.event,
                    Event::LineageLabeled(LineageLabeled {
                        lineage_id: lineage,
                        label: want.map(str::to_owned),
                    })
                );
                assert_eq!(
                    subjects::for_body(&step.event),
                    format!("usbpt.evt.lineage.{lineage}")
                );
                assert!(!subjects::is_fenced(&subjects::for_body(&step.event)));
            }
            other => panic!("{other:?}"),
        }
    }
    for bad in ["", " padded", "a\x1b[31mred", &"x".repeat(65)] {
        let e = decide(&v, &label(lineage, Some(bad)), &ctx()).unwrap_err();
        assert_eq!(e.kind(), RejectKind::Invalid, "{bad:?}");
        assert!(e.to_string().starts_with("label: "), "{e}");
    }
    let unknown = LineageId(uuid::Uuid::from_u128(9));
    let e = decide(&v, &label(unknown, Some("x")), &ctx()).unwrap_err();
    assert_eq!(e.kind(), RejectKind::NotFound);
    assert!(e.to_string().contains(&unknown.to_string()), "{e}");
    // A device id given for a lineage: 404 naming the device's lineage.
    let e = decide(
        &v,
        &label(LineageId(uuid::Uuid::from_u128(1)), Some("x")),
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), RejectKind::NotFound);
    assert!(
        e.to_string().contains(&format!("its lineage is {lineage}")),
        "{e}"
    );
    // Commands travel as JSON: a label and its removal.
    let json = format!(r#"{{"command":"label_lineage","lineage":"{lineage}","label":null}}"#);
    assert_eq!(
        serde_json::from_str::<Command>(&json).unwrap(),
        label(lineage, None)
    );
}
