//! Opening the WebSocket and sending `hello`, and how a failed attempt or a close
//! frame reads as the end of a session.

use super::*;

/// Connects and says hello; returns the socket and the `welcome`.
pub(super) async fn handshake(
    config: Arc<Config>,
    url: String,
    token: String,
    resume: BTreeMap<String, StreamPosition>,
) -> Result<(Ws, Welcome), End> {
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| End::ConnectFailed(e.to_string()))?;
    for (name, value) in &config.headers {
        request.headers_mut().insert(name.clone(), value.clone());
    }
    // With `tls`, the rustls configuration serves `wss://` URLs (`ws://` ones stay plain);
    // without it tungstenite has no TLS, and `wss://` never gets here (config.rs).
    #[cfg(feature = "tls")]
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        request,
        None,
        true,
        Some(tokio_tungstenite::Connector::Rustls(Arc::clone(
            &config.tls,
        ))),
    );
    #[cfg(not(feature = "tls"))]
    let connecting = tokio_tungstenite::connect_async_with_config(request, None, true);
    let (mut ws, _) = connecting.await.map_err(|e| connect_failed(&url, e))?;
    let hello = ClientCommand::Hello { token, resume };
    ws.send(WsMessage::text(hello.to_json()))
        .await
        .map_err(|e| End::ConnectFailed(e.to_string()))?;
    // A draining node says `reconnect` instead of `welcome`; its close follows.
    let mut after = None;
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(text))) => match ServerFrame::parse(&text) {
                Ok(ServerFrame::Welcome(welcome)) => return Ok((ws, welcome)),
                Ok(ServerFrame::Reconnect(r)) => after = Some(Duration::from_millis(r.after_ms)),
                _ => continue,
            },
            Some(Ok(WsMessage::Close(frame))) => return Err(closed(frame, after)),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(End::ConnectFailed(e.to_string())),
            None => return Err(End::ConnectFailed("closed before welcome".into())),
        }
    }
}

/// How a failed WebSocket connect ends the attempt: a TLS failure is told apart, since
/// it needs attention (a certificate the client does not trust) rather than patience.
fn connect_failed(url: &str, error: tokio_tungstenite::tungstenite::Error) -> End {
    #[cfg(feature = "tls")]
    if let Some(tls) = crate::tls::tls_cause(&error) {
        return End::Tls(crate::tls::describe(url, tls));
    }
    let _ = url;
    End::ConnectFailed(error.to_string())
}

pub(super) fn closed(frame: Option<CloseFrame>, after: Option<Duration>) -> End {
    match frame {
        Some(frame) => End::Closed {
            code: u16::from(frame.code),
            reason: frame.reason.to_string(),
            after,
        },
        None => End::Lost("closed without a code".into()),
    }
}

pub(super) fn parse<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Error> {
    serde_json::from_value(value).map_err(|e| Error::Protocol(e.to_string()))
}
