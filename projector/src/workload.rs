//! A synthetic, deterministic event history for tests and benchmarks: hosts with devices,
//! flavors, servers booted, deleted, stopped; devices re-enumerated (with re-attach or strict
//! release) and hosts rebooted; refused migrations and failed schedules. Events are emitted
//! as a consistent control plane and agents would, so a fold of it quarantines nothing.
//!
//! Not used at run time by the product; `seed` makes every run reproducible.

use std::collections::VecDeque;

use usbpt_bus::{Bus, BusError};
use usbpt_schemas::*;
use uuid::Uuid;

/// Device types the workload plugs in: (vendor, product, has a serial).
const TYPES: [(u16, u16, bool); 3] = [
    (0x136b, 0x0003, true),
    (0x1050, 0x0407, false),
    (0x04a9, 0x1909, true),
];

struct Dev {
    kind: usize,
    lineage: LineageId,
    serial: Option<String>,
    port: PortPath,
    current: DeviceId,
    devnum: u16,
    holder: Option<usize>,
}

struct HostSim {
    name: HostName,
    boot: u32,
    devices: Vec<Dev>,
}

struct ServerSim {
    id: ServerId,
    host: usize,
    /// (slot on the host, request index, follow)
    devices: Vec<(usize, FollowPolicy)>,
}

/// An endless iterator of envelopes (take as many as needed).
pub struct Workload {
    rng: u64,
    next_id: u128,
    emitted: i64,
    queue: VecDeque<Envelope>,
    hosts: Vec<HostSim>,
    flavors: Vec<(FlavorId, usize, FollowPolicy)>,
    servers: Vec<ServerSim>,
    /// Indexes of the live servers, ascending (picking one is O(1), not a scan of all).
    live: Vec<usize>,
    /// Devices of each type no server holds (a boot with none left fails without a scan).
    free: [usize; TYPES.len()],
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workload")
            .field("emitted", &self.emitted)
            .finish_non_exhaustive()
    }
}

impl Workload {
    /// The next `n` events as the stream would hold them (sequences from 1, subject, encoded
    /// bytes): the input of the fold-alone measurements.
    pub fn raw(self, n: usize) -> Result<Vec<crate::RawEvent>, codec::EncodeError> {
        self.take(n)
            .enumerate()
            .map(|(i, e)| {
                Ok(crate::RawEvent {
                    seq: i as u64 + 1,
                    subject: subjects::for_event(&e),
                    payload: codec::encode(&e)?.into(),
                })
            })
            .collect()
    }

    /// `hosts` hosts with `devices_per_host` devices each.
    pub fn new(seed: u64, hosts: usize, devices_per_host: usize) -> Self {
        let mut w = Self {
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            next_id: 1,
            emitted: 0,
            queue: VecDeque::new(),
            hosts: Vec::new(),
            flavors: Vec::new(),
            servers: Vec::new(),
            live: Vec::new(),
            free: [0; TYPES.len()],
        };
        for h in 0..hosts {
            let name = HostName::new(format!("host-{h:05}")).unwrap_or_else(|_| unreachable_host());
            w.hosts.push(HostSim {
                name,
                boot: 0,
                devices: Vec::new(),
            });
            w.agent_started(h);
            for slot in 0..devices_per_host {
                let kind = (h + slot) % TYPES.len();
                let port = PortPath::new(1, vec![1, u8::try_from(slot % 200 + 1).unwrap_or(1)])
                    .unwrap_or_else(|_| unreachable_port());
                let (v, p, serial) = TYPES[kind];
                let serial = serial.then(|| format!("SN{h:05}{slot:03}"));
                let host = w.hosts[h].name.clone();
                let lineage = match &serial {
                    Some(s) => LineageId::derive(&LineageKey::Serial {
                        vendor: VendorId(v),
                        product: ProductId(p),
                        serial: s,
                    }),
                    None => LineageId::derive(&LineageKey::Port {
                        host: &host,
                        port: &port,
                        vendor: VendorId(v),
                        product: ProductId(p),
                    }),
                };
                let current = DeviceId(w.uuid());
                w.free[kind] += 1;
                w.hosts[h].devices.push(Dev {
                    kind,
                    lineage,
                    serial,
                    port,
                    current,
                    devnum: u16::try_from(slot % 120 + 2).unwrap_or(2),
                    holder: None,
                });
                w.discovered(h, slot, None);
            }
        }
        for (i, follow) in [
            FollowPolicy::Lineage,
            FollowPolicy::Strict,
            FollowPolicy::Lineage,
        ]
        .into_iter()
        .enumerate()
        {
            let id = FlavorId(w.uuid());
            let (v, p, _) = TYPES[i];
            w.emit(Event::FlavorCreated(FlavorCreated {
                flavor_id: id,
                name: FlavorName::new(format!("flavor-{i}"))
                    .unwrap_or_else(|_| unreachable_flavor()),
                usb: vec![UsbRequest {
                    selector: DeviceSelector::Match {
                        vendor_id: VendorId(v),
                        product_id: ProductId(p),
                        serial: None,
                        count: 1,
                    },
                    controller: ControllerModel::Xhci,
                    follow,
                }],
            }));
            w.flavors.push((id, i, follow));
        }
        w
    }

    fn uuid(&mut self) -> Uuid {
        self.next_id += 1;
        Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | self.next_id)
    }

    fn rand(&mut self, n: usize) -> usize {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        if n == 0 {
            0
        } else {
            usize::try_from(r % n as u64).unwrap_or(0)
        }
    }

    fn emit(&mut self, body: Event) {
        let id = EventId(self.uuid());
        let at = Timestamp::from_micros(1_764_000_000_000_000 + self.emitted * 1000);
        self.emitted += 1;
        self.queue.push_back(Envelope::at(id, at, body));
    }

    fn agent_started(&mut self, h: usize) {
        let host = &self.hosts[h];
        let body = Event::HostAgentStarted(HostAgentStarted {
            host: host.name.clone(),
            boot_id: format!("boot-{}-{}", host.name, host.boot),
            agent_version: "0.1.0".into(),
            hypervisor_uri: "test:///default".into(),
        });
        self.emit(body);
    }

    fn discovered(&mut self, h: usize, slot: usize, supersedes: Option<DeviceId>) {
        let host = &self.hosts[h];
        let d = &host.devices[slot];
        let (v, p, _) = TYPES[d.kind];
        let body = Event::DeviceDiscovered(DeviceDiscovered {
            device_id: d.current,
            lineage_id: d.lineage,
            lineage_kind: if d.serial.is_some() {
                LineageKind::Serial
            } else {
                LineageKind::Port
            },
            host: host.name.clone(),
            boot_id: format!("boot-{}-{}", host.name, host.boot),
            descriptors: UsbDescriptors {
                address: UsbAddress::new(1, d.devnum).unwrap_or_else(|_| unreachable_address()),
                port_path: d.port.clone(),
                vendor_id: VendorId(v),
                product_id: ProductId(p),
                serial: d.serial.clone(),
                device_class: 0,
                interface_classes: vec![3],
                manufacturer: Some("Workload".into()),
                product: Some(format!("device type {}", d.kind)),
                vendor_db: None,
                model_db: None,
                speed: Some("12".into()),
                usb_version: Some("2.00".into()),
            },
            syspath: format!("/sys/bus/usb/devices/{}", d.port),
            supersedes,
        });
        self.emit(body);
    }

    /// The device in `slot` re-enumerates: invalidated, discovered anew, and its claim follows
    /// (re-attach) or is released (strict).
    fn reenumerate(&mut self, h: usize, slot: usize, reason: InvalidationReason) {
        let old = self.hosts[h].devices[slot].current;
        let new = DeviceId(self.uuid());
        let (lineage, host) = (
            self.hosts[h].devices[slot].lineage,
            self.hosts[h].name.clone(),
        );
        self.emit(Event::DeviceInvalidated(DeviceInvalidated {
            device_id: old,
            lineage_id: lineage,
            host: host.clone(),
            reason,
            superseded_by: Some(new),
        }));
        {
            let d = &mut self.hosts[h].devices[slot];
            d.current = new;
            d.devnum = d.devnum % 120 + 2;
        }
        self.discovered(h, slot, Some(old));
        let Some(si) = self.hosts[h].devices[slot].holder else {
            return;
        };
        let server = self.servers[si].id;
        let follow = self.servers[si]
            .devices
            .iter()
            .find(|(s, _)| *s == slot)
            .map_or(FollowPolicy::Lineage, |(_, f)| *f);
        match follow {
            FollowPolicy::Lineage => {
                let devnum = self.hosts[h].devices[slot].devnum;
                self.emit(Event::DeviceReattached(DeviceReattached {
                    server_id: server,
                    host,
                    lineage_id: lineage,
                    old_device_id: old,
                    new_device_id: new,
                    address: UsbAddress::new(1, devnum).unwrap_or_else(|_| unreachable_address()),
                    method: AttachMethod::HotPlug,
                    detail: String::new(),
                }));
            }
            FollowPolicy::Strict => {
                self.emit(Event::DeviceReleased(DeviceReleased {
                    device_id: old,
                    lineage_id: lineage,
                    host,
                    server_id: server,
                    reason: ReleaseReason::Invalidated,
                }));
                self.hosts[h].devices[slot].holder = None;
                self.free[self.hosts[h].devices[slot].kind] += 1;
                self.servers[si].devices.retain(|(s, _)| *s != slot);
            }
        }
    }

    fn boot(&mut self) {
        let f = self.rand(self.flavors.len());
        let (flavor, kind, follow) = self.flavors[f];
        let server = ServerId(self.uuid());
        let name = ServerName::new(format!("vm-{}", self.servers.len()))
            .unwrap_or_else(|_| unreachable_server());
        self.emit(Event::ServerBootRequested(ServerBootRequested {
            server_id: server,
            name,
            flavor_id: flavor,
            requested_host: None,
        }));
        let start = self.rand(self.hosts.len());
        let found = (self.free[kind] > 0)
            .then(|| {
                (0..self.hosts.len()).find_map(|i| {
                    let h = (start + i) % self.hosts.len();
                    self.hosts[h]
                        .devices
                        .iter()
                        .position(|d| d.kind == kind && d.holder.is_none())
                        .map(|slot| (h, slot))
                })
            })
            .flatten();
        let si = self.servers.len();
        let Some((h, slot)) = found else {
            self.emit(Event::ServerScheduleFailed(ServerScheduleFailed {
                server_id: server,
                reason: "no host has a free device for request 0".into(),
                host_rejections: Vec::new(),
            }));
            self.servers.push(ServerSim {
                id: server,
                host: 0,
                devices: Vec::new(),
            });
            return;
        };
        let host = self.hosts[h].name.clone();
        let (device, lineage, devnum) = {
            let d = &self.hosts[h].devices[slot];
            (d.current, d.lineage, d.devnum)
        };
        self.emit(Event::DeviceClaimed(DeviceClaimed {
            device_id: device,
            lineage_id: lineage,
            host: host.clone(),
            server_id: server,
            request_index: 0,
            controller: ControllerModel::Xhci,
            follow,
        }));
        self.emit(Event::ServerScheduled(ServerScheduled {
            server_id: server,
            host: host.clone(),
            flavor_id: flavor,
            devices: vec![AssignedDevice {
                request_index: 0,
                device_id: device,
                lineage_id: lineage,
                controller: ControllerModel::Xhci,
                follow,
            }],
        }));
        self.emit(Event::DeviceAttached(DeviceAttached {
            device_id: device,
            lineage_id: lineage,
            host: host.clone(),
            server_id: server,
            address: UsbAddress::new(1, devnum).unwrap_or_else(|_| unreachable_address()),
            method: AttachMethod::DomainDefinition,
            detail: String::new(),
        }));
        self.emit(Event::ServerStateChanged(ServerStateChanged {
            server_id: server,
            host: Some(host),
            state: ServerState::Active,
            reported_by_agent: true,
            detail: "domain started".into(),
        }));
        self.hosts[h].devices[slot].holder = Some(si);
        self.free[kind] -= 1;
        self.live.push(si);
        self.servers.push(ServerSim {
            id: server,
            host: h,
            devices: vec![(slot, follow)],
        });
    }

    fn live_server(&mut self) -> Option<usize> {
        if self.live.is_empty() {
            return None;
        }
        let i = self.rand(self.live.len());
        Some(self.live[i])
    }

    fn delete(&mut self, si: usize) {
        let (server, h) = (self.servers[si].id, self.servers[si].host);
        let host = self.hosts[h].name.clone();
        self.emit(Event::ServerDeleted(ServerDeleted {
            server_id: server,
            host: Some(host.clone()),
        }));
        for (slot, _) in std::mem::take(&mut self.servers[si].devices) {
            let d = &self.hosts[h].devices[slot];
            let body = Event::DeviceReleased(DeviceReleased {
                device_id: d.current,
                lineage_id: d.lineage,
                host: host.clone(),
                server_id: server,
                reason: ReleaseReason::ServerDeleted,
            });
            self.hosts[h].devices[slot].holder = None;
            self.free[self.hosts[h].devices[slot].kind] += 1;
            self.emit(body);
        }
        if let Ok(i) = self.live.binary_search(&si) {
            self.live.remove(i);
        }
    }

    fn step(&mut self) {
        match self.rand(100) {
            0..=34 => self.boot(),
            35..=54 => match self.live_server() {
                Some(si) => self.delete(si),
                None => self.boot(),
            },
            55..=79 => {
                let h = self.rand(self.hosts.len());
                let n = self.hosts[h].devices.len();
                if n > 0 {
                    let slot = self.rand(n);
                    self.reenumerate(h, slot, InvalidationReason::Reenumerated);
                }
            }
            80..=81 => {
                let h = self.rand(self.hosts.len());
                self.hosts[h].boot += 1;
                self.agent_started(h);
                for slot in 0..self.hosts[h].devices.len() {
                    self.reenumerate(h, slot, InvalidationReason::HostRebooted);
                }
            }
            82..=91 => {
                if let Some(si) = self.live_server() {
                    let (server, h) = (self.servers[si].id, self.servers[si].host);
                    let host = self.hosts[h].name.clone();
                    self.emit(Event::ServerActionRequested(ServerActionRequested {
                        server_id: server,
                        host: host.clone(),
                        action: ServerAction::Reboot,
                    }));
                    self.emit(Event::ServerStateChanged(ServerStateChanged {
                        server_id: server,
                        host: Some(host),
                        state: ServerState::Active,
                        reported_by_agent: true,
                        detail: "rebooted".into(),
                    }));
                }
            }
            _ => {
                if let Some(si) = self.live_server() {
                    let server = self.servers[si].id;
                    self.emit(Event::ServerMigrationRefused(ServerMigrationRefused {
                        server_id: server,
                        live: true,
                        reason: "server holds host USB devices".into(),
                    }));
                }
            }
        }
    }
}

impl Iterator for Workload {
    type Item = Envelope;
    fn next(&mut self) -> Option<Envelope> {
        while self.queue.is_empty() {
            self.step();
        }
        self.queue.pop_front()
    }
}

// The names and addresses above are built from valid parts; these only satisfy the types.
fn unreachable_host() -> HostName {
    HostName::new("host").unwrap_or_else(|_| unreachable!("valid literal"))
}
fn unreachable_flavor() -> FlavorName {
    FlavorName::new("flavor").unwrap_or_else(|_| unreachable!("valid literal"))
}
fn unreachable_server() -> ServerName {
    ServerName::new("server").unwrap_or_else(|_| unreachable!("valid literal"))
}
fn unreachable_port() -> PortPath {
    PortPath::new(1, vec![1]).unwrap_or_else(|_| unreachable!("valid literal"))
}
fn unreachable_address() -> UsbAddress {
    UsbAddress::new(1, 1).unwrap_or_else(|_| unreachable!("valid literal"))
}

/// Publishes envelopes in order on one connection with up to `window` acks in flight (each with
/// its `Nats-Msg-Id`); returns the last stored sequence.
pub async fn publish_all(
    bus: &Bus,
    envelopes: impl IntoIterator<Item = Envelope>,
    window: usize,
) -> Result<u64, BusError> {
    bus.publish_windowed(envelopes, window).await
}

/// Publishes arbitrary bytes on a subject (to test how bad input is handled); returns the
/// stored sequence.
pub async fn publish_raw(bus: &Bus, subject: &str, payload: Vec<u8>) -> Result<u64, BusError> {
    bus.publish_raw(subject, payload, None).await
}
