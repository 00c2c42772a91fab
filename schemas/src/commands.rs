//! Commands: what operators ask for. They travel as JSON (NATS request/reply on
//! [`crate::subjects::command`], and the HTTP API), are validated against the view, and either
//! become events or are rejected with a reason.

use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::events::{ControllerModel, DeviceSelector, FollowPolicy, ServerAction, UsbRequest};
use crate::ids::{
    DeviceId, EventId, FlavorName, HostName, IdError, ProductId, ServerName, VendorId,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    CreateFlavor {
        name: FlavorName,
        usb: Vec<UsbRequest>,
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
}

impl Command {
    /// The last token of the command's request subject.
    pub fn kind(&self) -> &'static str {
        match self {
            Command::CreateFlavor { .. } => "flavor.create",
            Command::DeleteFlavor { .. } => "flavor.delete",
            Command::Boot { .. } => "boot",
            Command::Resize { .. } => "resize",
            Command::Migrate { .. } => "migrate",
            Command::Act { .. } => "action",
            Command::Delete { .. } => "delete",
            Command::SetFlavorUsb { .. } => "flavor.usb",
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
        /// An HTTP-style status: 400 invalid, 404 unknown, 409 conflict, 503 unavailable.
        code: u16,
        reason: String,
    },
}

/// A `--usb SPEC` could not be parsed. The message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpecError {
    #[error("usb spec {spec:?}: {why}")]
    Invalid { spec: String, why: String },
    #[error("usb spec {spec:?}: {source}")]
    Id { spec: String, source: IdError },
}

/// Parses the CLI's `--usb` syntax: `id=DEVICE_ID`, `lineage=LINEAGE_ID` or
/// `vendor=136b,product=0003[,serial=S][,count=N]`, each optionally with
/// `,controller=uhci|ehci|xhci,follow=lineage|strict`. Defaults: `controller=ehci`
/// (blueprint option 1's default), `follow=lineage`, `count=1`.
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
        let (mut id, mut lineage, mut vendor, mut product, mut serial, mut count) =
            (None, None, None, None, None, None);
        let mut controller = ControllerModel::Ehci;
        let mut follow = FollowPolicy::Lineage;
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
                    dup(id.is_some())?;
                    id = Some(value.parse::<DeviceId>().map_err(id_err)?);
                }
                "lineage" => {
                    dup(lineage.is_some())?;
                    lineage = Some(value.parse().map_err(id_err)?);
                }
                "vendor" => {
                    dup(vendor.is_some())?;
                    vendor = Some(value.parse::<VendorId>().map_err(id_err)?);
                }
                "product" => {
                    dup(product.is_some())?;
                    product = Some(value.parse::<ProductId>().map_err(id_err)?);
                }
                "serial" => {
                    dup(serial.is_some())?;
                    if value.is_empty() {
                        return Err(invalid("serial is empty".into()));
                    }
                    serial = Some(value.to_owned());
                }
                "count" => {
                    dup(count.is_some())?;
                    let n: u8 = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=15).contains(n))
                        .ok_or_else(|| invalid(format!("count {value:?} must be 1..=15")))?;
                    count = Some(n);
                }
                "controller" => {
                    controller = match value {
                        "uhci" => ControllerModel::Uhci,
                        "ehci" => ControllerModel::Ehci,
                        "xhci" => ControllerModel::Xhci,
                        other => {
                            return Err(invalid(format!(
                                "controller {other:?} is not one of uhci, ehci, xhci"
                            )))
                        }
                    }
                }
                "follow" => {
                    follow = match value {
                        "lineage" => FollowPolicy::Lineage,
                        "strict" => FollowPolicy::Strict,
                        other => {
                            return Err(invalid(format!(
                                "follow {other:?} is not one of lineage, strict"
                            )))
                        }
                    }
                }
                other => return Err(invalid(format!("unknown key {other:?}"))),
            }
        }
        let selector = match (id, lineage, vendor, product) {
            (Some(d), None, None, None) if serial.is_none() && count.is_none() => {
                DeviceSelector::Enumeration(d)
            }
            (None, Some(l), None, None) if serial.is_none() && count.is_none() => {
                DeviceSelector::Lineage(l)
            }
            (None, None, Some(vendor_id), Some(product_id)) => DeviceSelector::Match {
                vendor_id,
                product_id,
                serial,
                count: count.unwrap_or(1),
            },
            _ => {
                return Err(invalid(
                    "give exactly one of id=…, lineage=…, or vendor=…,product=… (serial and count go with vendor/product)".into(),
                ))
            }
        };
        let request = UsbRequest {
            selector,
            controller,
            follow,
        };
        if request.device_count() > u16::from(controller.ports()) {
            return Err(invalid(format!(
                "controller {} has {} ports and the request needs {}",
                controller.as_str(),
                controller.ports(),
                request.device_count()
            )));
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
