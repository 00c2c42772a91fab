//! The HTTP API's front door (issue 14 items 5 and 6, ADR 0006): every request passes, in order,
//!
//! 1. the **Host allow-list** (against DNS rebinding): the `Host` header's name must be a
//!    loopback name (`localhost`, `127.0.0.1`, `[::1]`), the listen address, or a name the
//!    operator added (`--api-allow-host`); any port. Anything else is a 400 naming the header;
//! 2. the **bearer token**: every route but the version documents (`/`, `/v2.1`,
//!    `/identity/v3`) and the dashboard's static files needs `Authorization: Bearer T` or
//!    `X-Auth-Token: T` (what OpenStack clients send). Without one: 401 with
//!    `WWW-Authenticate`; with a wrong one: 403. The comparison is constant-time (`subtle`);
//!    the token is never echoed or logged. `--public-read` opens `GET`/`HEAD` (reads, live
//!    events, metrics) without a token; anything that changes state still needs it;
//! 3. a **concurrency limit** (503 with `Retry-After` beyond it, never a queue) and a **request
//!    timeout** on the handler's answer (503 after it). The timeout covers producing the response
//!    head, not streaming its body, so live event streams are never cut.
//!
//! Request bodies are limited by [`MAX_BODY`] (413 beyond it; the JSON extractor's rejections
//! become 413, 415 or 400 in `crate::rejection`).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use usbpt_schemas::{Origin, Via};

use crate::ApiError;

/// The largest request body accepted (a flavor with every USB request there can be is a few KiB).
pub const MAX_BODY: usize = 64 * 1024;

/// An API token: 32 random bytes from the OS CSPRNG, as 64 hex digits. Its `Debug` does not
/// show it.
#[derive(Clone)]
pub struct ApiToken(Arc<str>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(…)")
    }
}

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the API token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("writing the API token file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the API token {0} is not usable: {1}")]
    Invalid(String, &'static str),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

impl ApiToken {
    /// A new token from the OS CSPRNG (`getrandom`).
    pub fn generate() -> Result<Self, TokenError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| TokenError::Random(e.to_string()))?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self(hex.into()))
    }

    /// A token given as text (a file's content or `USBPT_API_TOKEN`): surrounding whitespace is
    /// dropped; it must be 16 to 512 visible ASCII characters (a header value). `what` names the
    /// source in the error, never the value.
    pub fn parse(text: &str, what: &str) -> Result<Self, TokenError> {
        let t = text.trim();
        if t.len() < 16 {
            return Err(TokenError::Invalid(
                what.to_owned(),
                "shorter than 16 characters",
            ));
        }
        if t.len() > 512 {
            return Err(TokenError::Invalid(
                what.to_owned(),
                "longer than 512 characters",
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::Invalid(
                what.to_owned(),
                "not visible ASCII (no spaces or control characters)",
            ));
        }
        Ok(Self(t.into()))
    }

    /// Reads a token file.
    pub fn read(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The token in `path`, generating it (file mode `0600`, created exclusively) when the file
    /// does not exist. Returns the token and whether it was generated now.
    pub fn ensure(path: &Path) -> Result<(Self, bool), TokenError> {
        if path.exists() {
            return Ok((Self::read(path)?, false));
        }
        let token = Self::generate()?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(token.secret().as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()
        };
        write().map_err(|source| TokenError::Write {
            path: path.display().to_string(),
            source,
        })?;
        Ok((token, true))
    }

    /// The token's text: for the `Authorization` header and the dashboard URL only.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// Constant-time equality with what a client presented.
    fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

/// The file name of the token `usbpt up` and `usbpt demo` generate under the data dir.
pub const TOKEN_FILE: &str = "api-token";

/// What the front door enforces.
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    /// The token every non-public route needs; `None` only when the operator chose to run
    /// without one (`usbpt serve --insecure-no-api-token`).
    pub token: Option<ApiToken>,
    /// `GET`/`HEAD` routes (reads, live events, metrics) need no token.
    pub public_read: bool,
    /// Host names accepted besides the loopback names and the listen address (lowercase, no
    /// port; an IPv6 address in brackets).
    pub allowed_hosts: Vec<String>,
    /// The listen address, whose IP is an accepted Host.
    pub listen: Option<SocketAddr>,
    /// Requests handled at once; more get 503.
    pub max_concurrent: usize,
    /// How long a handler may take to produce its response head.
    pub request_timeout: Duration,
}

impl HttpPolicy {
    /// A token-protected API with the default limits.
    pub fn with_token(token: ApiToken) -> Self {
        Self {
            token: Some(token),
            ..Self::without_token()
        }
    }

    /// No token at all: for in-process benches and an operator's explicit choice only.
    pub fn without_token() -> Self {
        Self {
            token: None,
            public_read: false,
            allowed_hosts: Vec::new(),
            listen: None,
            max_concurrent: 256,
            // Longer than the longest wait a handler offers (`/v1/status?min_seq`, 60 s).
            request_timeout: Duration::from_secs(75),
        }
    }

    /// Whether `host` (a `Host` header value) names this API.
    pub fn host_allowed(&self, host: &str) -> bool {
        let Some(name) = host_name(host) else {
            return false;
        };
        let name = name.to_ascii_lowercase();
        if matches!(name.as_str(), "localhost" | "127.0.0.1" | "[::1]") {
            return true;
        }
        if let Some(listen) = self.listen {
            let ip = listen.ip();
            if !ip.is_unspecified() && name == bracketed(ip) {
                return true;
            }
        }
        self.allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(&name))
    }
}

/// `ip` as it appears in a Host header (IPv6 in brackets).
fn bracketed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The name part of a `Host` header value (`name`, `name:port`, `[v6]`, `[v6]:port`); `None`
/// when malformed.
fn host_name(host: &str) -> Option<&str> {
    if host.is_empty() {
        return None;
    }
    let name = if host.starts_with('[') {
        let end = host.find(']')?;
        let (name, rest) = host.split_at(end + 1);
        if !(rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        name
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return None,
            None => host,
        }
    };
    (!name.is_empty()).then_some(name)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Routes anyone may read: the version documents and the dashboard's static files (the page
/// itself holds no data; its script asks for the token).
pub fn is_open(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && (matches!(
            path,
            "/" | "/v2.1" | "/v2.1/" | "/identity/v3" | "/identity/v3/"
        ) || crate::dashboard::ASSETS.iter().any(|a| a.path == path))
}

/// What the request presented: `Ok(None)` nothing, `Ok(Some(matches))`, `Err` a malformed
/// header.
fn presented(token: &ApiToken, headers: &HeaderMap) -> Result<Option<bool>, ApiError> {
    let mut seen = None;
    for value in headers.get_all(header::AUTHORIZATION) {
        let v = value.as_bytes();
        let Some(t) = v
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case(b"bearer "))
            .map(|_| v[7..].trim_ascii())
        else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Authorization: only the Bearer scheme is accepted",
            ));
        };
        seen = Some(seen.unwrap_or(true) && token.matches(t));
    }
    for value in headers.get_all("x-auth-token") {
        seen = Some(seen.unwrap_or(true) && token.matches(value.as_bytes().trim_ascii()));
    }
    Ok(seen)
}

fn unauthorized(message: &str) -> Response {
    let mut r = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"usbpt\""),
    );
    r
}

/// The Host and token checks, as a function of the request head (unit-testable).
pub fn admit(
    policy: &HttpPolicy,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Option<Response> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match host {
        Some(h) if policy.host_allowed(h) => {}
        Some(h) => {
            let shown: String = h.chars().take(64).collect();
            return Some(
                ApiError::bad_request(format!(
                    "Host: {shown:?} is not a name this API answers to (loopback names, the \
                     listen address, and names given with --api-allow-host); refused against \
                     DNS rebinding"
                ))
                .into_response(),
            );
        }
        None => {
            return Some(
                ApiError::bad_request("Host: the header is missing or not text").into_response(),
            )
        }
    }
    let token = policy.token.as_ref()?;
    if is_open(method, path) {
        return None;
    }
    let read = method == Method::GET || method == Method::HEAD;
    if policy.public_read && read {
        return None;
    }
    match presented(token, headers) {
        Err(e) => Some(unauthorized(&e.message)),
        Ok(None) => Some(unauthorized(
            "this API needs a token: send Authorization: Bearer TOKEN or X-Auth-Token: TOKEN \
             (usbpt up writes it to <data-dir>/api-token)",
        )),
        Ok(Some(false)) => Some(
            ApiError::new(StatusCode::FORBIDDEN, "the token is not this API's token")
                .into_response(),
        ),
        Ok(Some(true)) => None,
    }
}

/// Who asked, for an admitted request (ADR 0014). The principal is what the front door
/// checked: `token` when the request presented this API's token, `anonymous` otherwise (an API
/// run without a token, or a public read). The peer address is the TCP peer's (a proxy's,
/// behind one). The `User-Agent` is what the client says. The request id is the client's
/// `X-Openstack-Request-Id` when it is Nova's form (`req-` and a UUID), else a fresh one; the
/// response's `x-openstack-request-id` is the same (see [`crate::nova::layer`]).
pub fn origin(policy: &HttpPolicy, headers: &HeaderMap, peer: Option<SocketAddr>) -> Origin {
    let principal = match &policy.token {
        Some(token) if matches!(presented(token, headers), Ok(Some(true))) => "token",
        _ => "anonymous",
    };
    let mut o = Origin::new(Via::Http, principal);
    if let Some(p) = peer {
        o = o.with_address(p.to_string());
    }
    if let Some(ua) = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
    {
        o = o.with_client(ua);
    }
    let sent = headers
        .get("x-openstack-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| is_request_id(id));
    o.with_request_id(
        sent.map(str::to_owned)
            .unwrap_or_else(|| format!("req-{}", uuid::Uuid::new_v4())),
    )
}

/// Nova's request id form: `req-` and a lowercase hyphenated UUID.
fn is_request_id(id: &str) -> bool {
    id.strip_prefix("req-").is_some_and(|u| {
        u.len() == 36
            && uuid::Uuid::try_parse(u).is_ok()
            && !u.bytes().any(|b| b.is_ascii_uppercase())
    })
}

/// The front door as an axum middleware over [`HttpPolicy`].
#[derive(Debug, Clone)]
pub struct Guard {
    policy: Arc<HttpPolicy>,
    slots: Arc<Semaphore>,
}

impl Guard {
    pub fn new(policy: HttpPolicy) -> Self {
        let slots = Arc::new(Semaphore::new(policy.max_concurrent.max(1)));
        Self {
            policy: Arc::new(policy),
            slots,
        }
    }

    /// Runs the checks, then the handler under the concurrency limit and the timeout. An
    /// admitted request carries its [`Origin`] (an extension) to the command routes.
    pub async fn run(self, mut req: Request, next: Next) -> Response {
        if let Some(refused) = admit(&self.policy, req.method(), req.uri().path(), req.headers()) {
            return refused;
        }
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let origin = origin(&self.policy, req.headers(), peer);
        req.extensions_mut().insert(origin);
        let Ok(_slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            let mut r = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "more than {} requests at once; try again",
                    self.policy.max_concurrent
                ),
            )
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        };
        let limit = self.policy.request_timeout;
        match tokio::time::timeout(limit, next.run(req)).await {
            Ok(r) => r,
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the request took longer than {} s", limit.as_secs()),
            )
            .into_response(),
        }
    }
}

/// Shortens a client-supplied value for an error message: at most `max` characters, `…` after.
pub fn shown(value: &str, max: usize) -> String {
    let mut out: String = value.chars().take(max).collect();
    if value.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HttpPolicy {
        HttpPolicy {
            allowed_hosts: vec!["lb.example".into()],
            listen: Some("192.0.2.7:8774".parse().expect("addr")),
            ..HttpPolicy::with_token(ApiToken::parse("0123456789abcdef0123", "t").expect("t"))
        }
    }

    #[test]
    fn the_origin_names_what_the_front_door_checked() {
        let p = policy();
        let peer: SocketAddr = "198.51.100.4:40000".parse().expect("addr");
        let id = "req-0190a000-0000-7000-8000-00000000004d";
        let h = headers(&[
            ("authorization", "Bearer 0123456789abcdef0123"),
            ("user-agent", "python-novaclient"),
            ("x-openstack-request-id", id),
        ]);
        let o = origin(&p, &h, Some(peer));
        assert_eq!(o.via(), Via::Http);
        assert_eq!(o.principal(), "token");
        assert_eq!(o.address(), Some("198.51.100.4:40000"));
        assert_eq!(o.client(), Some("python-novaclient"));
        assert_eq!(o.request_id(), Some(id));
        // No token presented (a public read), or an API without one: anonymous. A request id
        // not in Nova's form is replaced by a fresh one.
        let h = headers(&[("x-openstack-request-id", "req-<script>")]);
        let o = origin(&p, &h, None);
        assert_eq!(o.principal(), "anonymous");
        assert_eq!(o.address(), None);
        assert!(o
            .request_id()
            .is_some_and(|r| r.starts_with("req-") && r != "req-<script>" && r.len() == 40));
        let open = HttpPolicy::without_token();
        assert_eq!(
            origin(&open, &HeaderMap::new(), None).principal(),
            "anonymous"
        );
    }

    #[test]
    fn host_names_are_matched_without_their_port() {
        let p = policy();
        for ok in [
            "localhost",
            "LOCALHOST:8774",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8774",
            "192.0.2.7:8774",
            "lb.example",
            "lb.example:443",
        ] {
            assert!(p.host_allowed(ok), "{ok}");
        }
        for bad in [
            "attacker.example",
            "localhost.attacker.example",
            "127.0.0.2",
            "::1",
            "[::1]x",
            "localhost:port",
            "localhost:",
            "",
            ":8774",
            "192.0.2.8",
        ] {
            assert!(!p.host_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn an_unspecified_listen_address_is_not_a_host() {
        let p = HttpPolicy {
            listen: Some("0.0.0.0:8774".parse().expect("addr")),
            ..policy()
        };
        assert!(!p.host_allowed("0.0.0.0:8774"));
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    fn status(p: &HttpPolicy, m: Method, path: &str, h: &HeaderMap) -> u16 {
        admit(p, &m, path, h).map_or(200, |r| r.status().as_u16())
    }

    #[test]
    fn tokens_are_required_and_compared() {
        let p = policy();
        let t = "0123456789abcdef0123";
        let host = ("host", "localhost:8774");
        assert_eq!(
            status(&p, Method::GET, "/v1/devices", &headers(&[host])),
            401
        );
        let bearer = format!("Bearer {t}");
        assert_eq!(
            status(
                &p,
                Method::GET,
                "/v1/devices",
                &headers(&[host, ("authorization", &bearer)])
            ),
            200
        );
        assert_eq!(
            status(
                &p,
                Method::POST,
                "/v2.1/servers",
                &headers(&[host, ("x-auth-token", t)])
            ),
            200
        );
        assert_eq!(
            status(
                &p,
                Method::GET,
                "/v1/devices",
                &headers(&[host, ("x-auth-token", "nope-nope-nope-nope")])
            ),
            403
        );
        // Both given: both must be right.
        assert_eq!(
            status(
                &p,
                Method::GET,
                "/v1/devices",
                &headers(&[
                    host,
                    ("authorization", &bearer),
                    ("x-auth-token", "0123456789abcdef012")
                ])
            ),
            403
        );
        assert_eq!(
            status(
                &p,
                Method::GET,
                "/v1/devices",
                &headers(&[host, ("authorization", "Basic abc")])
            ),
            401
        );
        // Open routes need no token; the Host check still applies.
        for path in ["/", "/v2.1", "/identity/v3", "/assets/app.js"] {
            assert_eq!(
                status(&p, Method::GET, path, &headers(&[host])),
                200,
                "{path}"
            );
            assert_eq!(
                status(&p, Method::GET, path, &headers(&[("host", "evil.example")])),
                400,
                "{path}"
            );
        }
        assert_eq!(status(&p, Method::POST, "/", &headers(&[host])), 401);
        // --public-read opens reads only.
        let open = HttpPolicy {
            public_read: true,
            ..policy()
        };
        assert_eq!(
            status(&open, Method::GET, "/v1/events", &headers(&[host])),
            200
        );
        assert_eq!(
            status(&open, Method::DELETE, "/v2.1/servers/x", &headers(&[host])),
            401
        );
    }

    #[test]
    fn generated_tokens_are_long_random_and_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TOKEN_FILE);
        let (a, made) = ApiToken::ensure(&path).expect("token");
        assert!(made);
        assert_eq!(a.secret().len(), 64);
        let (b, made) = ApiToken::ensure(&path).expect("token");
        assert!(!made);
        assert_eq!(a.secret(), b.secret());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(ApiToken::generate().expect("t").secret(), a.secret());
        assert!(!format!("{a:?}").contains(a.secret()));
        assert!(ApiToken::parse("short", "x").is_err());
        assert!(ApiToken::parse("has a space in the middle", "x").is_err());
    }

    /// Serves `router` behind the front door with `policy` on a free loopback port.
    async fn spawn(router: axum::Router, policy: HttpPolicy) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, crate::secure(router, policy))
                .await
                .expect("serve");
        });
        addr
    }

    /// One HTTP/1.1 GET over a fresh TCP connection: the whole response as text.
    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        c.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        c.read_to_string(&mut out).await.expect("read");
        out
    }

    /// Over real TCP: a handler slower than the timeout gets 503, a streaming body outlives it
    /// (live events are not cut).
    #[tokio::test]
    async fn the_timeout_cuts_slow_handlers_not_streams() {
        use axum::body::Body;
        use axum::routing::get as route;
        let router = axum::Router::new()
            .route(
                "/slow",
                route(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .route(
                "/stream",
                route(|| async {
                    let chunks = futures::stream::unfold(0u32, |n| async move {
                        if n == 6 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Some((Ok::<_, std::io::Error>(format!("chunk{n};")), n + 1))
                    });
                    Body::from_stream(chunks)
                }),
            );
        let addr = spawn(
            router,
            HttpPolicy {
                request_timeout: Duration::from_millis(300),
                ..HttpPolicy::without_token()
            },
        )
        .await;
        let started = std::time::Instant::now();
        let slow = get(addr, "/slow").await;
        assert!(slow.starts_with("HTTP/1.1 503"), "{slow}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // 600 ms of body, twice the timeout: all of it arrives.
        let stream = get(addr, "/stream").await;
        assert!(stream.starts_with("HTTP/1.1 200"), "{stream}");
        assert!(
            stream.contains("chunk0;") && stream.contains("chunk5;"),
            "{stream}"
        );
    }

    /// Beyond the concurrency limit a request is refused at once (503, `Retry-After`), not
    /// queued; the held ones complete.
    #[tokio::test]
    async fn the_concurrency_limit_refuses_instead_of_queueing() {
        use axum::routing::get as route;
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (release, held) = tokio::sync::watch::channel(false);
        let router = axum::Router::new().route(
            "/held",
            route(move || {
                let (mut held, entered_tx) = (held.clone(), entered_tx.clone());
                async move {
                    let _ = entered_tx.send(());
                    let _ = held.wait_for(|r| *r).await;
                    "released"
                }
            }),
        );
        let addr = spawn(
            router,
            HttpPolicy {
                max_concurrent: 2,
                ..HttpPolicy::without_token()
            },
        )
        .await;
        let a = tokio::spawn(async move { get(addr, "/held").await });
        let b = tokio::spawn(async move { get(addr, "/held").await });
        entered.recv().await.expect("first in");
        entered.recv().await.expect("second in");
        let third = get(addr, "/held").await;
        assert!(third.starts_with("HTTP/1.1 503"), "{third}");
        assert!(third.contains("retry-after: 1"), "{third}");
        release.send_replace(true);
        for h in [a, b] {
            let r = h.await.expect("join");
            assert!(
                r.starts_with("HTTP/1.1 200") && r.ends_with("released"),
                "{r}"
            );
        }
    }

    #[test]
    fn shown_values_are_cut() {
        assert_eq!(shown("abc", 5), "abc");
        assert_eq!(shown("abcdef", 3), "abc…");
    }
}
