//! `usbpt`: the one binary. Subcommands are added as the parts behind them exist; `--help`
//! lists only what works.

/// See the workspace `Cargo.toml` for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod api_auth;
mod auto_confirm;
mod cli;
mod cmd_agent;
mod cmd_bench;
mod cmd_creds;
mod cmd_ctl;
mod cmd_query;
mod cmd_replay;
mod cmd_serve;
mod cmd_up;
mod demo;
mod tail;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Everything usbpt creates (views, outboxes, identities, the private nats-server's store,
    // config and log) is the invoking user's alone: directories 0700, files 0600.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let cli = cli::Cli::parse();
    if matches!(cli.command, cli::Cmd::Agent(_)) {
        cmd_agent::lean_process();
    }
    init_tracing(cli.global.verbose);
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
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr, the whole cause chain.
            // Escaped: a cause can quote what a device or a server sent.
            eprintln!("usbpt: {}", usbpt_schemas::text::Escaped(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("USBPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
