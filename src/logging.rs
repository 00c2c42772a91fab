//! Logs on stderr, for `usbpt` and `usbpt-agent` alike. Under systemd (stderr is the journal:
//! `JOURNAL_STREAM` is set) text lines carry no timestamp, journald adds its own.

/// `USBPT_LOG` when set, else `default`; JSON lines or text.
pub fn init(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("USBPT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().with_current_span(false).init();
    } else if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.with_ansi(false).without_time().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
