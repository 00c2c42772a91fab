//! The HTTP API's token and front-door options (ADR 0006), for the servers (`serve`,
//! `projector --listen`, `up`, `demo`) and the CLI's HTTP client.
//!
//! Where the token comes from: `--api-token-file FILE` (env `USBPT_API_TOKEN_FILE`), else the
//! token itself in env `USBPT_API_TOKEN` (never a command-line argument: `ps` shows those).
//! `up` and `demo` otherwise generate `<data-dir>/api-token` (0600) at their first start; the
//! CLI otherwise reads that file when it exists. `serve` with no token refuses to start unless
//! `--insecure-no-api-token` is given.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use usbpt_api::guard::TOKEN_FILE;
use usbpt_api::{ApiToken, HttpPolicy};

use crate::global::Global;

/// The env var holding the token itself.
pub const TOKEN_ENV: &str = "USBPT_API_TOKEN";

/// The servers' front-door options (`serve`, `projector`, `up`, `demo`).
#[derive(Debug, Clone, Default, Args)]
pub struct ApiSecurityArgs {
    /// Serve reads (GET: documents, live events, metrics) without a token, for a read-only
    /// dashboard on a trusted network. Changes still need the token.
    #[arg(long, env = "USBPT_PUBLIC_READ", action = clap::ArgAction::SetTrue, value_parser = clap::builder::FalseyValueParser::new())]
    pub public_read: bool,
    /// Also answer requests whose Host header names NAME (e.g. a load balancer's name; any
    /// port). Loopback names and the listen address are always accepted. Repeatable.
    #[arg(long = "api-allow-host", value_name = "NAME")]
    pub allow_host: Vec<String>,
    /// Run the HTTP API with no token at all: anyone who can reach its port controls usbpt.
    /// Without a token and without this option, `serve` refuses to start.
    #[arg(long)]
    pub insecure_no_api_token: bool,
}

impl ApiSecurityArgs {
    /// The policy for an API listening on `listen` with `token` (`None`: refused unless
    /// `--insecure-no-api-token`).
    pub fn policy(&self, listen: SocketAddr, token: Option<ApiToken>) -> Result<HttpPolicy> {
        let mut policy = match token {
            Some(t) => HttpPolicy::with_token(t),
            None if self.insecure_no_api_token => {
                tracing::warn!("the HTTP API runs without a token (--insecure-no-api-token)");
                HttpPolicy::without_token()
            }
            None => bail!(
                "the HTTP API needs a token: give --api-token-file FILE or set {TOKEN_ENV} \
                 (generate one with `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > FILE`), \
                 or pass --insecure-no-api-token to run without one"
            ),
        };
        policy.public_read = self.public_read;
        policy.listen = Some(listen);
        for name in &self.allow_host {
            let n = name.trim().to_ascii_lowercase();
            if n.is_empty() || n.contains(|c: char| c == '/' || c.is_whitespace()) {
                bail!("--api-allow-host {name:?}: give a host name, without scheme or path");
            }
            policy.allowed_hosts.push(n);
        }
        Ok(policy)
    }
}

impl Global {
    /// The token given explicitly: `--api-token-file`, else env `USBPT_API_TOKEN`.
    pub fn given_api_token(&self) -> Result<Option<ApiToken>> {
        if let Some(file) = &self.api_token_file {
            return Ok(Some(ApiToken::read(file)?));
        }
        match std::env::var(TOKEN_ENV) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(ApiToken::parse(&t, TOKEN_ENV)?)),
            _ => Ok(None),
        }
    }

    /// The token the CLI sends: the given one, else `<data-dir>/api-token` when it exists.
    pub fn client_api_token(&self) -> Result<Option<ApiToken>> {
        if let Some(t) = self.given_api_token()? {
            return Ok(Some(t));
        }
        let Ok(data) = self.data_dir_or_default() else {
            return Ok(None);
        };
        let file = token_path(&data);
        if file.is_file() {
            Ok(Some(ApiToken::read(&file)?))
        } else {
            Ok(None)
        }
    }
}

/// `<data>/api-token`.
pub fn token_path(data: &Path) -> PathBuf {
    data.join(TOKEN_FILE)
}

/// The token `up` and `demo` run with: the given one, else `<data>/api-token`, generated (0600,
/// from the OS CSPRNG) at the first start. Returns it and the file it is in, if any.
pub fn ensure_token(global: &Global, data: &Path) -> Result<(ApiToken, Option<PathBuf>)> {
    if let Some(t) = global.given_api_token()? {
        return Ok((t, global.api_token_file.clone()));
    }
    let path = token_path(data);
    let (token, _) =
        ApiToken::ensure(&path).with_context(|| format!("the API token in {}", data.display()))?;
    Ok((token, Some(path)))
}

/// Tells the operator how to open the dashboard: with the token in the URL's fragment when
/// stdout is a terminal (a fragment never reaches a server or a log), else only where the token
/// file is (stdout may be a journal).
pub fn announce(prefix: &str, base: &str, token: &ApiToken, file: Option<&Path>) {
    let base = base.trim_end_matches('/');
    if let Some(f) = file {
        println!(
            "{prefix}API token in {} (the CLI reads it from there)",
            f.display()
        );
    }
    if std::io::stdout().is_terminal() {
        println!(
            "{prefix}open the dashboard at {base}/#token={}",
            token.secret()
        );
    } else {
        println!("{prefix}open the dashboard at {base}/#token=<the token>");
    }
}
