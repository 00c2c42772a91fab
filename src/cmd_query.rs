//! Queries (INTERFACES.md): `devices`, `device show`, `history`, `hypervisor show`,
//! `flavor list|show`, `server list|show`. They read the view through the HTTP API (`--api`).
//! With `--json`: exactly one JSON document on stdout, as the API returned it; otherwise a
//! readable table. Errors: non-zero exit, one line on stderr.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;
use usbpt_projector::DeviceStatus;
use usbpt_schemas::text::{escape, escape_json};
use usbpt_schemas::HostName;

use crate::cli::Global;

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
            let message = json["error"]["message"]
                .as_str()
                .map_or_else(|| body.clone(), str::to_owned);
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

fn short(id: &Value) -> String {
    s(id)
}

fn device_rows(devices: &[Value]) -> Vec<Vec<String>> {
    devices
        .iter()
        .map(|d| {
            vec![
                short(&d["id"]),
                s(&d["host"]),
                s(&d["status"]),
                format!("{}:{}", s(&d["vendor_id"]), s(&d["product_id"])),
                s(&d["address"]),
                s(&d["port_path"]),
                s(&d["serial"]),
                s(&d["holder"]),
                s(&d["label"]),
                s(&d["product"]),
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
    let list = doc["devices"].as_array().cloned().unwrap_or_default();
    table(&DEVICE_HEADERS, &device_rows(&list));
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
    let d = &doc["device"];
    let fields = [
        "id",
        "lineage_id",
        "lineage_kind",
        "label",
        "host",
        "status",
        "holder",
        "current",
        "address",
        "port_path",
        "vendor_id",
        "product_id",
        "serial",
        "manufacturer",
        "product",
        "vendor_db",
        "model_db",
        "speed",
        "usb_version",
        "syspath",
        "boot_id",
        "supersedes",
    ];
    for f in fields {
        println!("{f:<14} {}", s(&d[f]));
    }
    println!(
        "{:<14} seq {} at {}",
        "discovered",
        s(&d["discovered"]["seq"]),
        s(&d["discovered"]["at"])
    );
    if !d["invalidation"].is_null() {
        let i = &d["invalidation"];
        println!(
            "{:<14} seq {} at {} ({}), superseded by {}",
            "invalidated",
            s(&i["seq"]),
            s(&i["at"]),
            s(&i["reason"]),
            s(&i["superseded_by"])
        );
    }
    if !d["attachment"].is_null() {
        let a = &d["attachment"];
        println!(
            "{:<14} to {} at {} ({}, seq {})",
            "attached",
            s(&a["server_id"]),
            s(&a["address"]),
            s(&a["method"]),
            s(&a["seq"])
        );
    }
    for h in d["holders"].as_array().into_iter().flatten() {
        println!("{:<14} {}", "held by", holding(h));
    }
    Ok(())
}

fn holding(h: &Value) -> String {
    let mut out = format!(
        "{} ({}) from seq {}",
        s(&h["server_id"]),
        s(&h["how"]),
        s(&h["from"]["seq"])
    );
    if !h["ended"].is_null() {
        out.push_str(&format!(
            " until seq {} ({})",
            s(&h["ended"]["seq"]),
            s(&h["ended"]["reason"])
        ));
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
    let l = &doc["lineage"];
    println!(
        "lineage {} ({}, {}:{}, serial {}): {} enumeration(s), now {} on {}",
        s(&l["id"]),
        s(&l["kind"]),
        s(&l["vendor_id"]),
        s(&l["product_id"]),
        s(&l["serial"]),
        s(&l["enumerations"]),
        s(&l["current_device_id"]),
        s(&l["current_host"]),
    );
    if l["label"].is_string() {
        println!("label {}", s(&l["label"]));
    }
    let c = &doc["claim"];
    if !c.is_null() {
        println!(
            "claimed by server {} (follow {}, since seq {})",
            s(&c["server_id"]),
            s(&c["follow"]),
            s(&c["claimed"]["seq"])
        );
    }
    let rows: Vec<Vec<String>> = doc["enumerations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let inv = &e["invalidation"];
            let ended = if inv.is_null() {
                "-".to_owned()
            } else {
                format!("{} {}", s(&inv["at"]), s(&inv["reason"]))
            };
            let holders: Vec<String> = e["holders"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| s(&h["server_id"]))
                .collect();
            vec![
                s(&e["ordinal"]),
                s(&e["id"]),
                s(&e["host"]),
                s(&e["address"]),
                s(&e["port_path"]),
                s(&e["status"]),
                s(&e["discovered"]["at"]),
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
            "DISCOVERED",
            "INVALIDATED",
            "HOLDERS",
        ],
        &rows,
    );
    Ok(())
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
    let h = &doc["hypervisor"];
    println!(
        "hypervisor {} (agent {}, boot {}, {})",
        s(&h["hypervisor_hostname"]),
        s(&h["agent_version"]),
        s(&h["boot_id"]),
        s(&h["hypervisor_uri"])
    );
    let rows: Vec<Vec<String>> = h["usb_device_stats"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            vec![
                s(&d["id"]),
                s(&d["address"]),
                format!("{}:{}", s(&d["vendor_id"]), s(&d["product_id"])),
                s(&d["port_id"]),
                s(&d["status"]),
                s(&d["instance_uuid"]),
                s(&d["lineage_id"]),
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
    let rows: Vec<Vec<String>> = doc["flavors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| vec![s(&f["name"]), s(&f["id"]), usb_summary(&f["usb_devices"])])
        .collect();
    table(&["NAME", "ID", "USB"], &rows);
    Ok(())
}

/// One line per USB request of a flavor.
fn usb_summary(usb: &Value) -> String {
    let parts: Vec<String> = usb
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let sel = &r["selector"];
            let what = if let Some(m) = sel.get("match") {
                let mut t = format!(
                    "{}:{} x{}",
                    s(&m["vendor_id"]),
                    s(&m["product_id"]),
                    s(&m["count"])
                );
                if !m["serial"].is_null() {
                    t.push_str(&format!(" serial {}", s(&m["serial"])));
                }
                t
            } else if let Some(l) = sel.get("lineage") {
                format!("lineage {}", s(l))
            } else if let Some(e) = sel.get("enumeration") {
                format!("device {}", s(e))
            } else {
                sel.to_string()
            };
            format!("{what} ({}, {})", s(&r["controller"]), s(&r["follow"]))
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
    let f = &doc["flavor"];
    println!("{:<10} {}", "name", s(&f["name"]));
    println!("{:<10} {}", "id", s(&f["id"]));
    println!(
        "{:<10} seq {} at {}",
        "created",
        s(&f["created"]["seq"]),
        s(&f["created"]["at"])
    );
    for (i, r) in f["usb_devices"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        println!(
            "{:<10} {}",
            format!("usb[{i}]"),
            usb_summary(&Value::Array(vec![r.clone()]))
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
    let rows: Vec<Vec<String>> = doc["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            vec![
                s(&v["name"]),
                s(&v["id"]),
                s(&v["status"]),
                s(&v["host"]),
                s(&v["flavor"]["id"]),
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
    let v = &doc["server"];
    println!("{:<12} {}", "name", s(&v["name"]));
    println!("{:<12} {}", "id", s(&v["id"]));
    println!(
        "{:<12} {} {}",
        "status",
        s(&v["status"]),
        s(&v["state_detail"])
    );
    println!("{:<12} {}", "host", s(&v["host"]));
    println!(
        "{:<12} {} ({})",
        "flavor",
        s(&v["flavor"]["name"]),
        s(&v["flavor"]["id"])
    );
    for d in v["usb_devices"].as_array().into_iter().flatten() {
        println!(
            "{:<12} #{} {} {}{} at {} on {} ({}, {}{})",
            "usb",
            s(&d["request_index"]),
            s(&d["device_id"]),
            if d["label"].is_string() {
                format!("\"{}\" ", s(&d["label"]))
            } else {
                String::new()
            },
            s(&d["status"]),
            s(&d["address"]),
            s(&d["host"]),
            s(&d["controller"]),
            s(&d["follow"]),
            if d["held"] == Value::Bool(true) {
                ", held"
            } else {
                ", not held"
            }
        );
    }
    for f in v["schedule_failures"].as_array().into_iter().flatten() {
        println!(
            "{:<12} seq {}: {}",
            "not placed",
            s(&f["stamp"]["seq"]),
            s(&f["reason"])
        );
        for r in f["host_rejections"].as_array().into_iter().flatten() {
            println!("{:<12}   {}: {}", "", s(&r["host"]), s(&r["reason"]));
        }
    }
    for m in v["migration_refusals"].as_array().into_iter().flatten() {
        println!(
            "{:<12} seq {} ({}): {}",
            "refused",
            s(&m["stamp"]["seq"]),
            if m["live"] == Value::Bool(true) {
                "live migration"
            } else {
                "migration"
            },
            s(&m["reason"])
        );
    }
    Ok(())
}
