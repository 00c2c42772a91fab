//! What makes the API answer OpenStack clients as Nova does: version discovery (`GET /` by
//! content negotiation, `GET /v2.1`), microversion negotiation (`OpenStack-API-Version: compute
//! X` or `X-OpenStack-Nova-API-Version: X`, echoed with `Vary`, 406 outside
//! [`MIN_VERSION`]..=[`MAX_VERSION`]), a request id on every response, and stable UUIDs for
//! hypervisors and compute services. See `docs/openstack.md`.

use std::fmt;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use usbpt_schemas::HostName;
use uuid::Uuid;

use crate::ApiError;

/// A compute API microversion, `2.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Microversion {
    pub major: u16,
    pub minor: u16,
}

impl Microversion {
    pub const fn new(major: u16, minor: u16) -> Self {
        Self { major, minor }
    }
    /// True when this version is `2.minor` or later.
    pub fn at_least(self, minor: u16) -> bool {
        self >= Self::new(2, minor)
    }
}

impl fmt::Display for Microversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The oldest microversion served (and the one a request without a header gets).
pub const MIN_VERSION: Microversion = Microversion::new(2, 1);
/// The newest microversion served: 2.88, where Nova's hypervisor documents drop the CPU, RAM and
/// disk statistics usbpt does not track and carry `uptime` themselves.
pub const MAX_VERSION: Microversion = Microversion::new(2, 88);

const HDR_OPENSTACK: &str = "openstack-api-version";
const HDR_NOVA: &str = "x-openstack-nova-api-version";

/// The version a request asked for: `None` when it asked for none.
fn requested(headers: &HeaderMap) -> Option<String> {
    for value in headers.get_all(HDR_OPENSTACK) {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut words = item.split_whitespace();
            if words
                .next()
                .is_some_and(|s| s.eq_ignore_ascii_case("compute"))
            {
                if let Some(v) = words.next() {
                    return Some(v.to_owned());
                }
            }
        }
    }
    headers
        .get(HDR_NOVA)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
}

/// Parses and range-checks a requested version: 400 when malformed, 406 outside the range.
pub fn negotiate(asked: Option<&str>) -> Result<Microversion, ApiError> {
    let Some(asked) = asked else {
        return Ok(MIN_VERSION);
    };
    if asked.eq_ignore_ascii_case("latest") {
        return Ok(MAX_VERSION);
    }
    let parsed = asked
        .split_once('.')
        .and_then(|(a, b)| Some(Microversion::new(a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Version string {asked:?} (OpenStack-API-Version) is not valid: expected \
                 compute 2.N or latest"
            ))
        })?;
    if parsed < MIN_VERSION || parsed > MAX_VERSION {
        return Err(ApiError::new(
            StatusCode::NOT_ACCEPTABLE,
            format!(
                "Version {parsed} is not supported by the API. Minimum is {MIN_VERSION} and \
                 maximum is {MAX_VERSION}."
            ),
        ));
    }
    Ok(parsed)
}

/// What a compute handler needs from its request: the negotiated microversion and the base URL
/// links point at (from the `Host` header).
#[derive(Debug, Clone)]
pub struct Nova {
    pub version: Microversion,
    pub base: String,
}

impl Nova {
    /// `{base}/v2.1/{path}` and `{base}/{path}`, Nova's `self` and `bookmark` links.
    pub fn links(&self, path: &str) -> Value {
        json!([
            {"rel": "self", "href": format!("{}/v2.1/{path}", self.base)},
            {"rel": "bookmark", "href": format!("{}/{path}", self.base)},
        ])
    }
}

fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or(crate::DEFAULT_LISTEN);
    format!("http://{host}")
}

impl<S: Send + Sync> FromRequestParts<S> for Nova {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Self {
            version: parts
                .extensions
                .get::<Microversion>()
                .copied()
                .unwrap_or(MIN_VERSION),
            base: base_url(&parts.headers),
        })
    }
}

fn is_compute(path: &str) -> bool {
    path == "/v2.1"
        || path.starts_with("/v2.1/")
        || path.starts_with("/v2/")
        || path.starts_with("/v2.1?")
}

/// True when the client asked for JSON rather than a page (`Accept: application/json` without
/// `text/html`): keystoneauth's discovery does; browsers do not.
fn wants_json(headers: &HeaderMap) -> bool {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .unwrap_or("");
    accept.contains("application/json") && !accept.contains("text/html")
}

/// The `v2.1` entry of the version documents.
fn version_entry(base: &str) -> Value {
    json!({
        "id": "v2.1",
        "status": "CURRENT",
        "version": MAX_VERSION.to_string(),
        "min_version": MIN_VERSION.to_string(),
        "updated": "2013-07-23T11:33:21Z",
        "links": [{"rel": "self", "href": format!("{base}/v2.1/")}],
    })
}

/// `GET /` with `Accept: application/json`: Nova's versions document.
pub fn versions(base: &str) -> Value {
    json!({"versions": [version_entry(base)]})
}

/// `GET /v2.1` and `GET /v2.1/`: the version document.
pub fn version(base: &str) -> Value {
    let mut v = version_entry(base);
    if let Value::Object(m) = &mut v {
        m.insert(
            "links".into(),
            json!([
                {"rel": "self", "href": format!("{base}/v2.1/")},
                {"rel": "describedby", "type": "text/html",
                 "href": "https://docs.openstack.org/api-ref/compute/"},
            ]),
        );
        m.insert(
            "media-types".into(),
            json!([{"base": "application/json",
                    "type": "application/vnd.openstack.compute+json;version=2.1"}]),
        );
    }
    json!({"version": v})
}

/// `GET /v2.1` and `/v2.1/`.
pub async fn version_document(nova: Nova) -> Json<Value> {
    Json(version(&nova.base))
}

/// `GET /identity/v3`: keystone's version document, and nothing else of keystone. usbpt has no
/// identity service (`auth_type: none`), but `openstack flavor create` builds an identity v3
/// client before it sends anything, and that client needs this document to exist.
pub async fn identity_version_document(nova: Nova) -> Json<Value> {
    Json(json!({"version": {
        "id": "v3.14",
        "status": "stable",
        "updated": "2020-04-07T00:00:00Z",
        "links": [{"rel": "self", "href": format!("{}/identity/v3/", nova.base)}],
        "media-types": [{"base": "application/json",
                         "type": "application/vnd.openstack.identity-v3+json"}],
    }}))
}

/// The middleware every route runs under: version discovery at `/` for JSON clients,
/// microversion negotiation and echo on compute paths, `x-openstack-request-id` everywhere.
pub async fn layer(mut req: Request, next: Next) -> Response {
    // The id the front door recorded in the request's origin (ADR 0014), so a client can
    // find its command's events by the id it was answered with.
    let request_id = req
        .extensions()
        .get::<usbpt_schemas::Origin>()
        .and_then(|o| o.request_id())
        .map_or_else(|| format!("req-{}", Uuid::new_v4()), str::to_owned);
    let path = req.uri().path().to_owned();
    let compute = is_compute(&path);
    let mut resp = if path == "/" && wants_json(req.headers()) {
        Json(versions(&base_url(req.headers()))).into_response()
    } else if compute {
        match negotiate(requested(req.headers()).as_deref()) {
            Ok(v) => {
                req.extensions_mut().insert(v);
                let mut r = next.run(req).await;
                echo(r.headers_mut(), v);
                r
            }
            Err(e) => e.into_response(),
        }
    } else {
        next.run(req).await
    };
    let headers = resp.headers_mut();
    if path == "/" {
        headers.append(header::VARY, HeaderValue::from_static("Accept"));
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(HeaderName::from_static("x-openstack-request-id"), v.clone());
        headers.insert(HeaderName::from_static("x-compute-request-id"), v);
    }
    resp
}

fn echo(headers: &mut HeaderMap, v: Microversion) {
    if let Ok(h) = HeaderValue::from_str(&format!("compute {v}")) {
        headers.insert(HeaderName::from_static(HDR_OPENSTACK), h);
    }
    if let Ok(h) = HeaderValue::from_str(&v.to_string()) {
        headers.insert(HeaderName::from_static(HDR_NOVA), h);
    }
    headers.append(
        header::VARY,
        HeaderValue::from_static("OpenStack-API-Version, X-OpenStack-Nova-API-Version"),
    );
}

/// Nova's name for an error status in its error envelope.
pub fn fault_name(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "badRequest",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "itemNotFound",
        405 => "badMethod",
        409 => "conflictingRequest",
        413 | 429 => "overLimit",
        415 => "badMediaType",
        501 => "notImplemented",
        503 => "serviceUnavailable",
        _ => "computeFault",
    }
}

/// A hypervisor's id from microversion 2.53: a UUID stable per host (UUIDv5 of
/// `usbpt:hypervisor:{host}` in the URL namespace).
pub fn hypervisor_uuid(host: &HostName) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("usbpt:hypervisor:{host}").as_bytes(),
    )
}

/// A compute service's id from microversion 2.53 (UUIDv5 of `usbpt:service:{host}`).
pub fn service_uuid(host: &HostName) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("usbpt:service:{host}").as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_negotiated_as_nova_does() {
        assert_eq!(negotiate(None).unwrap(), MIN_VERSION);
        assert_eq!(negotiate(Some("latest")).unwrap(), MAX_VERSION);
        assert_eq!(negotiate(Some("2.53")).unwrap(), Microversion::new(2, 53));
        assert_eq!(
            negotiate(Some("9.99")).unwrap_err().status,
            StatusCode::NOT_ACCEPTABLE
        );
        assert_eq!(
            negotiate(Some("2.0")).unwrap_err().status,
            StatusCode::NOT_ACCEPTABLE
        );
        assert_eq!(
            negotiate(Some("two")).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn both_headers_are_read_openstack_first() {
        let mut h = HeaderMap::new();
        h.insert(HDR_NOVA, HeaderValue::from_static("2.10"));
        assert_eq!(requested(&h).as_deref(), Some("2.10"));
        h.insert(
            HDR_OPENSTACK,
            HeaderValue::from_static("volume 3.5, compute 2.60"),
        );
        assert_eq!(requested(&h).as_deref(), Some("2.60"));
    }

    #[test]
    fn host_ids_are_stable_uuids() {
        let a = HostName::new("host-a").unwrap();
        assert_eq!(hypervisor_uuid(&a), hypervisor_uuid(&a));
        assert_ne!(hypervisor_uuid(&a), service_uuid(&a));
        assert_eq!(hypervisor_uuid(&a).get_version_num(), 5);
    }
}
