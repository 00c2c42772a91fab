//! Queries: `devices`, `device show`, `history`, `hypervisor show`,
//! `flavor list|show`, `server list|show`. They read the view through the HTTP API (`--api`).
//! With `--json`: exactly one JSON document on stdout, as the API returned it; otherwise a
//! readable table, read from the API's typed documents (`usbpt_api::doc`). Errors: non-zero
//! exit, one line on stderr.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use usbpt_api::doc;
use usbpt_projector::DeviceStatus;
use usbpt_schemas::text::{escape, escape_json};
use usbpt_schemas::HostName;

use crate::global::Global;

#[derive(Debug, Args)]
pub struct DevicesArgs {
    /// Only devices on this host.
    #[arg(long)]
    pub host: Option<HostName>,
    /// Only devices in this status: available, claimed, attached, invalidated.
    #[arg(long)]
    pub status: Option<DeviceStatus>,
    /// Include superseded enumerations (history), not only each device's current one.
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// Everything the view knows of one enumeration.
    Show {
        /// A device (enumeration) id.
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// A device id or a lineage id.
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AlarmsArgs {
    /// Cleared alarms too (the newest of each lineage), not only active ones.
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum HypervisorCmd {
    /// The Nova-shaped hypervisor document with `usb_device_stats`.
    Show {
        host: HostName,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Include deleted ones.
    #[arg(long)]
    pub deleted: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A name or an id.
    pub name: String,
    #[arg(long)]
    pub json: bool,
}

/// The API, as the CLI reads it.
pub(crate) struct Api {
    /// The API's URL as printed (without `user:password@`).
    base: String,
    url: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer` (never printed).
    token: Option<usbpt_api::ApiToken>,
}

impl Api {
    pub(crate) fn new(global: &Global) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base: usbpt_bus::auth::redact_url(global.api.trim_end_matches('/')),
            url: global.api.trim_end_matches('/').to_owned(),
            http,
            token: global.client_api_token()?,
        })
    }

    /// GETs `path` and returns its JSON; an API error becomes its message.
    pub(crate) async fn get(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.get(format!("{}{path}", self.url));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.secret());
        }
        let resp = req.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the usbpt API at {}: {} (is `usbpt serve` running? see --api)",
                self.base,
                root_cause(&e)
            )
        })?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .with_context(|| format!("reading the answer of {url}"))?;
        let json: Value = serde_json::from_str(&body)
            .with_context(|| format!("the API answered {status} with non-JSON to {url}"))?;
        if !status.is_success() {
            let message = serde_json::from_value::<doc::ErrorDoc>(json)
                .map_or_else(|_| body.clone(), |e| e.error.message);
            let hint = match status.as_u16() {
                401 => " (give the API token: --api-token-file FILE or USBPT_API_TOKEN; `usbpt up` writes <data-dir>/api-token)",
                403 => " (the API token given is not this API's)",
                _ => "",
            };
            bail!("{message} (HTTP {}){hint}", status.as_u16());
        }
        Ok(json)
    }
}

/// A document the API returned, typed; a document of another shape is an error naming `what`.
fn typed<T: DeserializeOwned>(doc: Value, what: &str) -> Result<T> {
    serde_json::from_value(doc).with_context(|| format!("the API's {what} document"))
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// JSON for machines, with DEL, C1 and bidirectional controls `\u`-escaped as well (the same
/// string once parsed), so even JSON on a terminal cannot drive it.
pub(crate) fn print_json(v: &Value) -> Result<()> {
    println!("{}", escape_json(&serde_json::to_string_pretty(v)?));
    Ok(())
}

/// A value as text for people: strings bare but escaped (device strings can carry terminal
/// controls: `usbpt_schemas::text`), null as `-`. Every table cell and `show` line goes
/// through here.
pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => escape(s).into_owned(),
        other => escape(&other.to_string()).into_owned(),
    }
}

/// Prints rows under headers, columns padded to their widest cell.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// A typed value as [`s`] shows its JSON form (so a table reads as the document does).
fn c<T: Serialize + ?Sized>(x: &T) -> String {
    s(&serde_json::to_value(x).unwrap_or(Value::Null))
}

fn device_rows(devices: &[doc::DeviceDoc]) -> Vec<Vec<String>> {
    devices
        .iter()
        .map(|d| {
            vec![
                c(&d.id),
                c(&d.host),
                c(&d.status),
                format!(
                    "{}:{}",
                    c(&d.descriptors.vendor_id),
                    c(&d.descriptors.product_id)
                ),
                c(&d.descriptors.address.nova_address()),
                c(&d.descriptors.port_path),
                c(&d.descriptors.serial),
                c(&d.holder),
                c(&d.label),
                c(&d.descriptors.product),
            ]
        })
        .collect()
}

const DEVICE_HEADERS: [&str; 10] = [
    "DEVICE", "HOST", "STATUS", "ID", "ADDRESS", "PORT", "SERIAL", "HOLDER", "LABEL", "PRODUCT",
];

fn encode_query(pairs: &[(&str, String)]) -> String {
    let mut q = String::new();
    for (k, v) in pairs {
        q.push(if q.is_empty() { '?' } else { '&' });
        q.push_str(k);
        q.push('=');
        // Host names and statuses are subject tokens / words: nothing to escape.
        q.push_str(v);
    }
    q
}

/// `usbpt devices`.
pub async fn devices(global: &Global, a: DevicesArgs) -> Result<()> {
    let mut q = Vec::new();
    if let Some(h) = &a.host {
        q.push(("host", h.to_string()));
    }
    if let Some(st) = a.status {
        q.push(("status", st.as_str().to_owned()));
    }
    if a.all {
        q.push(("all", "true".to_owned()));
    }
    let doc = Api::new(global)?
        .get(&format!("/v1/devices{}", encode_query(&q)))
        .await?;
    if a.json {
        return print_json(&doc);
    }
    let list: doc::DeviceList = typed(doc, "device list")?;
    table(&DEVICE_HEADERS, &device_rows(&list.devices));
    Ok(())
}

/// `usbpt device show`.
pub async fn device(global: &Global, cmd: DeviceCmd) -> Result<()> {
    let DeviceCmd::Show { id, json } = cmd;
    let doc = Api::new(global)?
        .get(&format!("/v1/devices/{}", path_segment(&id)?))
        .await?;
    if json {
        return print_json(&doc);
    }
    let d = typed::<doc::DeviceShow>(doc, "device")?.device;
    let fields: [(&str, String); 23] = [
        ("id", c(&d.id)),
        ("lineage_id", c(&d.lineage_id)),
        (
            "lineage_kind",
            doc::lineage_kind_name(d.lineage_kind).to_owned(),
        ),
        ("label", c(&d.label)),
        ("host", c(&d.host)),
        ("status", c(&d.status)),
        ("holder", c(&d.holder)),
        ("current", c(&d.current)),
        ("address", c(&d.descriptors.address.nova_address())),
        ("port_path", c(&d.descriptors.port_path)),
        ("vendor_id", c(&d.descriptors.vendor_id)),
        ("product_id", c(&d.descriptors.product_id)),
        ("serial", c(&d.descriptors.serial)),
        ("fingerprint", c(&d.fingerprint)),
        ("manufacturer", c(&d.descriptors.manufacturer)),
        ("product", c(&d.descriptors.product)),
        ("vendor_db", c(&d.descriptors.vendor_db)),
        ("model_db", c(&d.descriptors.model_db)),
        ("speed", c(&d.descriptors.speed)),
        ("usb_version", c(&d.descriptors.usb_version)),
        ("syspath", c(&d.syspath)),
        ("boot_id", c(&d.boot_id)),
        ("supersedes", c(&d.supersedes)),
    ];
    for (f, value) in fields {
        println!("{f:<14} {value}");
    }
    println!(
        "{:<14} seq {} at {}",
        "discovered",
        d.discovered.seq,
        c(&d.discovered.at)
    );
    if let Some(i) = &d.invalidation {
        println!(
            "{:<14} seq {} at {} ({}), superseded by {}",
            "invalidated",
            i.seq,
            c(&i.at),
            c(&i.reason),
            c(&i.superseded_by)
        );
    }
    if let Some(a) = &d.attachment {
        println!(
            "{:<14} to {} at {} ({}, seq {})",
            "attached",
            c(&a.server_id),
            c(&a.address),
            c(&a.method),
            a.seq
        );
    }
    for h in &d.holders {
        println!("{:<14} {}", "held by", holding(h));
    }
    Ok(())
}

fn holding(h: &doc::HoldingDoc) -> String {
    let mut out = format!(
        "{} ({}) from seq {}",
        c(&h.server_id),
        c(&h.how),
        h.from.seq
    );
    if let Some(e) = &h.ended {
        out.push_str(&format!(" until seq {} ({})", e.seq, c(&e.reason)));
    }
    out
}

/// Ids and names are UUIDs or subject tokens; anything else is refused before it reaches a URL.
fn path_segment(s: &str) -> Result<&str> {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(s)
    } else {
        bail!("invalid id or name {s:?}: expected a UUID or a name of A-Z, a-z, 0-9, '_' or '-'")
    }
}

/// `usbpt history`.
pub async fn history(global: &Global, a: HistoryArgs) -> Result<()> {
    let doc = Api::new(global)?
        .get(&format!("/v1/devices/{}/history", path_segment(&a.id)?))
        .await?;
    if a.json {
        return print_json(&doc);
    }
    let h: doc::History = typed(doc, "history")?;
    let l = &h.lineage;
    println!(
        "lineage {} ({}, {}:{}, serial {}): {} enumeration(s), now {} on {}",
        c(&l.id),
        doc::lineage_kind_name(l.kind),
        c(&l.vendor_id),
        c(&l.product_id),
        c(&l.serial),
        l.enumerations,
        c(&l.current_device_id),
        c(&l.current_host),
    );
    if let Some(label) = &h.lineage.label {
        println!("label {}", usbpt_schemas::text::escape(label));
    }
    if let Some(cl) = &h.claim {
        println!(
            "claimed by server {} (follow {}, since seq {})",
            c(&cl.server_id),
            c(&cl.follow),
            cl.claimed.seq
        );
    }
    let rows: Vec<Vec<String>> = h
        .enumerations
        .iter()
        .map(|e| {
            let d = &e.device;
            let ended = d.invalidation.as_ref().map_or_else(
                || "-".to_owned(),
                |inv| format!("{} {}", c(&inv.at), c(&inv.reason)),
            );
            let holders: Vec<String> = d.holders.iter().map(|h| c(&h.server_id)).collect();
            vec![
                e.ordinal.to_string(),
                c(&d.id),
                c(&d.host),
                c(&d.descriptors.address.nova_address()),
                c(&d.descriptors.port_path),
                c(&d.status),
                short_fingerprint(d.fingerprint.as_ref()),
                c(&d.discovered.at),
                ended,
                if holders.is_empty() {
                    "-".to_owned()
                } else {
                    holders.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "#",
            "DEVICE",
            "HOST",
            "ADDRESS",
            "PORT",
            "STATUS",
            "FINGERPRINT",
            "DISCOVERED",
            "INVALIDATED",
            "HOLDERS",
        ],
        &rows,
    );
    Ok(())
}

/// The first 12 characters of a fingerprint, enough to tell two apart in a table (`-` when
/// the enumeration has none).
fn short_fingerprint(f: Option<&usbpt_schemas::Fingerprint>) -> String {
    match f {
        Some(f) => format!("{}…", f.to_string().chars().take(12).collect::<String>()),
        None => "-".to_owned(),
    }
}

/// `usbpt hypervisor show`.
pub async fn hypervisor(global: &Global, cmd: HypervisorCmd) -> Result<()> {
    let HypervisorCmd::Show { host, json } = cmd;
    let doc = Api::new(global)?
        .get(&format!("/v2.1/os-hypervisors/{host}"))
        .await?;
    if json {
        return print_json(&doc);
    }
    let h = typed::<doc::HypervisorShow>(doc, "hypervisor")?.hypervisor;
    println!(
        "hypervisor {} (agent {}, boot {}, {})",
        c(&h.hypervisor_hostname),
        c(&h.agent_version),
        c(&h.boot_id),
        c(&h.hypervisor_uri)
    );
    let rows: Vec<Vec<String>> = h
        .usb_device_stats
        .iter()
        .map(|d| {
            vec![
                c(&d.id),
                c(&d.address),
                format!("{}:{}", c(&d.vendor_id), c(&d.product_id)),
                c(&d.port_id),
                c(&d.status),
                c(&d.instance_uuid),
                c(&d.lineage_id),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "ADDRESS",
            "VENDOR:PRODUCT",
            "PORT",
            "STATUS",
            "INSTANCE",
            "LINEAGE",
        ],
        &rows,
    );
    Ok(())
}

/// `usbpt flavor list`.
pub async fn flavor_list(global: &Global, a: ListArgs) -> Result<()> {
    let doc = Api::new(global)?.get("/v2.1/flavors").await?;
    if a.json {
        return print_json(&doc);
    }
    let list: doc::FlavorList = typed(doc, "flavor list")?;
    let rows: Vec<Vec<String>> = list
        .flavors
        .iter()
        .map(|f| vec![c(&f.name), c(&f.id), usb_summary(&f.usb_devices)])
        .collect();
    table(&["NAME", "ID", "USB"], &rows);
    Ok(())
}

/// One line per USB request of a flavor.
fn usb_summary(usb: &[usbpt_schemas::UsbRequest]) -> String {
    use usbpt_schemas::DeviceSelector;
    let parts: Vec<String> = usb
        .iter()
        .map(|r| {
            let what = match &r.selector {
                DeviceSelector::Match {
                    vendor_id,
                    product_id,
                    serial,
                    count,
                } => {
                    let mut t = format!("{}:{} x{count}", c(vendor_id), c(product_id));
                    if let Some(serial) = serial {
                        t.push_str(&format!(" serial {}", c(serial)));
                    }
                    t
                }
                DeviceSelector::Lineage(l) => format!("lineage {}", c(l)),
                DeviceSelector::Enumeration(e) => format!("device {}", c(e)),
            };
            format!("{what} ({}, {})", c(&r.controller), c(&r.follow))
        })
        .collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join("; ")
    }
}

/// `usbpt flavor show`.
pub async fn flavor_show(global: &Global, a: ShowArgs) -> Result<()> {
    let doc = Api::new(global)?
        .get(&format!("/v2.1/flavors/{}", path_segment(&a.name)?))
        .await?;
    if a.json {
        return print_json(&doc);
    }
    let f = typed::<doc::FlavorShow>(doc, "flavor")?.flavor;
    println!("{:<10} {}", "name", c(&f.name));
    println!("{:<10} {}", "id", c(&f.id));
    println!(
        "{:<10} seq {} at {}",
        "created",
        f.created.seq,
        c(&f.created.at)
    );
    println!(
        "{:<10} on_fingerprint_change={}",
        "policy",
        f.on_fingerprint_change.as_str()
    );
    for (i, r) in f.usb_devices.iter().enumerate() {
        println!(
            "{:<10} {}",
            format!("usb[{i}]"),
            usb_summary(std::slice::from_ref(r))
        );
    }
    Ok(())
}

/// `usbpt server list`.
pub async fn server_list(global: &Global, a: ListArgs) -> Result<()> {
    let path = if a.deleted {
        "/v2.1/servers?deleted=true"
    } else {
        "/v2.1/servers"
    };
    let doc = Api::new(global)?.get(path).await?;
    if a.json {
        return print_json(&doc);
    }
    let list: doc::ServerList = typed(doc, "server list")?;
    let rows: Vec<Vec<String>> = list
        .servers
        .iter()
        .map(|v| {
            vec![
                c(&v.name),
                c(&v.id),
                c(&v.status),
                c(&v.host),
                c(&v.flavor.id),
            ]
        })
        .collect();
    table(&["NAME", "ID", "STATUS", "HOST", "FLAVOR"], &rows);
    Ok(())
}

/// `usbpt server show`.
pub async fn server_show(global: &Global, a: ShowArgs) -> Result<()> {
    let doc = Api::new(global)?
        .get(&format!("/v2.1/servers/{}", path_segment(&a.name)?))
        .await?;
    if a.json {
        return print_json(&doc);
    }
    let v = typed::<doc::ServerShow>(doc, "server")?.server;
    println!("{:<12} {}", "name", c(&v.name));
    println!("{:<12} {}", "id", c(&v.id));
    println!("{:<12} {} {}", "status", c(&v.status), c(&v.state_detail));
    println!("{:<12} {}", "host", c(&v.host));
    println!(
        "{:<12} {} ({})",
        "flavor",
        c(&v.flavor.name),
        c(&v.flavor.id)
    );
    for d in &v.usb_devices {
        println!(
            "{:<12} #{} {} {}{} at {} on {} ({}, {}{})",
            "usb",
            d.request_index,
            c(&d.device_id),
            d.label
                .as_deref()
                .map(|l| format!("\"{}\" ", usbpt_schemas::text::escape(l)))
                .unwrap_or_default(),
            c(&d.status),
            c(&d.address),
            c(&d.host),
            c(&d.controller),
            c(&d.follow),
            if d.held { ", held" } else { ", not held" }
        );
        if let Some(h) = &d.reattach_held {
            println!(
                "{:<12}   {} (seq {}): {} came back with fingerprint {}, expected {}",
                "",
                c(&h.reason),
                h.seq,
                c(&h.device_id),
                h.seen,
                h.expected
            );
        }
    }
    for f in &v.schedule_failures {
        println!("{:<12} seq {}: {}", "not placed", f.stamp.seq, c(&f.reason));
        for r in &f.host_rejections {
            println!("{:<12}   {}: {}", "", c(&r.host), c(&r.reason));
        }
    }
    for m in &v.migration_refusals {
        println!(
            "{:<12} seq {} ({}): {}",
            "refused",
            m.stamp.seq,
            if m.live {
                "live migration"
            } else {
                "migration"
            },
            c(&m.reason)
        );
    }
    Ok(())
}

/// `usbpt alarms`: one paragraph per alarm, its reason in full (it says what to do).
pub async fn alarms(global: &Global, a: AlarmsArgs) -> Result<()> {
    let path = if a.all {
        "/v1/alarms?all=true"
    } else {
        "/v1/alarms"
    };
    let doc = Api::new(global)?.get(path).await?;
    if a.json {
        return print_json(&doc);
    }
    let list = doc["alarms"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("no {}alarms", if a.all { "" } else { "active " });
        return Ok(());
    }
    for al in &list {
        let state = if al["active"].as_bool() == Some(true) {
            "ACTIVE".to_owned()
        } else {
            format!(
                "cleared seq {} at {}: {}",
                s(&al["cleared"]["seq"]),
                s(&al["cleared"]["at"]),
                escape(&s(&al["cleared"]["reason"]))
            )
        };
        println!(
            "{} lineage {} ({}:{} serial {}) raised seq {} at {} — {state}",
            s(&al["kind"]),
            s(&al["lineage_id"]),
            s(&al["vendor_id"]),
            s(&al["product_id"]),
            escape(&s(&al["serial"])),
            s(&al["raised"]["seq"]),
            s(&al["raised"]["at"]),
        );
        println!("  {}", escape(&s(&al["reason"])));
    }
    Ok(())
}
