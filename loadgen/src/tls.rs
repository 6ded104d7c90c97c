//! `wss://`: the client side of TLS (rustls), between the socket and the WebSocket client.
//!
//! Plaintext queued by the connection is sealed into records when it is flushed; ciphertext
//! read from the socket is opened into plaintext before the handshake parser or the frame
//! decoder sees it. `--insecure` accepts any certificate (for throwaway test certificates);
//! otherwise the server must present a certificate for the URL's host that chains to a root
//! in `--ca-file`, or to the Mozilla roots (webpki-roots) when no file is given.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, ring::default_provider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// A TLS error in words. rustls names several certificate errors only by their enum variant
/// (`UnknownIssuer`); those get a sentence, the first one saying what to do about it.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let certificate = match e {
        rustls::Error::InvalidCertificate(c) => c,
        e => return format!("TLS: {e}"),
    };
    let words = match certificate {
        C::UnknownIssuer => {
            "is not signed by a trusted issuer (trust it with --ca-file, or accept any with --insecure)"
        }
        C::BadSignature => "has a bad signature",
        C::BadEncoding => "is malformed",
        C::Expired => "has expired",
        C::NotValidYet => "is not valid yet",
        C::NotValidForName => "is not valid for the URL's host name",
        C::Revoked => "has been revoked",
        other => return format!("TLS: invalid server certificate: {other}"),
    };
    format!("TLS: the server's certificate {words}")
}

/// The client configuration for `wss://` URLs.
pub fn client_config(
    insecure: bool,
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
                    roots.add(cert).map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("--ca-file {}: no PEM certificate in it", path.display()));
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The server name to check the certificate against (and to send as SNI).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(bare.to_string()).map_err(|e| format!("{host}: not a TLS server name: {e}"))
}

/// `--insecure`: any certificate is accepted (signatures are still checked).
#[derive(Debug)]
struct AcceptAnything(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_errors_read_as_words() {
        let unknown = describe(&rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        assert!(
            unknown.contains("not signed by a trusted issuer") && unknown.contains("--ca-file"),
            "{unknown}"
        );
        let expired = describe(&rustls::Error::InvalidCertificate(rustls::CertificateError::Expired));
        assert_eq!(expired, "TLS: the server's certificate has expired");
    }
}
