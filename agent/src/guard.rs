//! The agent checks its work before its hands touch libvirt (ADR 0005): control work is carried
//! out only when it arrived on this host's control subject, its envelope belongs on that
//! subject (so its kind is one the command side emits there and its host is this host), and —
//! when the command handler's public key is configured, as `usbpt up` and `usbpt demo` do — it
//! carries the command handler's signature of exactly these bytes. Anything else is refused,
//! logged and counted, and acknowledged so it is not redelivered.

use std::sync::atomic::{AtomicU64, Ordering};

use usbpt_bus::auth;
use usbpt_schemas::subjects::{self, SubjectScope};
use usbpt_schemas::{Envelope, HostName};

/// Control messages refused by every agent in this process since it started.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// How many control messages were refused (for tests and the progress line).
pub fn refused_total() -> u64 {
    REFUSED.load(Ordering::Relaxed)
}

/// Counts one refusal and returns the new total.
pub(crate) fn count_refusal() -> u64 {
    REFUSED.fetch_add(1, Ordering::Relaxed) + 1
}

/// Whether `env` (decoded from `payload`, received on `subject` with the command handler's
/// `signature` header, if any) is work this host's agent may carry out; the reason when it is
/// not.
pub fn check(
    host: &HostName,
    subject: &str,
    payload: &[u8],
    signature: Option<&str>,
    env: &Envelope,
    control_key: Option<&str>,
) -> Result<(), String> {
    match subjects::scope_of(subject) {
        Ok(SubjectScope::ControlForHost(h)) if &h == host => {}
        _ => return Err(format!("{subject} is not this host's control subject")),
    }
    if !subjects::matches(env, subject) {
        return Err(format!(
            "a {} for {} does not belong on {subject}",
            env.body.kind(),
            subjects::for_event(env)
        ));
    }
    if let Some(key) = control_key {
        let signature = signature.ok_or_else(|| "not signed by the command handler".to_owned())?;
        if !auth::verify(key, payload, signature) {
            return Err("the signature is not the command handler's".to_owned());
        }
    }
    Ok(())
}
