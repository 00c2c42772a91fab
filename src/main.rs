//! `usbpt`: the one binary. Subcommands are added as the parts behind them exist; `--help`
//! lists only what works.

/// See the workspace `Cargo.toml` for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod agent_process;
mod api_auth;
mod auto_confirm;
mod cli;
mod cmd_agent;
mod cmd_bench;
mod cmd_creds;
mod cmd_ctl;
mod cmd_identity;
mod cmd_query;
mod cmd_replay;
mod cmd_serve;
mod cmd_up;
mod config;
mod defaults;
mod demo;
mod global;
mod huge_pages;
mod logging;
mod systemd;
mod tail;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Everything usbpt creates (views, outboxes, identities, the private nats-server's store,
    // config and log) is the invoking user's alone: directories 0700, files 0600.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    huge_pages::turn_off();
    let (cli, loaded) = match config::parse_args::<cli::Cli>(std::env::args_os().collect()) {
        Ok(parsed) => parsed,
        Err(config::ArgsError::Clap(e)) => e.exit(),
        Err(config::ArgsError::Config(e)) => {
            eprintln!("usbpt: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let cli::Cmd::Agent(args) = &cli.command {
        // The host agent runs as `usbpt-agent`, the small binary beside this one (ADR 0016):
        // this returns only when there is none (or the agent's settings are wrong: the same
        // path below then says why).
        cmd_agent::exec_agent_binary(
            &cli.global,
            args,
            &cmd_agent::Log::of(&cli.global, &cli.setup, &loaded),
        );
    }
    init_tracing(
        cli.global.verbose,
        cli.setup.log_format,
        loaded.file.log.filter.as_deref(),
    );
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
    match runtime.block_on(cli::run(cli, &loaded)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr, the whole cause chain.
            // Escaped: a cause can quote what a device or a server sent.
            eprintln!("usbpt: {}", usbpt_schemas::text::Escaped(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// Logs on stderr. Precedence of the filter: `USBPT_LOG`, then `-v`, then the config file's
/// `log.filter`, then `warn`.
fn init_tracing(verbose: u8, format: config::LogFormat, file_filter: Option<&str>) {
    logging::init(
        log_filter(verbose, file_filter),
        matches!(format, config::LogFormat::Json),
    );
}

/// The filter when `USBPT_LOG` is not set: `-v`, then the config file's `log.filter`, then `warn`.
pub(crate) fn log_filter(verbose: u8, file_filter: Option<&str>) -> &str {
    match (verbose, file_filter) {
        (0, Some(f)) => f,
        (0, None) => "warn",
        (1, _) => "info",
        (2, _) => "debug",
        _ => "trace",
    }
}
