//! The HTTP API's front door against the real stack (issue 14 items 5 and 6, ADR 0006): a real
//! nats-server enforcing the generated per-role permissions, a real `usbpt serve` with its own
//! NATS identities and an API token, requests over real TCP.
//!
//! - every reading and mutating route class answers 401 (with `WWW-Authenticate`) without a
//!   token, 403 with a wrong one, 400 for a Host header that is not ours (DNS rebinding), and a
//!   refused request appends nothing; the version documents and static files stay open;
//! - `--public-read` opens reads and live events, not changes; `serve` without a token refuses
//!   to start;
//! - bad bodies get precise 4xx (413, 415, 400 naming the field with a short echo);
//! - a proptest over methods, paths and bodies finds no 5xx, and no rejected request (a 4xx
//!   other than a recorded 409 refusal) appends anything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use proptest::prelude::*;
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use usbpt_bus::auth::{CredsDir, Role};
use usbpt_bus::Bus;
use usbpt_testkit::TestNats;

const TOKEN: &str = "guard-test-token-5f0c2a9d1e7b4c3a";

/// A `usbpt serve` on the secured bus, with its own identities (no `--insecure`).
struct Serve {
    _child: Child,
    api: String,
    /// host:port, for Host headers.
    authority: String,
}

fn serve_cmd(nats: &TestNats, creds: &CredsDir, data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_usbpt"));
    c.arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .arg("--creds")
        .arg(creds.path(&Role::Projector))
        .arg("--command-creds")
        .arg(creds.path(&Role::Commands))
        .env("NATS_URL", nats.url())
        .env("USBPT_DATA_DIR", data)
        .env("USBPT_LOG", "warn")
        .env_remove("USBPT_INSECURE")
        .env_remove("USBPT_API_TOKEN")
        .env_remove("USBPT_API_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

impl Serve {
    async fn start(mut cmd: Command) -> Result<Self> {
        let mut child = cmd.spawn().context("spawn usbpt serve")?;
        let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
        let api = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                eprintln!("[serve] {line}");
                if let Some(url) = line.split("listening on ").nth(1) {
                    return Ok(url.trim().to_owned());
                }
            }
            bail!("usbpt serve exited before listening")
        })
        .await
        .context("usbpt serve did not announce its address")??;
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[serve] {line}");
            }
        });
        let authority = api.trim_start_matches("http://").to_owned();
        Ok(Self {
            _child: child,
            api,
            authority,
        })
    }
}

fn token_file(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("token");
    std::fs::write(&p, format!("{TOKEN}\n"))?;
    Ok(p)
}

/// One request; `auth` is `None` (no credential) or a header to send.
async fn call(
    http: &reqwest::Client,
    serve: &Serve,
    method: Method,
    path: &str,
    auth: Option<(&str, String)>,
    host: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, reqwest::header::HeaderMap, String)> {
    let mut req = http
        .request(method, format!("{}{path}", serve.api))
        .timeout(Duration::from_secs(30));
    if let Some((k, v)) = auth {
        req = req.header(k, v);
    }
    if let Some(h) = host {
        req = req.header(reqwest::header::HOST, h);
    }
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    // Live event streams never end: read only what they sent first.
    let text = if headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"))
    {
        String::new()
    } else {
        resp.text().await?
    };
    Ok((status, headers, text))
}

fn bearer(t: &str) -> Option<(&'static str, String)> {
    Some(("authorization", format!("Bearer {t}")))
}

/// The route classes: reads (documents, live events, metrics) and every kind of change.
fn routes() -> Vec<(Method, &'static str, Option<Value>)> {
    let flavor = json!({"flavor": {"name": "guarded", "usb_devices": []}});
    vec![
        (Method::GET, "/v1/devices", None),
        (Method::GET, "/v1/hosts", None),
        (Method::GET, "/v1/status", None),
        (Method::GET, "/v1/quarantine", None),
        (Method::GET, "/v1/events", None),
        (Method::GET, "/metrics", None),
        (Method::GET, "/v2.1/servers/detail", None),
        (Method::GET, "/v2.1/flavors", None),
        (Method::GET, "/v2.1/os-hypervisors/detail", None),
        (Method::GET, "/v2.1/os-services", None),
        (Method::POST, "/v2.1/flavors", Some(flavor)),
        (Method::DELETE, "/v2.1/flavors/guarded", None),
        (
            Method::POST,
            "/v2.1/flavors/guarded/os-extra_specs",
            Some(json!({"extra_specs": {"usb_devices": "[]"}})),
        ),
        (
            Method::POST,
            "/v2.1/servers",
            Some(json!({"server": {"name": "g-1", "flavorRef": "guarded"}})),
        ),
        (
            Method::POST,
            "/v2.1/servers/g-1/action",
            Some(json!({"os-stop": null})),
        ),
        (Method::DELETE, "/v2.1/servers/g-1", None),
    ]
}

#[tokio::test]
async fn every_route_needs_the_token_and_one_of_our_host_names() -> Result<()> {
    let (nats, creds) = TestNats::start_secured(&["host-a"]).await?;
    let admin: Bus = nats.bus_as(&creds, &Role::Admin).await?;
    let data = tempfile::tempdir()?;
    let mut cmd = serve_cmd(&nats, &creds, data.path());
    cmd.arg("--api-token-file").arg(token_file(data.path())?);
    let serve = Serve::start(cmd).await?;
    let http = reqwest::Client::new();

    for (method, path, body) in routes() {
        let before = admin.last_sequence().await?;
        let what = format!("{method} {path}");
        // No token: 401 with a challenge.
        let (code, h, text) = call(
            &http,
            &serve,
            method.clone(),
            path,
            None,
            None,
            body.as_ref(),
        )
        .await?;
        assert_eq!(code, 401, "{what}: {text}");
        assert_eq!(h["www-authenticate"], "Bearer realm=\"usbpt\"", "{what}");
        assert!(text.contains("\"unauthorized\""), "{what}: {text}");
        // A wrong token, in either header OpenStack clients use: 403, and it is not echoed.
        for auth in [
            bearer("not-the-token-0000000000"),
            Some(("x-auth-token", "not-the-token-0000000000".to_owned())),
        ] {
            let (code, h, text) = call(
                &http,
                &serve,
                method.clone(),
                path,
                auth,
                None,
                body.as_ref(),
            )
            .await?;
            assert_eq!(code, 403, "{what}: {text}");
            assert!(!text.contains("not-the-token") && !format!("{h:?}").contains("not-the-token"));
        }
        // A scheme other than Bearer: 401.
        let basic = Some(("authorization", "Basic dXNlcjpwYXNz".to_owned()));
        let (code, _, _) = call(
            &http,
            &serve,
            method.clone(),
            path,
            basic,
            None,
            body.as_ref(),
        )
        .await?;
        assert_eq!(code, 401, "{what}");
        // The right token from a page whose name resolved to us (DNS rebinding): 400.
        for host in [
            "attacker.example",
            "attacker.example:8774",
            "localhost.attacker.example",
        ] {
            let (code, _, text) = call(
                &http,
                &serve,
                method.clone(),
                path,
                bearer(TOKEN),
                Some(host),
                body.as_ref(),
            )
            .await?;
            assert_eq!(code, 400, "{what} Host {host}: {text}");
            assert!(text.contains("Host"), "{what}: {text}");
        }
        assert_eq!(
            admin.last_sequence().await?,
            before,
            "{what}: a refused request appended an event"
        );
    }

    // With the token, under every loopback name, every route answers (no 401/403, no 5xx).
    for (i, (method, path, body)) in routes().into_iter().enumerate() {
        let port = serve.authority.rsplit(':').next().unwrap();
        let host = ["localhost", "127.0.0.1", "LOCALHOST"][i % 3];
        let auth = if i % 2 == 0 {
            bearer(TOKEN)
        } else {
            Some(("x-auth-token", TOKEN.to_owned()))
        };
        let (code, _, text) = call(
            &http,
            &serve,
            method.clone(),
            path,
            auth,
            Some(&format!("{host}:{port}")),
            body.as_ref(),
        )
        .await?;
        assert!(
            !matches!(code, 400 | 401 | 403) && code < 500,
            "{method} {path} with the token: {code} {text}"
        );
        assert!(!text.contains(TOKEN), "{method} {path} echoed the token");
    }

    // The version documents and the dashboard's files need no token; the Host check holds.
    for path in [
        "/",
        "/v2.1",
        "/v2.1/",
        "/identity/v3",
        "/assets/app.js",
        "/assets/app.css",
    ] {
        let (code, _, _) = call(&http, &serve, Method::GET, path, None, None, None).await?;
        assert_eq!(code, 200, "{path}");
        let (code, _, _) = call(
            &http,
            &serve,
            Method::GET,
            path,
            None,
            Some("rebound.example"),
            None,
        )
        .await?;
        assert_eq!(code, 400, "{path} under a foreign Host");
    }
    let (code, _, _) = call(
        &http,
        &serve,
        Method::POST,
        "/",
        None,
        None,
        Some(&json!({})),
    )
    .await?;
    assert_eq!(code, 401, "only reads of / are open");
    Ok(())
}

#[tokio::test]
async fn serve_needs_a_token_unless_told_otherwise_and_public_read_opens_reads_only() -> Result<()>
{
    let (nats, creds) = TestNats::start_secured(&["host-a"]).await?;
    // Admin creates the stream (as `up` does); the others may not.
    let _admin: Bus = nats.bus_as(&creds, &Role::Admin).await?;
    let data = tempfile::tempdir()?;

    // No token: refused at start, saying how to give one.
    let out = serve_cmd(&nats, &creds, &data.path().join("a"))
        .stderr(Stdio::piped())
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api-token-file") && err.contains("--insecure-no-api-token"),
        "{err}"
    );
    // A token too short to be one: refused, without printing it.
    let mut cmd = serve_cmd(&nats, &creds, &data.path().join("b"));
    let out = cmd.env("USBPT_API_TOKEN", "abc123").output().await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("USBPT_API_TOKEN") && !err.contains("abc123"),
        "{err}"
    );

    // --public-read (token from the environment): reads and live events open, changes not.
    let mut cmd = serve_cmd(&nats, &creds, &data.path().join("c"));
    cmd.arg("--public-read")
        .args(["--api-allow-host", "dash.example"])
        .env("USBPT_API_TOKEN", TOKEN);
    let serve = Serve::start(cmd).await?;
    let http = reqwest::Client::new();
    for path in [
        "/v1/devices",
        "/v2.1/servers/detail",
        "/v1/events",
        "/metrics",
    ] {
        let (code, _, _) = call(&http, &serve, Method::GET, path, None, None, None).await?;
        assert_eq!(code, 200, "{path}");
        let (code, _, _) = call(
            &http,
            &serve,
            Method::GET,
            path,
            None,
            Some("dash.example:443"),
            None,
        )
        .await?;
        assert_eq!(code, 200, "{path} via the added name");
    }
    let body = json!({"flavor": {"name": "nope", "usb_devices": []}});
    let (code, _, _) = call(
        &http,
        &serve,
        Method::POST,
        "/v2.1/flavors",
        None,
        None,
        Some(&body),
    )
    .await?;
    assert_eq!(code, 401);
    let (code, _, _) = call(
        &http,
        &serve,
        Method::DELETE,
        "/v2.1/servers/x",
        bearer("wrong-token-wrong-token"),
        None,
        None,
    )
    .await?;
    assert_eq!(code, 403);
    let (code, _, text) = call(
        &http,
        &serve,
        Method::POST,
        "/v2.1/flavors",
        bearer(TOKEN),
        None,
        Some(&body),
    )
    .await?;
    assert_eq!(code, 200, "{text}");
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_precise_4xx_with_short_echoes() -> Result<()> {
    let (nats, creds) = TestNats::start_secured(&["host-a"]).await?;
    let admin: Bus = nats.bus_as(&creds, &Role::Admin).await?;
    let data = tempfile::tempdir()?;
    let mut cmd = serve_cmd(&nats, &creds, data.path());
    cmd.env("USBPT_API_TOKEN", TOKEN);
    let serve = Serve::start(cmd).await?;
    let http = reqwest::Client::new();
    let post = |path: &'static str, ctype: &'static str, body: Vec<u8>| {
        let http = http.clone();
        let url = format!("{}{path}", serve.api);
        async move {
            let resp = http
                .post(url)
                .bearer_auth(TOKEN)
                .header("content-type", ctype)
                .body(body)
                .send()
                .await?;
            let code = resp.status().as_u16();
            let text = resp.text().await?;
            anyhow::Ok((code, text))
        }
    };
    let before = admin.last_sequence().await?;

    // Beyond the 64 KiB limit: 413, not 400. (Kept small enough for the loopback socket buffers
    // to hold it: a server that answers before reading a body closes the connection.)
    let (code, text) = post("/v2.1/flavors", "application/json", vec![b' '; 100 << 10]).await?;
    assert_eq!(code, 413, "{text}");
    assert!(text.contains("overLimit"), "{text}");
    // A JSON body labelled as something else: 415.
    let ok = json!({"flavor": {"name": "f", "usb_devices": []}}).to_string();
    let (code, text) = post("/v2.1/flavors", "text/plain", ok.clone().into_bytes()).await?;
    assert_eq!(code, 415, "{text}");
    let (code, _) = post(
        "/v2.1/servers/x/action",
        "application/x-www-form-urlencoded",
        b"a=b".to_vec(),
    )
    .await?;
    assert_eq!(code, 415);
    // A 40 KB name: 400 naming the field, echoing a short prefix only.
    let long = "n".repeat(40_000);
    let body = json!({"flavor": {"name": long, "usb_devices": []}}).to_string();
    let (code, text) = post("/v2.1/flavors", "application/json", body.into_bytes()).await?;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("flavor.name"), "{text}");
    assert!(text.len() < 1500, "echoed {} bytes", text.len());
    // A 256-byte serial: 400 naming the entry and the bound (the one validator).
    let body = json!({"flavor": {"name": "f", "usb_devices": [
        {"vendor_id": "136b", "product_id": "0003", "serial": "S".repeat(256)}
    ]}})
    .to_string();
    let (code, text) = post("/v2.1/flavors", "application/json", body.into_bytes()).await?;
    assert_eq!(code, 400, "{text}");
    assert!(
        text.contains("usb_devices[0]") && text.contains("255"),
        "{text}"
    );
    // A long string where a number goes: 400, short echo.
    let body = json!({"flavor": {"name": "f", "usb_devices": [
        {"vendor_id": "136b", "product_id": "0003", "count": "9".repeat(20_000)}
    ]}})
    .to_string();
    let (code, text) = post("/v2.1/flavors", "application/json", body.into_bytes()).await?;
    assert_eq!(code, 400, "{text}");
    assert!(text.len() < 1500, "echoed {} bytes", text.len());
    assert_eq!(
        admin.last_sequence().await?,
        before,
        "a refused body appended"
    );

    // A server to migrate: a flavor without devices, and a boot (recorded even if unplaced).
    let (code, text) = post("/v2.1/flavors", "application/json", ok.into_bytes()).await?;
    assert_eq!(code, 200, "{text}");
    let boot = json!({"server": {"name": "s-1", "flavorRef": "f"}}).to_string();
    let (code, text) = post("/v2.1/servers", "application/json", boot.into_bytes()).await?;
    assert!(code == 202, "{code} {text}");
    let before = admin.last_sequence().await?;
    for (body, field) in [
        (json!({"migrate": {"host": 42}}), "migrate.host"),
        (
            json!({"os-migrateLive": {"host": ["host-a"]}}),
            "os-migrateLive.host",
        ),
        (json!({"migrate": {"host": "no.such>host"}}), "migrate.host"),
    ] {
        let (code, text) = post(
            "/v2.1/servers/s-1/action",
            "application/json",
            body.to_string().into_bytes(),
        )
        .await?;
        assert_eq!(code, 400, "{body}: {text}");
        assert!(text.contains(field), "{body}: {text}");
    }
    assert_eq!(admin.last_sequence().await?, before);

    // Last-Event-ID at the top of u64: no overflow; no sequence follows it, a 400 naming it.
    let resp = http
        .get(format!("{}/v1/events", serve.api))
        .bearer_auth(TOKEN)
        .header("Last-Event-ID", u64::MAX.to_string())
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.text().await?.contains("Last-Event-ID"));
    let resp = http
        .get(format!("{}/v1/events", serve.api))
        .bearer_auth(TOKEN)
        .header("Last-Event-ID", "18446744073709551616")
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 400);
    Ok(())
}

/// What the proptest sends.
#[derive(Debug, Clone)]
struct Probe {
    method: Method,
    path: String,
    body: Option<Vec<u8>>,
    json: bool,
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("s-1".to_owned()),
        Just("f".to_owned()),
        Just("..".to_owned()),
        Just("%00".to_owned()),
        Just("%2F".to_owned()),
        Just("usb_devices".to_owned()),
        Just("00000000-0000-0000-0000-000000000000".to_owned()),
        "[a-zA-Z0-9_.~-]{0,80}",
        "(%[0-9A-F]{2}){1,20}",
        Just("x".repeat(5000)),
    ]
}

fn path() -> impl Strategy<Value = String> {
    let prefix = prop_oneof![
        Just("/v2.1/flavors"),
        Just("/v2.1/servers"),
        Just("/v2.1/os-hypervisors"),
        Just("/v1/devices"),
        Just("/v1/quarantine"),
        Just("/v1/status"),
        Just("/v2.1/flavors/f/os-extra_specs"),
        Just("/v2.1/servers/s-1/action"),
        Just("/v2.1/servers/s-1/os-instance-actions"),
        Just(""),
    ];
    let query = prop_oneof![
        Just(String::new()),
        Just("?min_seq=18446744073709551615&timeout_ms=1".to_owned()),
        Just("?after=18446744073709551615&limit=18446744073709551615".to_owned()),
        Just("?all=maybe".to_owned()),
        Just("?status=%FF".to_owned()),
        "\\?[a-z_]{1,10}=[a-zA-Z0-9%]{0,30}",
    ];
    (prefix, prop::collection::vec(segment(), 0..3), query)
        .prop_map(|(p, segs, q)| format!("{p}/{}{q}", segs.join("/")).replace("//", "/"))
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        Just(json!(u64::MAX)),
        "[ -~]{0,40}".prop_map(Value::String),
        Just(Value::String("\u{1b}]0;owned\u{7}\n<script>".into())),
        Just(Value::String("S".repeat(300))),
        Just(json!("136b")),
        Just(json!("f")),
        Just(json!("host-a")),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        let keys = prop_oneof![
            Just("flavor".to_owned()),
            Just("server".to_owned()),
            Just("name".to_owned()),
            Just("flavorRef".to_owned()),
            Just("usb_devices".to_owned()),
            Just("vendor_id".to_owned()),
            Just("product_id".to_owned()),
            Just("serial".to_owned()),
            Just("count".to_owned()),
            Just("host".to_owned()),
            Just("migrate".to_owned()),
            Just("os-stop".to_owned()),
            Just("resize".to_owned()),
            Just("extra_specs".to_owned()),
            "[a-z_-]{1,12}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn probe() -> impl Strategy<Value = Probe> {
    let method = prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::DELETE),
        Just(Method::PATCH),
    ];
    let body = prop_oneof![
        Just(None),
        json_value().prop_map(|v| Some(v.to_string().into_bytes())),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Some),
    ];
    (method, path(), body, any::<bool>()).prop_map(|(method, path, body, json)| Probe {
        method,
        path,
        body,
        json,
    })
}

#[test]
fn no_request_gets_a_5xx_or_appends_when_refused() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let (nats, creds, _data, serve, admin) = rt.block_on(async {
        let (nats, creds) = TestNats::start_secured(&["host-a"]).await?;
        let admin: Bus = nats.bus_as(&creds, &Role::Admin).await?;
        let data = tempfile::tempdir()?;
        let mut cmd = serve_cmd(&nats, &creds, data.path());
        cmd.env("USBPT_API_TOKEN", TOKEN);
        let serve = Serve::start(cmd).await?;
        // Something to act on: a flavor and a server.
        let http = reqwest::Client::new();
        for (path, body) in [
            (
                "/v2.1/flavors",
                json!({"flavor": {"name": "f", "usb_devices": []}}),
            ),
            (
                "/v2.1/servers",
                json!({"server": {"name": "s-1", "flavorRef": "f"}}),
            ),
        ] {
            let r = http
                .post(format!("{}{path}", serve.api))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await?;
            assert!(r.status().is_success(), "{path}: {}", r.text().await?);
        }
        anyhow::Ok((nats, creds, data, serve, admin))
    })?;
    let http = reqwest::Client::new();
    let config = ProptestConfig {
        cases: std::env::var("USBPT_PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(300),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let started = std::time::Instant::now();
    let result = proptest::test_runner::TestRunner::new(config).run(&probe(), |p| {
        let outcome: Result<(u16, String, u64, u64)> = rt.block_on(async {
            let before = admin.last_sequence().await?;
            let mut req = http
                .request(p.method.clone(), format!("{}{}", serve.api, p.path))
                .bearer_auth(TOKEN)
                .timeout(Duration::from_secs(30));
            if p.json {
                req = req.header("content-type", "application/json");
            }
            if let Some(b) = &p.body {
                req = req.body(b.clone());
            }
            let resp = req.send().await?;
            let code = resp.status().as_u16();
            let sse = resp
                .headers()
                .get("content-type")
                .is_some_and(|c| c.as_bytes().starts_with(b"text/event-stream"));
            let text = if sse {
                String::new()
            } else {
                resp.text().await?
            };
            let after = admin.last_sequence().await?;
            Ok((code, text, before, after))
        });
        let (code, text, before, after) =
            outcome.map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
        prop_assert!(code < 500, "{} {}: {code} {text}", p.method, p.path);
        if code >= 400 && code != 409 {
            prop_assert_eq!(
                before,
                after,
                "{} {} was refused ({}) but appended: {}",
                p.method,
                p.path,
                code,
                text
            );
        }
        prop_assert!(
            text.len() < 64 * 1024 || code < 400,
            "a {} byte error",
            text.len()
        );
        Ok(())
    });
    eprintln!("proptest: {:?}", started.elapsed());
    drop((serve, creds));
    drop(nats);
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Rewrites the server's generated authorization so the command handler may no longer append
/// claims (`restore`: as generated), and waits until the server has reloaded it.
async fn claims_allowed(nats: &mut TestNats, creds: &CredsDir, allowed: bool) -> Result<()> {
    let conf = creds.write_auth_conf()?;
    if !allowed {
        let text = std::fs::read_to_string(&conf)?;
        let mut out = String::new();
        let mut commands = false;
        for line in text.lines() {
            if line.trim() == "# commands" {
                commands = true;
            } else if commands {
                assert!(line.contains("\"usbpt.evt.claim.>\", "), "{line}");
                out.push_str(&line.replace("\"usbpt.evt.claim.>\", ", ""));
                out.push('\n');
                commands = false;
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        std::fs::write(&conf, out)?;
    }
    let reloads = nats.log().matches("Reloaded server configuration").count();
    nats.server().reload()?;
    usbpt_testkit::eventually(Duration::from_secs(10), || async {
        (nats.log().matches("Reloaded server configuration").count() > reloads).then_some(())
    })
    .await
    .context("nats-server did not reload its configuration")
}

async fn get_json(http: &reqwest::Client, serve: &Serve, path: &str) -> Result<(u16, Value)> {
    let resp = http
        .get(format!("{}{path}", serve.api))
        .bearer_auth(TOKEN)
        .send()
        .await?;
    let code = resp.status().as_u16();
    Ok((code, resp.json().await?))
}

async fn applied(http: &reqwest::Client, serve: &Serve, seq: u64) -> Result<(u16, Value)> {
    get_json(
        http,
        serve,
        &format!("/v1/status?min_seq={seq}&timeout_ms=20000"),
    )
    .await
}

/// A boot whose claim append is refused by the server (the command handler's permission to
/// append claims removed, for real, by a configuration reload) leaves no half-created server:
/// the `ServerBootRequested` it had stored is compensated by a `ServerDeleted`, the device stays
/// available, the name is free, and the same boot succeeds once the permission is back.
#[tokio::test]
async fn a_boot_that_fails_part_way_leaves_no_half_created_server() -> Result<()> {
    use usbpt_schemas::{
        DeviceDiscovered, DeviceId, Envelope, Event, HostAgentStarted, HostName, LineageId,
        LineageKey, LineageKind, ProductId, UsbAddress, UsbDescriptors, VendorId,
    };
    let (mut nats, creds) = TestNats::start_secured(&["host-a"]).await?;
    let admin: Bus = nats.bus_as(&creds, &Role::Admin).await?;
    let host_a = HostName::new("host-a")?;
    let agent = nats.bus_as(&creds, &Role::Agent(host_a.clone())).await?;
    let (vendor, product) = (VendorId(0x1050), ProductId(0x0407));
    agent
        .publish(&Envelope::new(Event::HostAgentStarted(HostAgentStarted {
            host: host_a.clone(),
            boot_id: "boot-1".into(),
            agent_version: "0.1.0".into(),
            hypervisor_uri: "test:///default".into(),
        })))
        .await?;
    let device_id = DeviceId::new_v7();
    agent
        .publish(&Envelope::new(Event::DeviceDiscovered(DeviceDiscovered {
            device_id,
            lineage_id: LineageId::derive(&LineageKey::Serial {
                vendor,
                product,
                serial: "16284291",
            }),
            lineage_kind: LineageKind::Serial,
            host: host_a.clone(),
            boot_id: "boot-1".into(),
            descriptors: UsbDescriptors {
                address: UsbAddress::new(1, 4)?,
                port_path: "1-1.2".parse()?,
                vendor_id: vendor,
                product_id: product,
                serial: Some("16284291".into()),
                device_class: 0,
                interface_classes: vec![3],
                manufacturer: Some("Yubico".into()),
                product: Some("YubiKey".into()),
                vendor_db: None,
                model_db: None,
                speed: Some("12".into()),
                usb_version: Some("2.00".into()),
            },
            syspath: "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-1.2".into(),
            supersedes: None,
        })))
        .await?;

    let data = tempfile::tempdir()?;
    let mut cmd = serve_cmd(&nats, &creds, data.path());
    cmd.env("USBPT_API_TOKEN", TOKEN);
    let serve = Serve::start(cmd).await?;
    let http = reqwest::Client::new();
    let post = |path: &'static str, body: Value| {
        let req = http
            .post(format!("{}{path}", serve.api))
            .bearer_auth(TOKEN)
            .json(&body);
        async move {
            let resp = req.send().await?;
            let code = resp.status().as_u16();
            anyhow::Ok((code, resp.text().await?))
        }
    };
    let (_, st) = applied(&http, &serve, admin.last_sequence().await?).await?;
    assert_eq!(st["reached"], true, "{st}");
    let (code, text) = post(
        "/v2.1/flavors",
        json!({"flavor": {"name": "keyed", "usb_devices": [
            {"vendor_id": "1050", "product_id": "0407"}
        ]}}),
    )
    .await?;
    assert_eq!(code, 200, "{text}");

    claims_allowed(&mut nats, &creds, false).await?;
    let boot = json!({"server": {"name": "half", "flavorRef": "keyed"}});
    let (code, text) = post("/v2.1/servers", boot.clone()).await?;
    assert_eq!(code, 503, "{text}");
    assert!(text.contains("undone"), "{text}");
    let log = nats.log();
    assert!(
        log.contains("Violation") && log.contains("usbpt.evt.claim."),
        "the server refused the claim: {text}\n{log}"
    );

    let (_, st) = applied(&http, &serve, admin.last_sequence().await?).await?;
    assert_eq!(st["reached"], true, "{st}");
    let (_, live) = get_json(&http, &serve, "/v2.1/servers").await?;
    assert_eq!(
        live["servers"],
        json!([]),
        "a half-created server is live: {live}"
    );
    let (_, all) = get_json(&http, &serve, "/v2.1/servers/detail?deleted=true").await?;
    let recorded = all["servers"].as_array().cloned().unwrap_or_default();
    assert_eq!(recorded.len(), 1, "{all}");
    assert_eq!(recorded[0]["status"], "DELETED", "{all}");
    let (_, dev) = get_json(&http, &serve, &format!("/v1/devices/{device_id}")).await?;
    assert_eq!(dev["device"]["status"], "available", "{dev}");

    // With the permission back, the same name boots and claims the device.
    claims_allowed(&mut nats, &creds, true).await?;
    let (code, text) = post("/v2.1/servers", boot).await?;
    assert_eq!(code, 202, "{text}");
    let (_, st) = applied(&http, &serve, admin.last_sequence().await?).await?;
    assert_eq!(st["reached"], true, "{st}");
    let (_, dev) = get_json(&http, &serve, &format!("/v1/devices/{device_id}")).await?;
    assert_eq!(dev["device"]["status"], "claimed", "{dev}");
    Ok(())
}

/// A command whose event would be larger than the bus takes is refused before anything is
/// appended (413), against a real nats-server whose `max_payload` is 4 KiB; a small one goes
/// through on the same server.
#[tokio::test]
async fn an_event_too_large_for_the_bus_is_refused_before_the_first_append() -> Result<()> {
    use usbpt_bus::server::{NatsServer, ServerConfig};
    let dir = tempfile::tempdir()?;
    let creds = CredsDir::open(dir.path().join("creds"))?;
    for role in [Role::Admin, Role::Projector, Role::Commands] {
        creds.ensure(&role)?;
    }
    let auth = creds.write_auth_conf()?;
    // The include comes after the server's own `max_payload`, so this one wins.
    let mut text = std::fs::read_to_string(&auth)?;
    text.push_str("max_payload: 4096\n");
    std::fs::write(&auth, text)?;
    let mut config = ServerConfig::new(dir.path().join("nats"));
    config.auth = Some(auth);
    let server = NatsServer::start(config).await?;
    let admin = Bus::connect(
        &server.url(),
        Some(&creds.path(&Role::Admin)),
        &usbpt_bus::StreamSettings::default(),
    )
    .await?;
    assert_eq!(admin.server_info().max_payload, 4096);

    let data = tempfile::tempdir()?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_usbpt"));
    cmd.arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .arg("--creds")
        .arg(creds.path(&Role::Projector))
        .arg("--command-creds")
        .arg(creds.path(&Role::Commands))
        .env("NATS_URL", server.url())
        .env("USBPT_DATA_DIR", data.path())
        .env("USBPT_LOG", "warn")
        .env("USBPT_API_TOKEN", TOKEN)
        .env_remove("USBPT_INSECURE")
        .env_remove("USBPT_API_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let serve = Serve::start(cmd).await?;
    let http = reqwest::Client::new();
    let create = |body: Value| {
        let req = http
            .post(format!("{}/v2.1/flavors", serve.api))
            .bearer_auth(TOKEN)
            .json(&body);
        async move {
            let resp = req.send().await?;
            let code = resp.status().as_u16();
            anyhow::Ok((code, resp.text().await?))
        }
    };
    let before = admin.last_sequence().await?;
    // Fifteen requests with 255-byte serials: each valid, together a ~4.5 KB event.
    let big: Vec<Value> = (0..15)
        .map(|i| {
            json!({"vendor_id": "136b", "product_id": "0003", "controller": "xhci",
                   "serial": format!("{i:02}{}", "S".repeat(253))})
        })
        .collect();
    let (code, text) = create(json!({"flavor": {"name": "big", "usb_devices": big}})).await?;
    assert_eq!(code, 413, "{text}");
    assert!(
        text.contains("FlavorCreated") && text.contains("nothing was appended"),
        "{text}"
    );
    assert_eq!(
        admin.last_sequence().await?,
        before,
        "something was appended"
    );
    let (code, text) = create(json!({"flavor": {"name": "small", "usb_devices": [
        {"vendor_id": "136b", "product_id": "0003"}
    ]}}))
    .await?;
    assert_eq!(code, 200, "{text}");
    assert!(admin.last_sequence().await? > before);
    Ok(())
}
