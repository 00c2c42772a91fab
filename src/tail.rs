//! `usbpt events tail`.

use std::io::Write;

use anyhow::{anyhow, Result};
use serde_json::json;
use usbpt_bus::{Bus, StartAt};
use usbpt_schemas::text::{escape, escape_json, Escaped};

pub async fn tail(bus: &Bus, from_start: bool, as_json: bool, limit: Option<u64>) -> Result<()> {
    let start = if from_start {
        StartAt::Beginning
    } else {
        StartAt::New
    };
    let mut reader = bus.reader(start, None).await?;
    let mut seen = 0u64;
    let stdout = std::io::stdout();
    while limit.is_none_or(|l| seen < l) {
        let msg = reader
            .next()
            .await
            .map_err(|e| anyhow!("reading the stream: {e}"))?;
        let seq = msg.seq;
        let subject = Escaped(msg.subject.as_str());
        let line = match msg.decode() {
            Ok(env) if as_json => {
                json!({"seq": seq, "subject": msg.subject.as_str(), "event": env}).to_string()
            }
            Ok(env) => {
                let mut line = format!(
                    "{seq:>8}  {}  {:<22}  {subject}",
                    env.occurred_at,
                    env.body.kind(),
                );
                if let Some((d, fingerprint)) = env.body.discovery() {
                    // What a person looks for in a hotplug, escaped: it came from the device.
                    let field = |v: &Option<String>| v.as_deref().map(|s| escape(s).into_owned());
                    let field = |v: &Option<String>| field(v).unwrap_or_else(|| "-".into());
                    line.push_str(&format!(
                        "  {}:{} \"{}\" \"{}\" serial {} fingerprint {}",
                        d.descriptors.vendor_id,
                        d.descriptors.product_id,
                        field(&d.descriptors.manufacturer),
                        field(&d.descriptors.product),
                        field(&d.descriptors.serial),
                        fingerprint.map_or_else(|| "-".to_owned(), |f| f.to_string()),
                    ));
                }
                if let Some(o) = &env.origin {
                    // Who asked for the command (ADR 0014); client-supplied, escaped.
                    line.push_str(&format!("  by {}", escape(&o.summary())));
                }
                line
            }
            Err(e) if as_json => {
                json!({"seq": seq, "subject": msg.subject.as_str(), "undecodable": e.to_string()})
                    .to_string()
            }
            Err(e) => format!(
                "{seq:>8}  undecodable on {subject}: {}",
                Escaped(&e.to_string())
            ),
        };
        // JSON lines too: DEL, C1 and bidirectional controls as `\u` escapes.
        let line = escape_json(&line);
        let mut out = stdout.lock();
        writeln!(out, "{line}")?;
        out.flush()?;
        seen += 1;
    }
    Ok(())
}
