//! Commands: what operators ask for. They travel as JSON (NATS request/reply on
//! [`crate::subjects::command`], and the HTTP API), are validated against the view, and either
//! become events or are rejected with a reason.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::events::{
    ControllerModel, DeviceSelector, FingerprintPolicy, FollowPolicy, ServerAction, UsbRequest,
};
use crate::ids::{
    DeviceId, EventId, FlavorName, HostName, IdError, LineageId, ProductId, ServerName, VendorId,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    CreateFlavor {
        name: FlavorName,
        usb: Vec<UsbRequest>,
        /// Nova's `ram`, `vcpus`, `disk`: recorded (`FlavorSized`) and shown, not scheduled on.
        #[serde(default, skip_serializing_if = "FlavorResources::is_zero")]
        resources: FlavorResources,
        /// What happens when a device held by a server of this flavor comes back with another
        /// fingerprint (`FlavorFingerprintPolicySet`); `None` (absent) is the default, hold.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on_fingerprint_change: Option<FingerprintPolicy>,
    },
    DeleteFlavor {
        name: FlavorName,
    },
    Boot {
        name: ServerName,
        flavor: FlavorName,
        #[serde(default)]
        host: Option<HostName>,
    },
    Resize {
        name: ServerName,
        flavor: FlavorName,
    },
    /// Confirm a server's pending resize (Nova's `confirmResize`): release its old devices.
    ConfirmResize {
        name: ServerName,
    },
    /// Revert a server's pending resize (Nova's `revertResize`): its old flavor, host and
    /// devices back; the new devices released.
    RevertResize {
        name: ServerName,
    },
    Migrate {
        name: ServerName,
        #[serde(default)]
        live: bool,
        #[serde(default)]
        host: Option<HostName>,
    },
    Act {
        name: ServerName,
        action: ServerAction,
    },
    Delete {
        name: ServerName,
    },
    /// Replace a flavor's USB request (Nova's `usb_devices` extra spec).
    SetFlavorUsb {
        name: FlavorName,
        usb: Vec<UsbRequest>,
    },
    /// Set a flavor's `on_fingerprint_change` policy (`hold` or `follow`); recorded only when
    /// it differs from the flavor's current one.
    SetFlavorPolicy {
        name: FlavorName,
        on_fingerprint_change: FingerprintPolicy,
    },
    /// Rename a server and/or set its description (Nova's `PUT /servers/{id}`). `None` leaves
    /// a field as it is; `description: Some(None)` clears it.
    UpdateServer {
        name: ServerName,
        #[serde(default)]
        new_name: Option<ServerName>,
        #[serde(
            default,
            with = "double_option",
            skip_serializing_if = "Option::is_none"
        )]
        description: Option<Option<String>>,
    },
    /// Name a lineage (`label`), or remove its name (`label: null`). The label must pass
    /// [`crate::label::check`].
    LabelLineage {
        lineage: LineageId,
        label: Option<String>,
    },
    /// End a lineage's `lineage_conflict` by keeping the enumeration on `keep` (one of the two
    /// hosts the alarm names); the other copy is set aside until it ends
    /// (`LineageConflictResolved`).
    ResolveConflict {
        lineage: LineageId,
        keep: HostName,
    },
    /// Accept the fingerprint a serial lineage now reports as its own: its `fingerprint_changed`
    /// alarm clears (`FingerprintAccepted`).
    AcceptFingerprint {
        lineage: LineageId,
    },
}

/// A flavor's Nova resources; usbpt records and shows them (0 when not given).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlavorResources {
    #[serde(default)]
    pub ram_mb: u32,
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub disk_gb: u32,
}

impl FlavorResources {
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// `Option<Option<T>>` in JSON: a missing key is `None`, `null` is `Some(None)`.
mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(
        v: &Option<Option<T>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(inner) => inner.serialize(s),
        }
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<T>>, D::Error> {
        Option::<T>::deserialize(d).map(Some)
    }
}

impl Command {
    /// The last token of the command's request subject.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateFlavor { .. } => "flavor.create",
            Command::DeleteFlavor { .. } => "flavor.delete",
            Command::Boot { .. } => "boot",
            Command::Resize { .. } => "resize",
            Command::ConfirmResize { .. } => "resize.confirm",
            Command::RevertResize { .. } => "resize.revert",
            Command::Migrate { .. } => "migrate",
            Command::Act { .. } => "action",
            Command::Delete { .. } => "delete",
            Command::SetFlavorUsb { .. } => "flavor.usb",
            Command::SetFlavorPolicy { .. } => "flavor.policy",
            Command::UpdateServer { .. } => "server.update",
            Command::LabelLineage { .. } => "lineage.label",
            Command::ResolveConflict { .. } => "lineage.conflict.resolve",
            Command::AcceptFingerprint { .. } => "lineage.fingerprint.accept",
        }
    }
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CommandReply {
    Accepted {
        /// The events the command appended, in order.
        events: Vec<EventId>,
        message: String,
    },
    Rejected {
        /// What kind of refusal; a front end chooses its own status for it (HTTP: `api`).
        kind: RejectKind,
        reason: String,
    },
}

/// Why a command changed nothing, as a kind. Only front ends turn it into a status (the HTTP
/// API in `api`, the CLI's message), so the command side never speaks HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectKind {
    /// The command is malformed; the reason names the field.
    Invalid,
    /// It names something that does not exist.
    NotFound,
    /// It conflicts with the current state (a name in use, a lost race, no host fits).
    Conflict,
    /// A step would be larger than the bus takes.
    TooLarge,
    /// The view or the bus could not be read or written; try again.
    Unavailable,
}

impl RejectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectKind::Invalid => "invalid",
            RejectKind::NotFound => "not found",
            RejectKind::Conflict => "conflict",
            RejectKind::TooLarge => "too large",
            RejectKind::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for RejectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `--usb SPEC` could not be parsed. The message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    #[error("usb spec {spec:?}: {why}")]
    Invalid { spec: String, why: String },
    #[error("usb spec {spec:?}: {source}")]
    Id { spec: String, source: IdError },
}

/// One USB request's fields as a client gives them: the CLI's `--usb` spec and the HTTP API's
/// `usb_devices[i]` fill these, and [`UsbRequestFields::validate`] is the one set of rules and
/// defaults for both; a request that arrives whole (NATS) is held to the same rules by
/// [`UsbRequest::check`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsbRequestFields {
    pub id: Option<DeviceId>,
    pub lineage: Option<LineageId>,
    pub vendor: Option<VendorId>,
    pub product: Option<ProductId>,
    pub serial: Option<String>,
    pub count: Option<u8>,
    pub controller: Option<ControllerModel>,
    pub follow: Option<FollowPolicy>,
}

/// Why a USB request is invalid (each front end adds where: the spec, `usb_devices[i]`, the
/// request's index).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UsbRequestError {
    #[error("give exactly one of an enumeration id, a lineage, or vendor with product (serial and count go with vendor and product only)")]
    Selector,
    /// `serial` or `count` given with an `id` or `lineage` selector, which names one device:
    /// refused rather than silently dropped.
    #[error("{field} goes with vendor and product only, not with {selector}")]
    NotWith {
        field: &'static str,
        selector: &'static str,
    },
    #[error("serial is empty")]
    EmptySerial,
    #[error("serial is {0} bytes; at most {MAX_STRING_BYTES} (the longest a USB string descriptor holds)")]
    SerialTooLong(usize),
    #[error("count {0} must be 1..={MAX_COUNT}")]
    Count(u8),
    #[error("controller {} has {} ports and the request needs {need}", .controller.as_str(), .controller.ports())]
    Ports {
        controller: ControllerModel,
        need: u16,
    },
}

/// The longest free-text value a command may carry (a serial), in bytes. A USB string
/// descriptor holds at most 126 UTF-16 code units; serials are ASCII in practice, and 255 bytes
/// holds any ASCII one. HTTP, NATS commands and the CLI all pass [`UsbRequestFields::validate`].
pub const MAX_STRING_BYTES: usize = 255;

/// The most devices one request may ask for (the largest controller's ports).
pub const MAX_COUNT: u8 = 15;

impl UsbRequestFields {
    /// The request these fields describe. Exactly one selector (`id`, `lineage`, or `vendor`
    /// with `product`; `serial` and `count` only with the latter), `count` 1..=15, a non-empty
    /// `serial`, no more devices than the controller has ports. Defaults: `controller=ehci`
    /// (blueprint option 1's default), `follow=lineage`, `count=1`.
    pub fn validate(self) -> Result<UsbRequest, UsbRequestError> {
        let Self {
            id,
            lineage,
            vendor,
            product,
            serial,
            count,
            controller,
            follow,
        } = self;
        let plain = serial.is_none() && count.is_none();
        if !plain && (id.is_some() ^ lineage.is_some()) && vendor.is_none() && product.is_none() {
            return Err(UsbRequestError::NotWith {
                field: if serial.is_some() { "serial" } else { "count" },
                selector: if id.is_some() { "id" } else { "lineage" },
            });
        }
        let selector = match (id, lineage, vendor, product) {
            (Some(d), None, None, None) if plain => DeviceSelector::Enumeration(d),
            (None, Some(l), None, None) if plain => DeviceSelector::Lineage(l),
            (None, None, Some(vendor_id), Some(product_id)) => {
                if serial.as_deref() == Some("") {
                    return Err(UsbRequestError::EmptySerial);
                }
                if let Some(n) = serial.as_ref().map(String::len) {
                    if n > MAX_STRING_BYTES {
                        return Err(UsbRequestError::SerialTooLong(n));
                    }
                }
                let count = count.unwrap_or(1);
                if !(1..=MAX_COUNT).contains(&count) {
                    return Err(UsbRequestError::Count(count));
                }
                DeviceSelector::Match {
                    vendor_id,
                    product_id,
                    serial,
                    count,
                }
            }
            _ => return Err(UsbRequestError::Selector),
        };
        let controller = controller.unwrap_or(ControllerModel::Ehci);
        let request = UsbRequest {
            selector,
            controller,
            follow: follow.unwrap_or_default(),
        };
        if request.device_count() > u16::from(controller.ports()) {
            return Err(UsbRequestError::Ports {
                controller,
                need: request.device_count(),
            });
        }
        Ok(request)
    }
}

impl From<UsbRequest> for UsbRequestFields {
    fn from(r: UsbRequest) -> Self {
        let mut f = Self {
            controller: Some(r.controller),
            follow: Some(r.follow),
            ..Self::default()
        };
        match r.selector {
            DeviceSelector::Enumeration(d) => f.id = Some(d),
            DeviceSelector::Lineage(l) => f.lineage = Some(l),
            DeviceSelector::Match {
                vendor_id,
                product_id,
                serial,
                count,
            } => {
                f.vendor = Some(vendor_id);
                f.product = Some(product_id);
                f.serial = serial;
                f.count = Some(count);
            }
        }
        f
    }
}

impl UsbRequest {
    /// Holds a request that arrived whole (a NATS command) to the rules of
    /// [`UsbRequestFields::validate`].
    pub fn check(&self) -> Result<(), UsbRequestError> {
        UsbRequestFields::from(self.clone()).validate().map(drop)
    }
}

/// Parses the CLI's `--usb` syntax: `id=DEVICE_ID`, `lineage=LINEAGE_ID` or
/// `vendor=136b,product=0003[,serial=S][,count=N]`, each optionally with
/// `,controller=uhci|ehci|xhci,follow=lineage|strict`; the rules and defaults are
/// [`UsbRequestFields::validate`]'s.
impl FromStr for UsbRequest {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let invalid = |why: String| SpecError::Invalid {
            spec: spec.to_owned(),
            why,
        };
        let id_err = |source| SpecError::Id {
            spec: spec.to_owned(),
            source,
        };
        let mut f = UsbRequestFields::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| invalid(format!("{part:?} is not key=value")))?;
            let dup = |slot_set: bool| {
                if slot_set {
                    Err(invalid(format!("{key} given twice")))
                } else {
                    Ok(())
                }
            };
            match key {
                "id" => {
                    dup(f.id.is_some())?;
                    f.id = Some(value.parse::<DeviceId>().map_err(id_err)?);
                }
                "lineage" => {
                    dup(f.lineage.is_some())?;
                    f.lineage = Some(value.parse().map_err(id_err)?);
                }
                "vendor" => {
                    dup(f.vendor.is_some())?;
                    f.vendor = Some(value.parse::<VendorId>().map_err(id_err)?);
                }
                "product" => {
                    dup(f.product.is_some())?;
                    f.product = Some(value.parse::<ProductId>().map_err(id_err)?);
                }
                "serial" => {
                    dup(f.serial.is_some())?;
                    f.serial = Some(value.to_owned());
                }
                "count" => {
                    dup(f.count.is_some())?;
                    f.count = Some(value.parse().map_err(|_| {
                        invalid(format!("count {value:?} must be 1..={MAX_COUNT}"))
                    })?);
                }
                "controller" => {
                    f.controller = Some(match value {
                        "uhci" => ControllerModel::Uhci,
                        "ehci" => ControllerModel::Ehci,
                        "xhci" => ControllerModel::Xhci,
                        other => {
                            return Err(invalid(format!(
                                "controller {other:?} is not one of uhci, ehci, xhci"
                            )))
                        }
                    })
                }
                "follow" => {
                    f.follow = Some(match value {
                        "lineage" => FollowPolicy::Lineage,
                        "strict" => FollowPolicy::Strict,
                        other => {
                            return Err(invalid(format!(
                                "follow {other:?} is not one of lineage, strict"
                            )))
                        }
                    })
                }
                other => return Err(invalid(format!("unknown key {other:?}"))),
            }
        }
        f.validate().map_err(|e| invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `id` or `lineage` names one device: a `serial` or `count` with it is refused, naming
    /// the field, by the one validator the CLI, HTTP and NATS share (HTTP used to drop them).
    #[test]
    fn serial_or_count_with_a_one_device_selector_is_refused_naming_the_field() {
        let id = DeviceId::new_v7();
        let with = |serial: Option<&str>, count: Option<u8>| UsbRequestFields {
            id: Some(id),
            serial: serial.map(str::to_owned),
            count,
            ..UsbRequestFields::default()
        };
        assert_eq!(
            with(Some("K1"), None).validate(),
            Err(UsbRequestError::NotWith {
                field: "serial",
                selector: "id"
            })
        );
        assert_eq!(
            with(None, Some(2)).validate(),
            Err(UsbRequestError::NotWith {
                field: "count",
                selector: "id"
            })
        );
        let e = format!("id={id},count=2")
            .parse::<UsbRequest>()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("count goes with vendor and product only"),
            "{e}"
        );
        assert!(with(None, None).validate().is_ok());
    }

    #[test]
    fn serials_are_bounded_and_rejected_values_are_not_echoed_whole() {
        let fields = |serial: String| UsbRequestFields {
            vendor: Some(VendorId(0x136b)),
            product: Some(ProductId(3)),
            serial: Some(serial),
            ..UsbRequestFields::default()
        };
        assert!(fields("S".repeat(MAX_STRING_BYTES)).validate().is_ok());
        assert_eq!(
            fields("S".repeat(MAX_STRING_BYTES + 1)).validate(),
            Err(UsbRequestError::SerialTooLong(MAX_STRING_BYTES + 1))
        );
        // Bytes, not characters: 128 three-byte characters are 384 bytes.
        assert!(fields("\u{20ac}".repeat(128)).validate().is_err());
        // The CLI's spec and a whole request from NATS are held to the same bound.
        let spec = format!("vendor=136b,product=0003,serial={}", "S".repeat(300));
        assert!(spec.parse::<UsbRequest>().is_err());
        let whole = UsbRequest {
            selector: DeviceSelector::Match {
                vendor_id: VendorId(0x136b),
                product_id: ProductId(3),
                serial: Some("S".repeat(300)),
                count: 1,
            },
            controller: ControllerModel::Ehci,
            follow: FollowPolicy::Lineage,
        };
        assert_eq!(whole.check(), Err(UsbRequestError::SerialTooLong(300)));
        // A 1 MB bad name is quoted to a short prefix.
        let err = FlavorName::new("x".repeat(1 << 20)).expect_err("invalid");
        assert!(
            err.to_string().len() < 300,
            "{} bytes",
            err.to_string().len()
        );
    }

    #[test]
    fn update_server_tells_absent_from_null() {
        let name = ServerName::new("erp-1").expect("valid");
        for (json, new_name, description) in [
            (r#"{"command":"update_server","name":"erp-1"}"#, None, None),
            (
                r#"{"command":"update_server","name":"erp-1","description":null}"#,
                None,
                Some(None),
            ),
            (
                r#"{"command":"update_server","name":"erp-1","new_name":"erp-2","description":"d"}"#,
                Some(ServerName::new("erp-2").expect("valid")),
                Some(Some("d".to_owned())),
            ),
        ] {
            let cmd: Command = serde_json::from_str(json).expect(json);
            let want = Command::UpdateServer {
                name: name.clone(),
                new_name,
                description,
            };
            assert_eq!(cmd, want, "{json}");
            let back = serde_json::to_string(&cmd).expect("serialize");
            assert_eq!(serde_json::from_str::<Command>(&back).expect(&back), want);
        }
        // A flavor without resources serializes as before.
        let f: Command = serde_json::from_str(r#"{"command":"create_flavor","name":"f","usb":[]}"#)
            .expect("old");
        assert!(!serde_json::to_string(&f)
            .expect("json")
            .contains("resources"));
    }

    #[test]
    fn parses_vendor_product_specs() {
        let r: UsbRequest = "vendor=136b,product=0003,count=2,controller=xhci,follow=strict"
            .parse()
            .expect("valid");
        assert_eq!(
            r.selector,
            DeviceSelector::Match {
                vendor_id: VendorId(0x136b),
                product_id: ProductId(3),
                serial: None,
                count: 2
            }
        );
        assert_eq!(r.controller, ControllerModel::Xhci);
        assert_eq!(r.follow, FollowPolicy::Strict);
    }

    #[test]
    fn rejects_bad_specs_naming_the_part() {
        for (spec, needle) in [
            ("vendor=136b", "exactly one"),
            ("vendor=136,product=0003", "\"136\""),
            (
                "vendor=136b,product=0003,count=3,controller=uhci",
                "2 ports",
            ),
            ("vendor=136b,product=0003,colour=red", "\"colour\""),
            ("id=nope", "\"nope\""),
            ("vendor=136b,product=0003,controller=ohci", "\"ohci\""),
            ("vendor=136b,vendor=136b,product=0003", "twice"),
        ] {
            let err = spec.parse::<UsbRequest>().expect_err(spec).to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    #[test]
    fn one_validator_for_every_entry_point() {
        let key = UsbRequestFields {
            vendor: Some(VendorId(0x136b)),
            product: Some(ProductId(3)),
            ..UsbRequestFields::default()
        };
        // Defaults.
        let r = key.clone().validate().expect("valid");
        assert_eq!(
            (r.controller, r.follow, r.device_count()),
            (ControllerModel::Ehci, FollowPolicy::Lineage, 1)
        );
        let device = DeviceId(uuid::Uuid::from_u128(1));
        let id = Some(device);
        for (fields, want) in [
            // serial and count go with vendor/product only (HTTP used to drop them silently).
            (
                UsbRequestFields {
                    id,
                    serial: Some("S".into()),
                    ..UsbRequestFields::default()
                },
                UsbRequestError::NotWith {
                    field: "serial",
                    selector: "id",
                },
            ),
            (
                UsbRequestFields {
                    id,
                    count: Some(2),
                    ..UsbRequestFields::default()
                },
                UsbRequestError::NotWith {
                    field: "count",
                    selector: "id",
                },
            ),
            (
                UsbRequestFields { id, ..key.clone() },
                UsbRequestError::Selector,
            ),
            (UsbRequestFields::default(), UsbRequestError::Selector),
            (
                UsbRequestFields {
                    count: Some(0),
                    ..key.clone()
                },
                UsbRequestError::Count(0),
            ),
            (
                UsbRequestFields {
                    count: Some(16),
                    controller: Some(ControllerModel::Xhci),
                    ..key.clone()
                },
                UsbRequestError::Count(16),
            ),
            (
                UsbRequestFields {
                    serial: Some(String::new()),
                    ..key.clone()
                },
                UsbRequestError::EmptySerial,
            ),
            (
                UsbRequestFields {
                    count: Some(7),
                    ..key.clone()
                },
                UsbRequestError::Ports {
                    controller: ControllerModel::Ehci,
                    need: 7,
                },
            ),
        ] {
            assert_eq!(fields.clone().validate(), Err(want.clone()), "{fields:?}");
        }
        // A request that arrives whole is held to the same rules.
        let zero = UsbRequest {
            selector: DeviceSelector::Match {
                vendor_id: VendorId(0x136b),
                product_id: ProductId(3),
                serial: None,
                count: 0,
            },
            controller: ControllerModel::Xhci,
            follow: FollowPolicy::Lineage,
        };
        assert_eq!(zero.check(), Err(UsbRequestError::Count(0)));
        assert_eq!(r.check(), Ok(()));
        // The CLI's spec goes through the same validation.
        let err = format!("id={device},serial=S")
            .parse::<UsbRequest>()
            .expect_err("serial with id")
            .to_string();
        assert!(
            err.contains("serial goes with vendor and product only"),
            "{err}"
        );
    }

    #[test]
    fn commands_are_tagged_json() {
        let c: Command = serde_json::from_str(r#"{"command":"boot","name":"erp","flavor":"key"}"#)
            .expect("valid");
        assert_eq!(c.kind(), "boot");
        assert!(serde_json::from_str::<Command>(
            r#"{"command":"boot","name":"erp","flavor":"key","extra":1}"#
        )
        .is_err());
        assert!(
            serde_json::from_str::<Command>(r#"{"command":"boot","name":"a.>","flavor":"k"}"#)
                .is_err()
        );
    }
}
