//! Which devices are passthrough candidates. Pure: a [`Filter`] decides from a device's
//! descriptors alone.
//!
//! Order of evaluation, first match wins:
//! 1. the file's `[[rule]]`s, in file order (`action = "allow"` or `"deny"`);
//! 2. `usb_passthrough_blacklist` entries (deny);
//! 3. the built-in rules, unless `builtin = false`: root hubs (`1d6b:*` or a `usbN` kernel
//!    name), hubs (class 09) and HID boot keyboards and mice (every interface HID, one of them
//!    subclass 01 protocol 01 or 02) are not candidates;
//! 4. `default` (`"allow"` unless the file says `"deny"`).
//!
//! ```toml
//! builtin = true
//! default = "allow"
//! usb_passthrough_blacklist = '[{"vendor_id": "1d6b", "product_id": "0002"}]'
//!
//! [[rule]]            # a YubiKey in OTP+FIDO mode looks like a keyboard: allow it anyway
//! action = "allow"
//! vendor = "1050"
//!
//! [[rule]]
//! action = "deny"
//! class = "08"        # mass storage: the device class or any interface class
//! port = "1-1.5"      # this port and everything behind it
//! ```
//!
//! A file whose name ends in `.json` is a `usb_passthrough_blacklist` list alone:
//! `[{"vendor_id": "1d6b", "product_id": "0002"}]` (the built-in rules still apply).

use std::fmt;
use std::path::Path;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use thiserror::Error;
use usbpt_schemas::{PortPath, ProductId, VendorId};

use crate::observation::UsbDevice;

/// Why a filter file was refused. Every variant names the file and, where there is one, the line.
#[derive(Debug, Error)]
pub enum FilterError {
    #[error("cannot read filter file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("filter file {path}: {message}")]
    Syntax { path: String, message: String },
    #[error("filter file {path}, line {line}: {message}")]
    Invalid {
        path: String,
        line: usize,
        message: String,
    },
}

/// What a rule does to the devices it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Allow,
    Deny,
}

/// What a rule matches: every criterion given must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Match {
    pub vendor: Option<VendorId>,
    pub product: Option<ProductId>,
    /// The device class or any interface class.
    pub class: Option<u8>,
    /// This port or any port behind it.
    pub port: Option<PortPath>,
}

impl Match {
    fn is_empty(&self) -> bool {
        self.vendor.is_none()
            && self.product.is_none()
            && self.class.is_none()
            && self.port.is_none()
    }

    pub fn matches(&self, d: &UsbDevice) -> bool {
        self.vendor.is_none_or(|v| v == d.descriptors.vendor_id)
            && self.product.is_none_or(|p| p == d.descriptors.product_id)
            && self.class.is_none_or(|c| has_class(d, c))
            && self
                .port
                .as_ref()
                .is_none_or(|p| is_behind(&d.descriptors.port_path, p))
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(v) = self.vendor {
            parts.push(format!("vendor {v}"));
        }
        if let Some(p) = self.product {
            parts.push(format!("product {p}"));
        }
        if let Some(c) = self.class {
            parts.push(format!("class {c:02x}"));
        }
        if let Some(p) = &self.port {
            parts.push(format!("port {p}"));
        }
        f.write_str(&parts.join(", "))
    }
}

fn has_class(d: &UsbDevice, class: u8) -> bool {
    d.descriptors.device_class == class || d.interfaces().iter().any(|i| i.class == class)
}

/// `port` is `base` or a port behind it (same bus, `base`'s chain is a prefix of its chain).
fn is_behind(port: &PortPath, base: &PortPath) -> bool {
    port.bus() == base.bus() && port.ports().starts_with(base.ports())
}

/// A configured rule, with where it came from (for logs and errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: RuleAction,
    pub when: Match,
    pub origin: String,
}

/// The verdict on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Candidate,
    /// Not a passthrough candidate, and why (names the rule).
    Filtered(String),
}

impl Decision {
    pub fn is_candidate(&self) -> bool {
        matches!(self, Decision::Candidate)
    }
    pub fn reason(&self) -> Option<&str> {
        match self {
            Decision::Candidate => None,
            Decision::Filtered(r) => Some(r),
        }
    }
}

/// The host's filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    rules: Vec<Rule>,
    builtin: bool,
    default: RuleAction,
}

impl Default for Filter {
    /// The built-in rules and allow everything else.
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            builtin: true,
            default: RuleAction::Allow,
        }
    }
}

const HID: u8 = 0x03;
const HUB: u8 = 0x09;
const LINUX_FOUNDATION: VendorId = VendorId(0x1d6b);

/// The built-in verdict, if a built-in rule matches.
fn builtin(d: &UsbDevice) -> Option<String> {
    if d.descriptors.port_path.is_root() || d.descriptors.vendor_id == LINUX_FOUNDATION {
        return Some(format!(
            "built-in: root hub ({} at {})",
            d.ids(),
            d.descriptors.port_path
        ));
    }
    if has_class(d, HUB) {
        return Some("built-in: hub (class 09)".to_owned());
    }
    let all_hid = !d.interfaces().is_empty() && d.interfaces().iter().all(|i| i.class == HID);
    if all_hid {
        let boot = |protocol| {
            d.interfaces()
                .iter()
                .any(|i| i.subclass == 1 && i.protocol == protocol)
        };
        if boot(1) {
            return Some("built-in: HID boot keyboard (interface 03/01/01)".to_owned());
        }
        if boot(2) {
            return Some("built-in: HID boot mouse (interface 03/01/02)".to_owned());
        }
    }
    None
}

impl Filter {
    /// A filter with explicit rules (the demo and tests build them in code).
    pub fn new(rules: Vec<Rule>, builtin: bool, default: RuleAction) -> Self {
        Self {
            rules,
            builtin,
            default,
        }
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `d` is a passthrough candidate.
    pub fn decide(&self, d: &UsbDevice) -> Decision {
        for rule in &self.rules {
            if rule.when.matches(d) {
                return match rule.action {
                    RuleAction::Allow => Decision::Candidate,
                    RuleAction::Deny => {
                        Decision::Filtered(format!("{} denies {}", rule.origin, rule.when))
                    }
                };
            }
        }
        if self.builtin {
            if let Some(reason) = builtin(d) {
                return Decision::Filtered(reason);
            }
        }
        match self.default {
            RuleAction::Allow => Decision::Candidate,
            RuleAction::Deny => {
                Decision::Filtered("default = \"deny\" and no rule allows it".into())
            }
        }
    }

    /// Reads a filter file: a `usb_passthrough_blacklist` JSON list when the name ends in `.json`, TOML
    /// otherwise.
    pub fn load(path: &Path) -> Result<Self, FilterError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| FilterError::Read {
            path: shown.clone(),
            source,
        })?;
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            let rules = parse_blacklist(&text, &shown, 0)?;
            Ok(Self::new(rules, true, RuleAction::Allow))
        } else {
            Self::from_toml(&text, &shown)
        }
    }

    /// Parses the TOML form; `name` names the file in errors.
    pub fn from_toml(text: &str, name: &str) -> Result<Self, FilterError> {
        let file: FileToml = toml::from_str(text).map_err(|e| syntax(name, text, &e))?;
        let mut rules = Vec::new();
        for (i, spanned) in file.rule.into_iter().enumerate() {
            let line = line_of(text, spanned.span().start);
            let raw = spanned.into_inner();
            let invalid = |message: String| FilterError::Invalid {
                path: name.to_owned(),
                line,
                message,
            };
            let when = Match {
                vendor: raw.vendor.map(|h| h.0),
                product: raw.product.map(|h| h.0),
                class: raw.class.map(|c| c.0),
                port: raw.port,
            };
            if when.is_empty() {
                return Err(invalid(format!(
                    "rule {} matches every device; give vendor, product, class or port (or set default = \"{}\")",
                    i + 1,
                    if raw.action == RuleAction::Deny { "deny" } else { "allow" }
                )));
            }
            if when.product.is_some() && when.vendor.is_none() {
                return Err(invalid(format!(
                    "rule {} names a product without a vendor; product ids only mean something with their vendor id",
                    i + 1
                )));
            }
            if let Some(earlier) = rules.iter().find(|r: &&Rule| r.when == when) {
                return Err(invalid(format!(
                    "rule {} matches exactly what {} matches",
                    i + 1,
                    earlier.origin
                )));
            }
            rules.push(Rule {
                action: raw.action,
                when,
                origin: format!("{name} rule {} (line {line})", i + 1),
            });
        }
        if let Some(list) = file.usb_passthrough_blacklist {
            let line = line_of(text, list.span().start);
            rules.extend(parse_blacklist(list.get_ref(), name, line)?);
        }
        Ok(Self::new(
            rules,
            file.builtin.unwrap_or(true),
            file.default.unwrap_or(RuleAction::Allow),
        ))
    }
}

/// A `usb_passthrough_blacklist` list: `[{"vendor_id": "1d6b", "product_id": "0002"}]`. `line` is where the list
/// starts in an enclosing TOML file (0 for a `.json` file).
fn parse_blacklist(text: &str, name: &str, line: usize) -> Result<Vec<Rule>, FilterError> {
    let entries: Vec<BlacklistEntry> =
        serde_json::from_str(text).map_err(|e| FilterError::Invalid {
            path: name.to_owned(),
            line: line.max(1) + e.line().saturating_sub(1),
            message: format!("usb_passthrough_blacklist: {e}"),
        })?;
    Ok(entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| Rule {
            action: RuleAction::Deny,
            when: Match {
                vendor: Some(e.vendor_id.0),
                product: e.product_id.map(|p| p.0),
                class: None,
                port: None,
            },
            origin: format!("{name} usb_passthrough_blacklist entry {}", i + 1),
        })
        .collect())
}

fn syntax(name: &str, text: &str, e: &toml::de::Error) -> FilterError {
    match e.span() {
        Some(span) => FilterError::Invalid {
            path: name.to_owned(),
            line: line_of(text, span.start),
            message: e.message().to_owned(),
        },
        None => FilterError::Syntax {
            path: name.to_owned(),
            message: e.message().to_owned(),
        },
    }
}

/// 1-based line of byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(1, |before| {
        before.bytes().filter(|&b| b == b'\n').count() + 1
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    builtin: Option<bool>,
    default: Option<RuleAction>,
    usb_passthrough_blacklist: Option<toml::Spanned<String>>,
    #[serde(default)]
    rule: Vec<toml::Spanned<RuleToml>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleToml {
    action: RuleAction,
    vendor: Option<Hex<VendorId>>,
    product: Option<Hex<ProductId>>,
    class: Option<ClassByte>,
    port: Option<PortPath>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlacklistEntry {
    vendor_id: Hex<VendorId>,
    product_id: Option<Hex<ProductId>>,
}

/// A vendor or product id written as 4 hex digits (`"1d6b"`), in any serde format.
struct Hex<T>(T);

impl<'de, T> Deserialize<'de> for Hex<T>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Hex).map_err(D::Error::custom)
    }
}

/// A class byte: `"09"`, `"0x09"` or `9`.
struct ClassByte(u8);

impl<'de> Deserialize<'de> for ClassByte {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        let bad = |v: &dyn fmt::Display| {
            D::Error::custom(format!(
                "invalid class {v}: expected a byte as 2 hex digits (\"09\", \"0x09\") or an integer 0..=255"
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Int(n) => u8::try_from(n).map(ClassByte).map_err(|_| bad(&n)),
            Raw::Text(s) => {
                let digits = s.strip_prefix("0x").unwrap_or(&s);
                if digits.len() == 2 {
                    u8::from_str_radix(digits, 16)
                        .map(ClassByte)
                        .map_err(|_| bad(&format!("{s:?}")))
                } else {
                    Err(bad(&format!("{s:?}")))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::Interface;
    use usbpt_schemas::{UsbAddress, UsbDescriptors};

    fn dev(port: &str, vendor: u16, product: u16, class: u8, ifs: &[(u8, u8, u8)]) -> UsbDevice {
        let mut desc = UsbDescriptors::new(
            UsbAddress::new(1, 5).expect("address"),
            port.parse().expect("port"),
            VendorId(vendor),
            ProductId(product),
        );
        desc.device_class = class;
        UsbDevice::new(
            format!("/sys/devices/x/{port}"),
            desc,
            ifs.iter()
                .map(|&(c, s, p)| Interface::new(c, s, p))
                .collect(),
        )
    }

    fn yubikey_fido() -> UsbDevice {
        dev("3-2.3", 0x1050, 0x0120, 0, &[(3, 0, 0)])
    }
    fn keyboard() -> UsbDevice {
        dev("1-1.5.4.2", 0x05f3, 0x0007, 0, &[(3, 1, 1), (3, 0, 0)])
    }
    fn mouse() -> UsbDevice {
        dev("1-1.6", 0x046d, 0xc077, 0, &[(3, 1, 2)])
    }
    fn yubikey5_otp_fido_ccid() -> UsbDevice {
        dev(
            "1-3",
            0x1050,
            0x0407,
            0,
            &[(3, 1, 1), (3, 0, 0), (0x0b, 0, 0)],
        )
    }
    fn camera() -> UsbDevice {
        dev("1-1.5.2.3", 0x04a9, 0x31c0, 0, &[(6, 1, 1)])
    }

    #[test]
    fn builtin_rules_filter_hubs_root_hubs_keyboards_and_mice() {
        let f = Filter::default();
        let root = dev("usb1", 0x1d6b, 0x0002, 9, &[(9, 0, 0)]);
        assert!(f
            .decide(&root)
            .reason()
            .is_some_and(|r| r.contains("root hub")));
        let gadget = dev("1-4", 0x1d6b, 0x0104, 0, &[(2, 2, 1)]);
        assert!(f
            .decide(&gadget)
            .reason()
            .is_some_and(|r| r.contains("1d6b")));
        let hub = dev("1-2", 0x0bda, 0x5411, 9, &[(9, 0, 1), (9, 0, 2)]);
        assert!(f
            .decide(&hub)
            .reason()
            .is_some_and(|r| r.contains("hub (class 09)")));
        assert!(f
            .decide(&keyboard())
            .reason()
            .is_some_and(|r| r.contains("keyboard")));
        assert!(f
            .decide(&mouse())
            .reason()
            .is_some_and(|r| r.contains("mouse")));
        // FIDO keys are HID but not boot devices; a YubiKey 5 with a CCID interface is not pure HID.
        assert_eq!(f.decide(&yubikey_fido()), Decision::Candidate);
        assert_eq!(f.decide(&yubikey5_otp_fido_ccid()), Decision::Candidate);
        assert_eq!(f.decide(&camera()), Decision::Candidate);
        // A device whose interfaces are unknown is not judged a keyboard.
        assert_eq!(
            f.decide(&dev("1-7", 0x05f3, 0x0007, 0, &[])),
            Decision::Candidate
        );
    }

    #[test]
    fn rules_come_first_in_file_order_then_blacklist_then_builtin_then_default() {
        let text = r#"
default = "deny"
usb_passthrough_blacklist = '[{"vendor_id": "04a9"}]'

[[rule]]
action = "allow"
vendor = "05f3"
product = "0007"

[[rule]]
action = "deny"
port = "3-2"

[[rule]]
action = "allow"
class = "03"

[[rule]]
action = "allow"
class = 6
"#;
        let f = Filter::from_toml(text, "f.toml").expect("valid");
        // Allowed by rule 1 although the built-in rules call it a keyboard.
        assert_eq!(f.decide(&keyboard()), Decision::Candidate);
        // Denied by rule 2 (port) before rule 3 (class 03) could allow it.
        let r = f.decide(&yubikey_fido());
        assert!(
            r.reason()
                .is_some_and(|r| r.contains("rule 2 (line 10)") && r.contains("port 3-2")),
            "{r:?}"
        );
        // Rule 4 allows class 06 before the blacklist's 04a9 entry is reached.
        assert_eq!(f.decide(&camera()), Decision::Candidate);
        // Rule 3 allows the mouse (class 03) before the built-in rules.
        assert_eq!(f.decide(&mouse()), Decision::Candidate);
        // Nothing matches a mass-storage stick: default deny.
        let stick = dev("1-8", 0x0781, 0x5567, 0, &[(8, 6, 0x50)]);
        assert!(f
            .decide(&stick)
            .reason()
            .is_some_and(|r| r.contains("default")));
        // The blacklist denies a camera at a port no rule covers when rule 4 is absent.
        let f = Filter::from_toml(
            "usb_passthrough_blacklist = '[{\"vendor_id\": \"04a9\", \"product_id\": \"31c0\"}]'",
            "f.toml",
        )
        .expect("valid");
        assert!(f
            .decide(&camera())
            .reason()
            .is_some_and(|r| r.contains("usb_passthrough_blacklist entry 1")));
        assert_eq!(f.decide(&yubikey_fido()), Decision::Candidate);
    }

    #[test]
    fn builtin_can_be_switched_off() {
        let f = Filter::from_toml("builtin = false", "f.toml").expect("valid");
        assert_eq!(f.decide(&keyboard()), Decision::Candidate);
    }

    #[test]
    fn port_rules_cover_the_port_and_what_is_behind_it() {
        let f = Filter::from_toml("[[rule]]\naction = \"deny\"\nport = \"1-1.5\"\n", "f")
            .expect("valid");
        assert!(!f.decide(&camera()).is_candidate()); // 1-1.5.2.3
        assert!(f.decide(&dev("1-1.4", 1, 1, 0, &[])).is_candidate());
        assert!(f.decide(&dev("1-1", 1, 1, 0, &[])).is_candidate());
        assert!(f.decide(&dev("2-1.5.1", 1, 1, 0, &[])).is_candidate());
        // Whole chain elements, not string prefixes: 1-1.50 is not behind 1-1.5.
        assert!(f.decide(&dev("1-1.50", 1, 1, 0, &[])).is_candidate());
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let cases: &[(&str, usize, &str)] = &[
            ("builtin = true\n[[rule]]\naction = \"deny\"\nvendr = \"1d6b\"\n", 4, "vendr"),
            ("[[rule]]\naction = \"maybe\"\nvendor = \"1d6b\"\n", 2, "maybe"),
            ("\n\n[[rule]]\naction = \"deny\"\nvendor = \"1d6\"\n", 5, "\"1d6\""),
            ("[[rule]]\naction = \"deny\"\nclass = \"9\"\n", 3, "\"9\""),
            ("[[rule]]\naction = \"deny\"\nclass = 300\n", 3, "300"),
            ("[[rule]]\naction = \"deny\"\nport = \"1-0\"\n", 3, "\"1-0\""),
            ("x = 1\n", 1, "x"),
            ("\n[[rule]]\naction = \"deny\"\n", 2, "matches every device"),
            ("[[rule]]\naction = \"deny\"\nproduct = \"0002\"\n", 1, "without a vendor"),
            (
                "[[rule]]\naction = \"deny\"\nvendor = \"1d6b\"\n\n[[rule]]\naction = \"allow\"\nvendor = \"1d6b\"\n",
                5,
                "rule 1 (line 1)",
            ),
            ("\n\nusb_passthrough_blacklist = '[{\"vendor\": \"1d6b\"}]'\n", 3, "vendor"),
            ("usb_passthrough_blacklist = '[{\"vendor_id\": \"xyz\"}]'\n", 1, "\"xyz\""),
        ];
        for (text, line, needle) in cases {
            let err = Filter::from_toml(text, "/etc/usbpt/filter.toml").expect_err(text);
            let shown = err.to_string();
            assert!(
                shown.contains(&format!("/etc/usbpt/filter.toml, line {line}:"))
                    && shown.contains(needle),
                "{text:?}: {shown}"
            );
        }
    }

    #[test]
    fn json_blacklist_file_and_read_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blacklist.json");
        std::fs::write(
            &path,
            r#"[{"vendor_id": "1d6b", "product_id": "0002"}, {"vendor_id": "04a9"}]"#,
        )
        .expect("write");
        let f = Filter::load(&path).expect("valid");
        assert_eq!(f.rules().len(), 2);
        assert!(!f.decide(&camera()).is_candidate());
        assert!(f
            .decide(&keyboard())
            .reason()
            .is_some_and(|r| r.contains("built-in")));

        std::fs::write(&path, "[{\"vendor_id\": \"1d6b\",\n \"extra\": 1}]").expect("write");
        let err = Filter::load(&path).expect_err("unknown field").to_string();
        assert!(err.contains("line 2") && err.contains("extra"), "{err}");

        let missing = dir.path().join("nope.toml");
        let err = Filter::load(&missing).expect_err("missing").to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }
}
