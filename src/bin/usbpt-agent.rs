//! `usbpt-agent`: the host agent alone (ADR 0016). `usbpt agent` resolves its settings (flags,
//! environment, config file) and executes this binary with them in `USBPT_AGENT_SPEC`; it holds
//! only the agent's code — udev, the outbox, NATS — and does not link libvirt: libvirt work runs
//! in `usbpt agent-executor`, a child started when there is work and stopped when idle. Its
//! resident memory is what an idle hypervisor host pays for usbpt (`docs/performance.md`).

/// See the workspace `Cargo.toml` for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../agent_process.rs"]
mod agent_process;
#[path = "../huge_pages.rs"]
mod huge_pages;
#[path = "../logging.rs"]
mod logging;
#[path = "../systemd.rs"]
mod systemd;

use std::process::ExitCode;

fn main() -> ExitCode {
    // As `usbpt`: everything the agent creates is the invoking user's alone.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    huge_pages::turn_off();
    let Some(json) = std::env::var_os(agent_process::SPEC_ENV) else {
        eprintln!(
            "usbpt-agent: started by `usbpt agent`, which passes the settings in {}; run `usbpt agent --help`",
            agent_process::SPEC_ENV
        );
        return ExitCode::from(2);
    };
    // Not inherited by the executor process.
    std::env::remove_var(agent_process::SPEC_ENV);
    let spec: agent_process::AgentSpec = match serde_json::from_str(&json.to_string_lossy()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("usbpt-agent: unreadable {}: {e}", agent_process::SPEC_ENV);
            return ExitCode::from(2);
        }
    };
    logging::init(&spec.log_filter, spec.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("usbpt: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(agent_process::run(spec)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usbpt: {}", usbpt_schemas::text::Escaped(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
