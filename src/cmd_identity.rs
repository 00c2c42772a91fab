//! Fleet-wide identity from the CLI (issue 18 items 2–5): `label`, `conflict resolve` and
//! `fingerprint accept` (commands over NATS, like `boot`), `find` and `custody` (reads through
//! the HTTP API's typed documents, [`usbpt_api::identity`]). Human output escapes every string
//! that came from outside.

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use usbpt_api::identity::{CustodyDoc, FindDoc, LineageEnvelope};
use usbpt_projector::custody::end_str;
use usbpt_schemas::commands::Command;
use usbpt_schemas::text::escape;
use usbpt_schemas::{HostName, LineageId, ProductId, Timestamp, VendorId};

use crate::cmd_query::{print_json, table, Api};
use crate::global::Global;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["label", "remove"])))]
pub struct LabelArgs {
    /// The lineage to name: its id (`usbpt history DEVICE` shows a device's lineage id), or the
    /// exact label it has now (to rename it).
    pub lineage: String,
    /// The label: at most 64 bytes, no control characters, no leading or trailing space.
    pub label: Option<String>,
    /// Remove the lineage's label.
    #[arg(long)]
    pub remove: bool,
    #[arg(long)]
    pub json: bool,
}

impl LabelArgs {
    /// The command, once LINEAGE is resolved ([`lineage_named`]); the new label is checked
    /// first, so a bad one is refused without asking the API.
    pub async fn command(self, global: &Global) -> Result<(Command, bool)> {
        if let Some(l) = &self.label {
            usbpt_schemas::label::check(l)?;
        }
        Ok((
            Command::LabelLineage {
                lineage: lineage_named(global, &self.lineage).await?,
                label: self.label,
            },
            self.json,
        ))
    }
}

/// `usbpt conflict …`: a serial lineage present on two hosts (`lineage_conflict`).
#[derive(Debug, Subcommand)]
pub enum ConflictCmd {
    /// Keep the copy on HOST: the lineage's conflict clears, the copy on HOST is schedulable
    /// (taking the lineage over if it was the one held back), the other is set aside until it
    /// is unplugged. Recorded as history (`LineageConflictResolved`).
    Resolve(ResolveArgs),
}

#[derive(Debug, Args)]
pub struct ResolveArgs {
    /// A lineage id, or an exact label (`usbpt alarms` lists the conflicts).
    pub lineage: String,
    /// The host whose copy keeps the lineage: one of the two the alarm names.
    #[arg(long)]
    pub keep: HostName,
    #[arg(long)]
    pub json: bool,
}

/// `usbpt fingerprint …`: a serial lineage that came back with other descriptors
/// (`fingerprint_changed`).
#[derive(Debug, Subcommand)]
pub enum FingerprintCmd {
    /// Accept the fingerprint the lineage now reports as its own: the alarm clears, and a
    /// server holding the lineage has it re-attached. Recorded as history
    /// (`FingerprintAccepted`).
    Accept(AcceptArgs),
}

#[derive(Debug, Args)]
pub struct AcceptArgs {
    /// A lineage id, or an exact label (`usbpt alarms` lists the changed fingerprints).
    pub lineage: String,
    #[arg(long)]
    pub json: bool,
}

/// The lineage a LINEAGE argument names: a lineage id as given (the command side refuses an
/// unknown one, and says when it is a device's id), anything else looked up as a label through
/// the HTTP API (`GET /v1/lineages/{label}`, as `usbpt custody` does).
async fn lineage_named(global: &Global, lineage: &str) -> Result<LineageId> {
    if let Ok(id) = lineage.parse::<LineageId>() {
        return Ok(id);
    }
    let raw = Api::new(global)?
        .get(&format!("/v1/lineages/{}", pct(lineage)))
        .await
        .with_context(|| format!("looking up the lineage labelled {}", e(lineage)))?;
    let doc: LineageEnvelope =
        serde_json::from_value(raw).context("reading the lineage document")?;
    Ok(doc.lineage.id)
}

/// `usbpt conflict`.
pub async fn conflict(global: &Global, c: ConflictCmd) -> Result<()> {
    let ConflictCmd::Resolve(a) = c;
    let lineage = lineage_named(global, &a.lineage).await?;
    crate::cmd_ctl::send(
        global,
        Command::ResolveConflict {
            lineage,
            keep: a.keep,
        },
        a.json,
    )
    .await
}

/// `usbpt fingerprint`.
pub async fn fingerprint(global: &Global, c: FingerprintCmd) -> Result<()> {
    let FingerprintCmd::Accept(a) = c;
    let lineage = lineage_named(global, &a.lineage).await?;
    crate::cmd_ctl::send(global, Command::AcceptFingerprint { lineage }, a.json).await
}

#[derive(Debug, Args)]
pub struct FindArgs {
    /// The serial the device reports (exact).
    #[arg(long)]
    pub serial: Option<String>,
    /// Vendor id, 4 hex digits.
    #[arg(long)]
    pub vendor: Option<VendorId>,
    /// Product id, 4 hex digits.
    #[arg(long)]
    pub product: Option<ProductId>,
    /// Part of a label (case-insensitive).
    #[arg(long)]
    pub label: Option<String>,
    /// A descriptor fingerprint (base64, as `usbpt device show` prints it), or its first 8+ characters.
    #[arg(long)]
    pub fingerprint: Option<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct CustodyArgs {
    /// A lineage id, a device id (its lineage) or an exact label.
    pub lineage: String,
    /// Only intervals that were open at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<Timestamp>,
    /// Only intervals that began at or before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<Timestamp>,
    /// The API's JSON document.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// One CSV row per enumeration held (RFC 4180), for an audit.
    #[arg(long)]
    pub csv: bool,
}

/// Percent-encodes everything but RFC 3986's unreserved characters (labels carry spaces, `#`,
/// `/` …).
pub(crate) fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn e(s: &str) -> String {
    escape(s).into_owned()
}

fn opt(s: Option<&str>) -> String {
    s.map_or_else(|| "-".to_owned(), e)
}

/// `usbpt find`.
pub async fn find(global: &Global, a: FindArgs) -> Result<()> {
    let mut q = Vec::new();
    let mut push = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            q.push(format!("{k}={}", pct(&v)));
        }
    };
    push("serial", a.serial);
    push("vendor", a.vendor.map(|v| v.to_string()));
    push("product", a.product.map(|p| p.to_string()));
    push("label", a.label);
    push("fingerprint", a.fingerprint);
    let raw = Api::new(global)?
        .get(&format!("/v1/find?{}", q.join("&")))
        .await?;
    if a.json {
        return print_json(&raw);
    }
    let doc: FindDoc = serde_json::from_value(raw).context("reading the find document")?;
    let rows: Vec<Vec<String>> = doc
        .devices
        .iter()
        .map(|d| {
            vec![
                if d.present { "here" } else { "gone" }.to_owned(),
                e(d.host.as_str()),
                e(&d.port_path.to_string()),
                d.address.clone(),
                d.status.as_str().to_owned(),
                d.holder_name
                    .as_ref()
                    .map(|n| e(n.as_str()))
                    .or(d.holder.map(|h| h.to_string()))
                    .unwrap_or_else(|| "-".to_owned()),
                format!("{}:{}", d.vendor_id, d.product_id),
                opt(d.serial.as_deref()),
                opt(d.label.as_deref()),
                format!("{} (seq {})", d.last_seen.at, d.last_seen.seq),
                d.lineage_id.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "WHERE",
            "HOST",
            "PORT",
            "ADDRESS",
            "STATUS",
            "HOLDER",
            "ID",
            "SERIAL",
            "LABEL",
            "LAST SEEN",
            "LINEAGE",
        ],
        &rows,
    );
    Ok(())
}

/// One CSV field (RFC 4180): quoted when it holds a comma, quote or line break; a leading
/// `=`, `+`, `-` or `@` is prefixed with `'` so a spreadsheet does not run it as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Who asked, for a table or CSV cell (ADR 0014): `via:principal[@address]`, empty when an
/// agent's event or an event without an origin began or ended the interval.
fn who(o: Option<&usbpt_schemas::Origin>) -> String {
    o.map(usbpt_schemas::Origin::summary).unwrap_or_default()
}

/// The CSV export: one row per enumeration held, the interval's columns repeated; who asked
/// (`started_by`, `ended_by`) last.
pub fn custody_csv(doc: &CustodyDoc) -> String {
    let mut out = String::from(
        "lineage_id,label,server_id,server_name,started,from,to,ended,segment,device_id,host,port_path,address,how,segment_from,attached,segment_to,invalidation,started_by,ended_by\n",
    );
    let stamp = |s: Option<usbpt_projector::Stamp>| s.map(|s| s.at.to_string()).unwrap_or_default();
    for i in &doc.intervals {
        for (n, g) in i.segments.iter().enumerate() {
            let how = serde_json::to_value(g.how)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let row = [
                doc.lineage.id.to_string(),
                doc.lineage.label.clone().unwrap_or_default(),
                i.server_id.to_string(),
                i.server_name
                    .as_ref()
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
                i.started.as_str().to_owned(),
                i.from.at.to_string(),
                stamp(i.to),
                i.ended.map(end_str).unwrap_or_default().to_owned(),
                (n + 1).to_string(),
                g.device_id.to_string(),
                g.host.to_string(),
                g.port_path.to_string(),
                g.address.nova_address(),
                how,
                g.from.at.to_string(),
                stamp(g.attached),
                stamp(g.to),
                g.invalidation.map(|r| format!("{r:?}")).unwrap_or_default(),
                who(i.started_by.as_ref()),
                who(i.ended_by.as_ref()),
            ];
            let line: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
            out.push_str(&line.join(","));
            out.push('\n');
        }
    }
    out
}

/// `usbpt custody`.
pub async fn custody(global: &Global, a: CustodyArgs) -> Result<()> {
    let mut q = Vec::new();
    if let Some(t) = a.since {
        q.push(format!("since={}", pct(&t.to_string())));
    }
    if let Some(t) = a.until {
        q.push(format!("until={}", pct(&t.to_string())));
    }
    let query = if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    };
    let raw = Api::new(global)?
        .get(&format!("/v1/lineages/{}/custody{query}", pct(&a.lineage)))
        .await?;
    if a.json {
        return print_json(&raw);
    }
    let doc: CustodyDoc = serde_json::from_value(raw).context("reading the custody document")?;
    if a.csv {
        // CSV cells are data for a spreadsheet; terminal controls are escaped all the same.
        print!("{}", usbpt_schemas::text::escape_json(&custody_csv(&doc)));
        return Ok(());
    }
    let l = &doc.lineage;
    println!(
        "lineage {} {}:{} serial {} label {}: {} interval(s)",
        l.id,
        l.vendor_id,
        l.product_id,
        opt(l.serial.as_deref()),
        opt(l.label.as_deref()),
        doc.intervals.len()
    );
    let rows: Vec<Vec<String>> = doc
        .intervals
        .iter()
        .map(|i| {
            let hosts: Vec<String> = i
                .segments
                .iter()
                .map(|g| format!("{}@{}", e(g.host.as_str()), g.address.nova_address()))
                .collect();
            vec![
                i.server_name
                    .as_ref()
                    .map_or_else(|| i.server_id.to_string(), |n| e(n.as_str())),
                e(i.host.as_str()),
                i.started.as_str().to_owned(),
                format!("{} (seq {})", i.from.at, i.from.seq),
                i.to.map_or_else(
                    || "held now".to_owned(),
                    |t| format!("{} (seq {})", t.at, t.seq),
                ),
                i.ended.map_or("-", end_str).to_owned(),
                hosts.join(" → "),
                e(&who(i.started_by.as_ref())),
                e(&who(i.ended_by.as_ref())),
            ]
        })
        .collect();
    table(
        &[
            "SERVER",
            "HOST",
            "STARTED",
            "FROM",
            "TO",
            "ENDED",
            "ENUMERATIONS",
            "STARTED BY",
            "ENDED BY",
        ],
        &rows,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_never_formulas() {
        assert_eq!(csv_field("erp-1"), "erp-1");
        assert_eq!(csv_field("ERP key #3"), "ERP key #3");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_field("-1,2"), "\"'-1,2\"");
        assert_eq!(pct("ERP key #3/ü"), "ERP%20key%20%233%2F%C3%BC");
    }
}
