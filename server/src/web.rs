//! The browser side every node serves: the client library (`/herald.js`, its types at
//! `/herald.d.ts`), the demo page (`/`, `/demo.js`, `/demo.css`) and the cluster
//! dashboard (`/admin`, `/admin.js`, `/admin.css`).
//!
//! The files live in the repository's `web/` folder and are compiled into the binary
//! (`include_str!`), so a node needs nothing on disk. Each answer says `no-cache` (the
//! browser revalidates with the ETag, so a new release is picked up at once) and
//! `nosniff`; the demo page gets a strict Content-Security-Policy: only this origin's
//! scripts and styles, no inline code, and WebSocket connections to any host, because the
//! demo may be sent to another node of the cluster by `/v1/connect`. The dashboard's
//! policy is stricter still: it only ever talks to its own node's API.
//!
//! The dashboard page itself is public: it is inert without the API key, which the
//! operator types in and every API call then carries.

use std::sync::{Arc, LazyLock};

use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::node::Node;

/// The demo page's policy. `connect-src` lists `ws:`/`wss:` without a host: the demo
/// connects to whichever node `/v1/connect` names, and nodes' addresses are not known
/// when the page is served. Fetches stay on this origin (`/dev/token`, `/v1/connect`).
pub const DEMO_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self' ws: wss:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The dashboard's policy: its scripts, styles and API calls stay on this origin.
pub const ADMIN_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// One embedded file: where it is served, its body and content type.
struct Asset {
    path: &'static str,
    body: &'static str,
    content_type: &'static str,
    /// An HTML page's Content-Security-Policy (and its other page headers).
    csp: Option<&'static str>,
    /// Importable from other origins (the client library and its types).
    shared: bool,
}

/// Every file this module serves.
static ASSETS: [Asset; 8] = [
    Asset {
        path: "/",
        body: include_str!("../../web/index.html"),
        content_type: "text/html; charset=utf-8",
        csp: Some(DEMO_CSP),
        shared: false,
    },
    Asset {
        path: "/demo.js",
        body: include_str!("../../web/demo.js"),
        content_type: "text/javascript; charset=utf-8",
        csp: None,
        shared: false,
    },
    Asset {
        path: "/demo.css",
        body: include_str!("../../web/demo.css"),
        content_type: "text/css; charset=utf-8",
        csp: None,
        shared: false,
    },
    Asset {
        path: "/herald.js",
        body: include_str!("../../web/herald.js"),
        content_type: "text/javascript; charset=utf-8",
        csp: None,
        shared: true,
    },
    Asset {
        path: "/herald.d.ts",
        body: include_str!("../../web/herald.d.ts"),
        content_type: "application/typescript; charset=utf-8",
        csp: None,
        shared: true,
    },
    Asset {
        path: "/admin",
        body: include_str!("../../web/admin.html"),
        content_type: "text/html; charset=utf-8",
        csp: Some(ADMIN_CSP),
        shared: false,
    },
    Asset {
        path: "/admin.js",
        body: include_str!("../../web/admin.js"),
        content_type: "text/javascript; charset=utf-8",
        csp: None,
        shared: false,
    },
    Asset {
        path: "/admin.css",
        body: include_str!("../../web/admin.css"),
        content_type: "text/css; charset=utf-8",
        csp: None,
        shared: false,
    },
];

/// Strong ETags of [`ASSETS`], in the same order: the first 16 bytes of each body's SHA-256.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let digest = Sha256::digest(a.body.as_bytes());
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header value")
        })
        .collect()
});

/// The routes of the embedded files (merged with the API's routes in `lib.rs`).
pub fn routes() -> Router<Arc<Node>> {
    ASSETS
        .iter()
        .enumerate()
        .fold(Router::new(), |router, (i, asset)| {
            router.route(
                asset.path,
                get(move |h: HeaderMap| async move { serve(i, &h) }),
            )
        })
        // The same JSON 405 as the API's endpoints.
        .method_not_allowed_fallback(crate::api::method_not_allowed)
}

/// The file with its headers, or 304 when the browser's copy is current.
fn serve(index: usize, request: &HeaderMap) -> Response {
    let asset = &ASSETS[index];
    let etag = &ETAGS[index];
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::ETAG, etag.clone());
    if let Some(csp) = asset.csp {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(csp),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    if asset.shared {
        // The library may be imported by an application on another origin.
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    if matches(request.get(header::IF_NONE_MATCH), etag) {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    (headers, asset.body).into_response()
}

/// Whether an `If-None-Match` header names this ETag (or is `*`).
fn matches(if_none_match: Option<&HeaderValue>, etag: &HeaderValue) -> bool {
    let Some(value) = if_none_match.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let etag = etag.to_str().unwrap_or("");
    value
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag == etag || tag.strip_prefix("W/") == Some(etag))
}
