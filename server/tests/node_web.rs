//! The files every node serves for browsers (`server/src/web.rs`): the demo page, the
//! client library and its types, with their content types, caching, `nosniff` and the
//! demo page's Content-Security-Policy; the bodies are the repository's `web/` files.

#[path = "support/node.rs"]
mod node;
#[path = "support/panics.rs"]
mod panics;

use node::TestNode;
use panics::{assert_no_server_panic, watch_panics};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;

async fn get(
    n: &TestNode,
    path: &str,
    if_none_match: Option<&str>,
) -> (StatusCode, HeaderMap, String) {
    let mut req = reqwest::Client::new().get(format!("{}{path}", n.http()));
    if let Some(tag) = if_none_match {
        req = req.header("If-None-Match", tag);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn serves_the_web_files_with_their_headers() {
    watch_panics();
    let n = TestNode::start_default().await;
    let files = [
        (
            "/",
            "text/html; charset=utf-8",
            include_str!("../../web/index.html"),
        ),
        (
            "/herald.js",
            "text/javascript; charset=utf-8",
            include_str!("../../web/herald.js"),
        ),
        (
            "/herald.d.ts",
            "application/typescript; charset=utf-8",
            include_str!("../../web/herald.d.ts"),
        ),
        (
            "/demo.js",
            "text/javascript; charset=utf-8",
            include_str!("../../web/demo.js"),
        ),
        (
            "/demo.css",
            "text/css; charset=utf-8",
            include_str!("../../web/demo.css"),
        ),
    ];
    for (path, content_type, body) in files {
        let (status, headers, text) = get(&n, path, None).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), content_type, "{path}");
        assert_eq!(header(&headers, "cache-control"), "no-cache", "{path}");
        assert_eq!(
            header(&headers, "x-content-type-options"),
            "nosniff",
            "{path}"
        );
        assert_eq!(text, body, "{path}: the file from web/");
        let is_page = path == "/";
        assert_eq!(
            headers.contains_key("content-security-policy"),
            is_page,
            "{path}"
        );
        // The library may be imported from an application's own origin.
        let shared = path.starts_with("/herald.");
        assert_eq!(
            headers
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap()),
            shared.then_some("*"),
            "{path}"
        );

        // Revalidation: the same ETag answers 304 without a body.
        let etag = header(&headers, "etag").to_owned();
        assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
        let (status, headers, text) = get(&n, path, Some(&etag)).await;
        assert_eq!(status, 304, "{path}");
        assert!(text.is_empty());
        assert_eq!(header(&headers, "etag"), etag);
        assert_eq!(header(&headers, "cache-control"), "no-cache");
        let (status, _, _) = get(&n, path, Some("\"something-else\"")).await;
        assert_eq!(status, 200, "{path}: another ETag gets the file");
    }
    n.shutdown().await;
    assert_no_server_panic();
}

#[tokio::test]
async fn the_demo_page_has_a_strict_policy_that_allows_any_node() {
    let n = TestNode::start_default().await;
    let (_, headers, html) = get(&n, "/", None).await;
    let csp = header(&headers, "content-security-policy");
    let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
    for want in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        // WebSockets to whichever node /v1/connect names; fetches stay on this origin.
        "connect-src 'self' ws: wss:",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(directives.contains(&want), "{want} in {csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(header(&headers, "x-frame-options"), "DENY");
    assert_eq!(header(&headers, "referrer-policy"), "no-referrer");
    // Self-contained: no external resources, no inline script or handlers.
    assert!(!html.contains("http://") && !html.contains("https://"));
    assert!(html.contains(r#"<script type="module" src="/demo.js"></script>"#));
    assert_eq!(html.matches("<script").count(), 1);
    assert!(
        !html.contains(" onclick=") && !html.contains(" onsubmit=") && !html.contains("style=")
    );
    n.shutdown().await;
}

#[tokio::test]
async fn other_methods_and_paths_get_json_errors() {
    let n = TestNode::start_default().await;
    let r = reqwest::Client::new()
        .post(format!("{}/herald.js", n.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    let r = reqwest::get(format!("{}/herald.mjs", n.http()))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found", "{body}");
    // HEAD works like GET, without a body.
    let r = reqwest::Client::new()
        .head(format!("{}/herald.js", n.http()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    n.shutdown().await;
}
