//! TLS for `wss://` and `https://` endpoints (cargo feature `tls`, on by default).
//!
//! One rustls configuration is built at [`ClientBuilder::start`] and serves both the
//! WebSocket handshake and the `/v1/connect` requests, so the two trust exactly the same
//! roots: the Mozilla roots bundled by `webpki-roots` (unless turned off) plus the PEM
//! certificates the application adds. Certificates are always verified; there is no
//! switch to turn verification off. The crypto provider is `ring`, chosen explicitly so
//! that no process-wide default provider has to be installed.
//!
//! [`ClientBuilder::start`]: crate::ClientBuilder::start

use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The roots a client trusts.
#[derive(Debug, Clone)]
pub(crate) struct Trust {
    /// Trust the Mozilla roots of `webpki-roots`.
    pub(crate) built_in: bool,
    /// PEM bundles of extra root certificates, as given.
    pub(crate) extra_pem: Vec<Vec<u8>>,
}

impl Default for Trust {
    fn default() -> Self {
        Self {
            built_in: true,
            extra_pem: Vec::new(),
        }
    }
}

/// Builds the rustls client configuration for `trust`. Errors name the bad input; they
/// become [`Error::Config`](crate::Error::Config) at `start()`.
pub(crate) fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    if trust.built_in {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for (i, pem) in trust.extra_pem.iter().enumerate() {
        let which = format!("root certificate PEM #{}", i + 1);
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{which}: {e}"))?;
        if certs.is_empty() {
            return Err(format!("{which}: no CERTIFICATE block in it"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| format!("{which}: {e}"))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted root certificate: built-in roots are off and none were added".into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The rustls error behind `error`, if a TLS failure caused it (anywhere in its chain of
/// sources, since tungstenite, reqwest and hyper each wrap it).
pub(crate) fn tls_cause<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // An io::Error made from another error (tokio-rustls wraps rustls's, and hyper's
        // connectors wrap that io::Error again) shows it through `get_ref` only: its
        // `source` skips to the inner error's source.
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
        {
            next = Some(inner);
            continue;
        }
        next = e.source();
    }
    None
}

/// A message for a failed TLS handshake with `peer`: rustls's own words, and for a
/// certificate that is not trusted, where to look.
pub(crate) fn describe(peer: &str, error: &rustls::Error) -> String {
    let hint = match error {
        rustls::Error::InvalidCertificate(_) => {
            " (is the server's CA among the trusted roots? see ClientBuilder::tls_root_certificates_pem)"
        }
        _ => "",
    };
    format!("TLS handshake with {peer} failed: {error}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh self-signed certificate, in PEM.
    fn cert_pem() -> String {
        rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .expect("rcgen")
            .cert
            .pem()
    }

    fn trust(built_in: bool, pems: &[&str]) -> Trust {
        Trust {
            built_in,
            extra_pem: pems.iter().map(|p| p.as_bytes().to_vec()).collect(),
        }
    }

    #[test]
    fn built_in_roots_by_default() {
        assert!(client_config(&Trust::default()).is_ok());
    }

    #[test]
    fn extra_roots_alone_are_enough() {
        let two = format!("{}{}", cert_pem(), cert_pem());
        let config = client_config(&trust(false, &[&cert_pem(), &two])).unwrap();
        assert!(config.alpn_protocols.is_empty());
    }

    #[test]
    fn bad_root_pem_is_refused() {
        let e = client_config(&trust(true, &["not a certificate"])).unwrap_err();
        assert!(e.contains("PEM #1") && e.contains("no CERTIFICATE"), "{e}");
        let broken = "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        let e = client_config(&trust(true, &[broken])).unwrap_err();
        assert!(e.contains("PEM #1"), "{e}");
    }

    #[test]
    fn no_root_at_all_is_refused() {
        let e = client_config(&trust(false, &[])).unwrap_err();
        assert!(e.contains("no trusted root"), "{e}");
    }

    #[test]
    fn tls_causes_are_found_through_wrappers() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        let found = tls_cause(&io).expect("found behind io::Error");
        assert!(describe("127.0.0.1:1", found).contains("trusted roots"));
        let twice = std::io::Error::other(io);
        let found = tls_cause(&twice).expect("found behind two io::Errors");
        assert!(describe("127.0.0.1:1", found).contains("trusted roots"));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(tls_cause(&plain).is_none());
    }
}
