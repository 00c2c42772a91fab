//! The service defaults, each in one place: the flags' defaults (and so `usbpt config show` and
//! the man pages), and what `up` and `demo` run with, read them here. Values other crates
//! decide are re-exported, not repeated.

use std::time::Duration;

/// Where the HTTP API listens: loopback, Nova's port.
pub const API_LISTEN: &str = usbpt_api::DEFAULT_LISTEN;
/// The API the CLI reads: the one a default `serve` or `up` on this machine answers on.
pub const API_URL: &str = "http://127.0.0.1:8774";
/// NATS's own port; `up` runs its private server there when it is free.
pub const NATS_PORT: u16 = 4222;
/// The bus: a nats-server on this machine, on [`NATS_PORT`].
pub const NATS_URL: &str = "nats://127.0.0.1:4222";
/// The libvirt URI a host agent drives.
pub const HYPERVISOR_URI: &str = "qemu:///system";
/// Where the kernel says which boot this is.
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";
/// A root host agent's data dir (others: `$XDG_STATE_HOME/usbpt` or `~/.local/state/usbpt`).
pub const SYSTEM_DATA_DIR: &str = "/var/lib/usbpt";
/// The projector's durable consumer.
pub const PROJECTOR_CONSUMER: &str = usbpt_schemas::subjects::js::PROJECTOR_CONSUMER;
/// Events per fetch and per redb transaction.
pub const PROJECTOR_BATCH: u64 = 1000;
/// `--view-sync-ms`: 0, every commit of the view is durable before it is acknowledged.
pub const VIEW_SYNC_MS: u64 = 0;
/// Live-event clients served at once.
pub const SSE_MAX_CLIENTS: u64 = 1024;
/// How long a claimed device may be gone before its claim is released.
pub const GRACE: Duration = usbpt_commands::reactor::DEFAULT_GRACE;
/// When a host agent calls a re-enumerating lineage flapping (threshold, window, quiet).
pub const FLAP: usbpt_agent::FlapSettings = usbpt_agent::FlapSettings::DEFAULT;

/// How long the agent's libvirt executor process may stay without work (ADR 0016).
pub const EXECUTOR_IDLE: Duration = usbpt_agent::libvirt::child::DEFAULT_IDLE;
/// Commands handled at once by one process.
pub const COMMAND_CONCURRENCY: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_urls_name_the_default_addresses() {
        assert_eq!(API_URL, format!("http://{API_LISTEN}"));
        assert_eq!(NATS_URL, format!("nats://127.0.0.1:{NATS_PORT}"));
    }
}
