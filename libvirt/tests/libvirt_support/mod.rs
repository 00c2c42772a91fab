//! Shared by the libvirt tests: a node description for libvirt's test driver in a temp dir, an
//! executor on it that validates every domain XML it generates, and device fixtures.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use usbpt_libvirt::{
    test_driver_uri, DeviceInfo, DeviceLookup, Executor, ExecutorConfig, XmlValidator,
};
use usbpt_schemas::{
    AssignedDevice, ControllerModel, DeviceId, Event, FollowPolicy, HostName, LineageId, ProductId,
    ServerId, ServerName, ServerState, UsbAddress, VendorId,
};

/// Every test is bounded: libvirt's test driver answers in microseconds.
pub const LIMIT: Duration = Duration::from_secs(60);

/// A USB device on the fake host.
#[derive(Debug, Clone, Copy)]
pub struct Dev {
    pub id: DeviceId,
    pub lineage: LineageId,
    pub info: DeviceInfo,
}

pub fn dev(n: u16) -> Dev {
    Dev {
        id: DeviceId::new_v7(),
        lineage: LineageId::from_uuid(uuid::Uuid::new_v4()),
        info: DeviceInfo {
            vendor: VendorId(0x1050),
            product: ProductId(0x0400 + n),
            address: UsbAddress::new(1 + n / 100, n % 100 + 2).expect("valid address"),
            present: true,
            fingerprint: None,
        },
    }
}

pub fn assigned(d: &Dev, controller: ControllerModel, follow: FollowPolicy) -> AssignedDevice {
    AssignedDevice {
        request_index: 0,
        device_id: d.id,
        lineage_id: d.lineage,
        controller,
        follow,
    }
}

/// The agent's device table, as the executor sees it.
#[derive(Debug, Default, Clone)]
pub struct Devices {
    pub map: HashMap<DeviceId, DeviceInfo>,
    pub names: HashMap<ServerId, ServerName>,
}

impl Devices {
    pub fn with(devs: &[Dev]) -> Self {
        let mut d = Self::default();
        for x in devs {
            d.map.insert(x.id, x.info);
        }
        d
    }
}

impl DeviceLookup for Devices {
    fn device(&self, id: &DeviceId) -> Option<DeviceInfo> {
        self.map.get(id).copied()
    }
    fn server_name(&self, server: &ServerId) -> Option<ServerName> {
        self.names.get(server).cloned()
    }
}

/// A test-driver host: its node file lives in `dir`.
pub struct Host {
    pub dir: TempDir,
    pub host: HostName,
    pub validator: Arc<XmlValidator>,
    pub exec: Executor,
}

/// libvirt's test driver node description: a CPU, memory, the host computer and the USB
/// devices (node devices `usb_{bus}_{devnum}`).
pub fn node_xml(devs: &[Dev]) -> String {
    let mut x = String::from(
        "<?xml version=\"1.0\"?>\n<node>\n  <cpu><mhz>2400</mhz><model>x86_64</model><active>2</active><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu>\n  <memory>8388608</memory>\n  <device><name>computer</name><capability type='system'><hardware><vendor>usbpt</vendor><version>test</version><serial>1</serial><uuid>11111111-2222-3333-4444-555555555555</uuid></hardware><firmware><vendor>usbpt</vendor><version>1</version><release_date>01/01/2026</release_date></firmware></capability></device>\n",
    );
    for d in devs {
        let (bus, devnum) = (d.info.address.bus(), d.info.address.devnum());
        x.push_str(&format!(
            "  <device><name>usb_{bus}_{devnum}</name><parent>computer</parent><driver><name>usb</name></driver><capability type='usb_device'><bus>{bus}</bus><device>{devnum}</device><product id='0x{:04x}'>test device</product><vendor id='0x{:04x}'>usbpt</vendor></capability></device>\n",
            d.info.product.value(),
            d.info.vendor.value()
        ));
    }
    x.push_str("</node>\n");
    x
}

pub async fn host(name: &str, devs: &[Dev]) -> Host {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("node.xml");
    std::fs::write(&path, node_xml(devs)).expect("write node xml");
    let host = HostName::new(name).expect("host name");
    let validator = Arc::new(XmlValidator::new());
    let mut config = ExecutorConfig::new(host.clone(), test_driver_uri(&path).expect("uri"));
    config.validator = Some(validator.clone());
    config.shutdown_timeout = Duration::from_secs(5);
    let exec = Executor::connect(config)
        .await
        .expect("connect to the test driver");
    Host {
        dir,
        host,
        validator,
        exec,
    }
}

pub fn server() -> ServerId {
    ServerId::new_v7()
}

/// The one `ServerStateChanged` among `events` (panics otherwise).
pub fn state_of(events: &[Event]) -> (ServerState, String) {
    let states: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::ServerStateChanged(s) => Some((s.state, s.detail.clone(), s.reported_by_agent)),
            _ => None,
        })
        .collect();
    assert_eq!(
        states.len(),
        1,
        "expected one ServerStateChanged in {events:#?}"
    );
    let (state, detail, by_agent) = states.into_iter().next().expect("one");
    assert!(by_agent, "agent-observed states are reported_by_agent");
    (state, detail)
}

pub fn count(events: &[Event], kind: &str) -> usize {
    events.iter().filter(|e| e.kind() == kind).count()
}
