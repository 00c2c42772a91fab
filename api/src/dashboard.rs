//! The live dashboard at `GET /`: one HTML page with its stylesheet, script and icon, embedded in
//! the binary (no CDN, no network at run time, no build step). The script reads the JSON API and
//! follows `GET /v1/events`; see `docs/dashboard.md`.
//!
//! Every response carries a strict Content-Security-Policy: scripts and styles only from this
//! origin (no inline code), connections only to this origin, no frames, no plugins.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page's policy: everything from this origin only, nothing inline, nothing framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const INDEX_HTML: &str = include_str!("../assets/index.html");
const APP_JS: &str = include_str!("../assets/app.js");
const APP_CSS: &str = include_str!("../assets/app.css");
const FAVICON_SVG: &str = include_str!("../assets/favicon.svg");

/// One embedded file: its body and content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Everything the dashboard serves, by path.
pub const ASSETS: [Asset; 4] = [
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: INDEX_HTML,
    },
    Asset {
        path: "/assets/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: APP_JS,
    },
    Asset {
        path: "/assets/app.css",
        content_type: "text/css; charset=utf-8",
        body: APP_CSS,
    },
    Asset {
        path: "/assets/favicon.svg",
        content_type: "image/svg+xml",
        body: FAVICON_SVG,
    },
];

/// The dashboard's routes; merge them into the API router (any state).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new();
    for asset in ASSETS {
        router = router.route(asset.path, get(move || async move { respond(asset) }));
    }
    router
}

fn respond(asset: Asset) -> Response {
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        // Small files that change with the binary: always revalidate.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ),
    ];
    (headers, asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets_and_has_no_inline_code() {
        let html = INDEX_HTML;
        for asset in &ASSETS[1..] {
            assert!(
                html.contains(asset.path),
                "index.html misses {}",
                asset.path
            );
        }
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!html.contains("<style"), "inline styles break the CSP");
        assert!(!html.contains(" style="), "inline styles break the CSP");
        assert!(!html.contains("onclick") && !html.contains("javascript:"));
        // Every <script> has a src.
        assert_eq!(
            html.matches("<script").count(),
            html.matches("<script src=\"/assets/").count()
        );
    }

    #[test]
    fn the_script_never_parses_data_as_html() {
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!APP_JS.contains(banned), "app.js uses {banned}");
        }
        assert!(!APP_JS.contains("http://") && !APP_JS.contains("https://"));
    }
}
