//! Identity types. Each one is validated when it is built (from a string, from parts, or when
//! deserialised), so a value of the type is always valid, and errors name the offending value.

use std::fmt;
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;
use uuid::Uuid;

/// Why a value could not become an identity type. Every variant carries the rejected input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    #[error("invalid {kind} {}: must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-' (it is used as a NATS subject token)", shown(.value))]
    Token { kind: &'static str, value: String },
    #[error("invalid {kind} {}: must be exactly 4 hexadecimal digits, e.g. 136b", shown(.value))]
    Hex16 { kind: &'static str, value: String },
    #[error(
        "invalid USB address bus={bus} devnum={devnum}: bus must be 1..=255 and devnum 1..=127"
    )]
    Address { bus: u16, devnum: u16 },
    #[error(
        "invalid port path {}: expected a kernel device name like 1-1.5.2.3 or usb1 ({why})",
        shown(.value)
    )]
    PortPath { value: String, why: &'static str },
    #[error("invalid {kind} {}: not a UUID", shown(.value))]
    Uuid { kind: &'static str, value: String },
}

/// The most characters of a rejected value an error message quotes (a client's 1 MB value is not
/// echoed back).
pub const SHOWN_CHARS: usize = 72;

/// `value` quoted for an error message: at most [`SHOWN_CHARS`] characters, then `…`.
pub fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{:?}…", &value[..cut]),
        None => format!("{value:?}"),
    }
}

fn is_token(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

macro_rules! token_name {
    ($(#[$m:meta])* $name:ident, $kind:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        /// Serialized as its text, borrowed (`into = "String"` copied the string per record).
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl $name {
            /// Validates `value` as a subject-safe name.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                if is_token(&value) {
                    Ok(Self(value))
                } else {
                    Err(IdError::Token { kind: $kind, value })
                }
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(value: String) -> Result<Self, IdError> {
                Self::new(value)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

token_name!(
    /// A hypervisor host's name. It is a NATS subject token, so `a.>` or `*` is rejected.
    HostName,
    "host name"
);
token_name!(
    /// A flavor's name; unique, and a subject token (flavor names are fenced on their subject).
    FlavorName,
    "flavor name"
);
token_name!(
    /// A server's (VM's) name; unique among live servers.
    ServerName,
    "server name"
);

fn parse_hex16(kind: &'static str, s: &str) -> Result<u16, IdError> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.len() == 4 && digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        u16::from_str_radix(digits, 16).map_err(|_| IdError::Hex16 {
            kind,
            value: s.to_owned(),
        })
    } else {
        Err(IdError::Hex16 {
            kind,
            value: s.to_owned(),
        })
    }
}

macro_rules! hex16 {
    ($(#[$m:meta])* $name:ident, $kind:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u16);

        impl $name {
            pub fn value(self) -> u16 {
                self.0
            }
        }
        impl FromStr for $name {
            type Err = IdError;
            /// Exactly four hex digits (an optional `0x` prefix is accepted).
            fn from_str(s: &str) -> Result<Self, IdError> {
                parse_hex16($kind, s).map(Self)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:04x}", self.0)
            }
        }
        /// Human-readable formats (JSON) carry `"136b"`; binary formats (postcard) a `u16`.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    s.serialize_u16(self.0)
                }
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = String::deserialize(d)?;
                    s.parse().map_err(D::Error::custom)
                } else {
                    u16::deserialize(d).map(Self)
                }
            }
        }
    };
}

hex16!(
    /// USB idVendor.
    VendorId,
    "vendor id"
);
hex16!(
    /// USB idProduct.
    ProductId,
    "product id"
);

/// Where the kernel enumerated a device this time: `busnum` and `devnum`. Changes on every
/// re-plug, reset and reboot; never an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawAddress", into = "RawAddress")]
pub struct UsbAddress {
    bus: u16,
    devnum: u16,
}

#[derive(Serialize, Deserialize)]
struct RawAddress {
    bus: u16,
    devnum: u16,
}

impl UsbAddress {
    pub fn new(bus: u16, devnum: u16) -> Result<Self, IdError> {
        if (1..=255).contains(&bus) && (1..=127).contains(&devnum) {
            Ok(Self { bus, devnum })
        } else {
            Err(IdError::Address { bus, devnum })
        }
    }
    pub fn bus(self) -> u16 {
        self.bus
    }
    pub fn devnum(self) -> u16 {
        self.devnum
    }
    /// Nova's `usb_<bus>_<device>` address string.
    pub fn nova_address(self) -> String {
        format!("usb_{}_{}", self.bus, self.devnum)
    }
}
impl TryFrom<RawAddress> for UsbAddress {
    type Error = IdError;
    fn try_from(r: RawAddress) -> Result<Self, IdError> {
        Self::new(r.bus, r.devnum)
    }
}
impl From<UsbAddress> for RawAddress {
    fn from(a: UsbAddress) -> Self {
        RawAddress {
            bus: a.bus,
            devnum: a.devnum,
        }
    }
}
impl fmt::Display for UsbAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03}:{:03}", self.bus, self.devnum)
    }
}

/// The physical path of a device: its bus and the chain of hub ports, parsed from the kernel
/// device name (`1-1.5.2.3` is bus 1, ports 1→5→2→3; `usb1` is bus 1's root hub).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct PortPath {
    bus: u16,
    ports: Vec<u8>,
}

/// USB allows at most 5 tiers of hubs below the root, so 6 ports in a chain at most; we accept 7.
const MAX_PORT_DEPTH: usize = 7;

impl PortPath {
    pub fn new(bus: u16, ports: Vec<u8>) -> Result<Self, IdError> {
        let shown = || Self::render(bus, &ports);
        if !(1..=255).contains(&bus) {
            return Err(IdError::PortPath {
                value: shown(),
                why: "bus must be 1..=255",
            });
        }
        if ports.len() > MAX_PORT_DEPTH {
            return Err(IdError::PortPath {
                value: shown(),
                why: "more than 7 hub tiers",
            });
        }
        if ports.contains(&0) {
            return Err(IdError::PortPath {
                value: shown(),
                why: "port numbers start at 1",
            });
        }
        Ok(Self { bus, ports })
    }

    pub fn bus(&self) -> u16 {
        self.bus
    }
    pub fn ports(&self) -> &[u8] {
        &self.ports
    }
    /// True for a root hub (`usbN`).
    pub fn is_root(&self) -> bool {
        self.ports.is_empty()
    }

    fn render(bus: u16, ports: &[u8]) -> String {
        Rendered(bus, ports).to_string()
    }
}

/// A port path as text (`usbN`, or `bus-port.port…`), written straight to the formatter: a
/// discovery's lineage key and its stored record show it once each.
struct Rendered<'a>(u16, &'a [u8]);

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Rendered(bus, ports) = *self;
        let Some((first, rest)) = ports.split_first() else {
            return write!(f, "usb{bus}");
        };
        write!(f, "{bus}-{first}")?;
        for port in rest {
            write!(f, ".{port}")?;
        }
        Ok(())
    }
}

impl FromStr for PortPath {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = |why| IdError::PortPath {
            value: s.to_owned(),
            why,
        };
        let num = |t: &str| -> Option<u16> {
            if t.is_empty() || t.len() > 3 || !t.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                t.parse().ok()
            }
        };
        if let Some(bus) = s.strip_prefix("usb") {
            let bus = num(bus).ok_or_else(|| bad("bad bus number"))?;
            return Self::new(bus, Vec::new()).map_err(|_| bad("bus must be 1..=255"));
        }
        let (bus, chain) = s.split_once('-').ok_or_else(|| bad("missing '-'"))?;
        let bus = num(bus).ok_or_else(|| bad("bad bus number"))?;
        let ports = chain
            .split('.')
            .map(|p| {
                num(p)
                    .and_then(|n| u8::try_from(n).ok())
                    .ok_or_else(|| bad("bad port number"))
            })
            .collect::<Result<Vec<u8>, _>>()?;
        Self::new(bus, ports).map_err(|e| match e {
            IdError::PortPath { why, .. } => bad(why),
            other => other,
        })
    }
}
impl TryFrom<String> for PortPath {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        s.parse()
    }
}
impl From<PortPath> for String {
    fn from(p: PortPath) -> String {
        p.to_string()
    }
}

/// Serialized as its text (`1-1.5.2`), as `into = "String"` did, but rendered into a buffer on
/// the stack: no copy of the path and no `String` per record (a `DeviceDiscovered` is encoded
/// once per discovery by the agent and once more into the view).
impl Serialize for PortPath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// "255-255.255.255.255.255.255.255": 31 bytes at most ([`MAX_PORT_DEPTH`]).
        struct Buf {
            bytes: [u8; 32],
            len: usize,
        }
        impl fmt::Write for Buf {
            fn write_str(&mut self, s: &str) -> fmt::Result {
                let end = self.len + s.len();
                self.bytes
                    .get_mut(self.len..end)
                    .ok_or(fmt::Error)?
                    .copy_from_slice(s.as_bytes());
                self.len = end;
                Ok(())
            }
        }
        let mut buf = Buf {
            bytes: [0; 32],
            len: 0,
        };
        if fmt::Write::write_fmt(&mut buf, format_args!("{self}")).is_err() {
            // Longer than a valid path can be: not reached, but never wrong.
            return serializer.serialize_str(&self.to_string());
        }
        match std::str::from_utf8(&buf.bytes[..buf.len]) {
            Ok(s) => serializer.serialize_str(s),
            Err(_) => serializer.serialize_str(&self.to_string()),
        }
    }
}
impl fmt::Display for PortPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Rendered(self.bus, &self.ports).fmt(f)
    }
}

macro_rules! uuid_id {
    ($(#[$m:meta])* $name:ident, $kind:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn from_uuid(u: Uuid) -> Self {
                Self(u)
            }
            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }
            /// The 16 bytes, big-endian: sorts like the UUID (time order for v7 ids).
            pub fn to_bytes(self) -> [u8; 16] {
                *self.0.as_bytes()
            }
            pub fn from_bytes(b: [u8; 16]) -> Self {
                Self(Uuid::from_bytes(b))
            }
        }
        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Uuid::parse_str(s).map(Self).map_err(|_| IdError::Uuid {
                    kind: $kind,
                    value: s.to_owned(),
                })
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(
    /// One enumeration of a device: one appearance at one bus/devnum on one host in one boot.
    /// A new id on every re-enumeration (UUIDv7, so ids sort by time).
    DeviceId,
    "device id"
);
uuid_id!(
    /// The physical device across enumerations; derived deterministically (UUIDv5) from a
    /// [`LineageKey`], so every agent and every replay computes the same id.
    LineageId,
    "lineage id"
);
uuid_id!(
    /// An event's id (UUIDv7); also its `Nats-Msg-Id`, so a retried publish is stored once.
    EventId,
    "event id"
);
uuid_id!(
    /// A server (VM).
    ServerId,
    "server id"
);
uuid_id!(
    /// A flavor.
    FlavorId,
    "flavor id"
);
uuid_id!(
    /// Ties together every event caused, directly or not, by one request.
    CorrelationId,
    "correlation id"
);

impl DeviceId {
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }
}
impl EventId {
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }
}
impl ServerId {
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }
}
impl FlavorId {
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }
}
impl CorrelationId {
    pub fn new_v7() -> Self {
        Self(Uuid::now_v7())
    }
}

/// How a lineage was derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LineageKind {
    /// From `vendor:product:serial`: follows the device to another port or host.
    Serial,
    /// From `host + port path + vendor:product`: the device has no usable serial.
    Port,
}

/// What a lineage id is derived from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LineageKey<'a> {
    Serial {
        vendor: VendorId,
        product: ProductId,
        serial: &'a str,
    },
    Port {
        host: &'a HostName,
        port: &'a PortPath,
        vendor: VendorId,
        product: ProductId,
    },
}

/// Fixed namespace for lineage UUIDv5s. Changing it changes every lineage id: never do.
const LINEAGE_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_5d0e_8b1c_4e53_9f0a_7c2d_41b8_e3a5);

impl LineageKey<'_> {
    pub fn kind(&self) -> LineageKind {
        match self {
            LineageKey::Serial { .. } => LineageKind::Serial,
            LineageKey::Port { .. } => LineageKind::Port,
        }
    }
    fn canonical(&self) -> String {
        match self {
            LineageKey::Serial {
                vendor,
                product,
                serial,
            } => format!("serial:{vendor}:{product}:{serial}"),
            LineageKey::Port {
                host,
                port,
                vendor,
                product,
            } => format!("port:{host}:{port}:{vendor}:{product}"),
        }
    }
}

impl LineageId {
    /// The lineage of `key`: the same key gives the same id on every machine, forever.
    pub fn derive(key: &LineageKey<'_>) -> Self {
        Self(Uuid::new_v5(&LINEAGE_NAMESPACE, key.canonical().as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_subject_tokens() {
        assert!(HostName::new("host-a_1").is_ok());
        for bad in ["a.>", "*", ">", "", "a b", "a.b", &"x".repeat(65)] {
            let err = HostName::new(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn vendor_ids_are_four_hex_digits() {
        assert_eq!("136b".parse::<VendorId>(), Ok(VendorId(0x136b)));
        assert_eq!("0x1D6B".parse::<VendorId>(), Ok(VendorId(0x1d6b)));
        assert_eq!(VendorId(0x0a).to_string(), "000a");
        for bad in ["136", "136bb", "zzzz", "", "+136"] {
            let err = bad.parse::<VendorId>().expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!("12g4".parse::<ProductId>().is_err());
    }

    #[test]
    fn port_paths_parse_kernel_names() {
        let p: PortPath = "1-1.5.2.3".parse().expect("valid");
        assert_eq!(p.bus(), 1);
        assert_eq!(p.ports(), &[1, 5, 2, 3]);
        assert_eq!(p.to_string(), "1-1.5.2.3");
        let root: PortPath = "usb2".parse().expect("valid");
        assert!(root.is_root());
        assert_eq!(root.to_string(), "usb2");
        for bad in [
            "1-",
            "-1",
            "1-1..2",
            "1-0",
            "0-1",
            "1-256",
            "x-1",
            "1.2",
            "usb",
            "usb0",
            "1-1.1.1.1.1.1.1.1",
        ] {
            let err = bad.parse::<PortPath>().expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn addresses_are_bounded() {
        assert!(UsbAddress::new(2, 3).is_ok());
        assert_eq!(
            UsbAddress::new(2, 3).map(UsbAddress::nova_address),
            Ok("usb_2_3".into())
        );
        assert!(UsbAddress::new(0, 3).is_err());
        assert!(UsbAddress::new(1, 128).is_err());
    }

    #[test]
    fn serial_lineage_ignores_host_and_port_lineage_does_not() {
        let a = HostName::new("a").expect("valid");
        let b = HostName::new("b").expect("valid");
        let port: PortPath = "1-2".parse().expect("valid");
        let serial = |_h: &HostName| {
            LineageId::derive(&LineageKey::Serial {
                vendor: VendorId(1),
                product: ProductId(2),
                serial: "X1",
            })
        };
        assert_eq!(serial(&a), serial(&b));
        let by_port = |h| {
            LineageId::derive(&LineageKey::Port {
                host: h,
                port: &port,
                vendor: VendorId(1),
                product: ProductId(2),
            })
        };
        assert_ne!(by_port(&a), by_port(&b));
        // Pinned: a lineage id must never change across releases.
        assert_eq!(
            serial(&a).to_string(),
            LineageId::derive(&LineageKey::Serial {
                vendor: VendorId(1),
                product: ProductId(2),
                serial: "X1"
            })
            .to_string()
        );
    }

    #[test]
    fn json_uses_strings_and_validates() {
        let v: VendorId = serde_json::from_str("\"136b\"").expect("valid");
        assert_eq!(v, VendorId(0x136b));
        assert!(serde_json::from_str::<HostName>("\"a.>\"").is_err());
        assert!(serde_json::from_str::<PortPath>("\"1-0\"").is_err());
        assert_eq!(
            serde_json::to_string(&"2-1.4".parse::<PortPath>().expect("valid")).expect("json"),
            "\"2-1.4\""
        );
    }
}
