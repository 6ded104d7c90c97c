//! TLS (`wss://`, `https://`) with rustls, as a sans-IO layer between the socket and the
//! connection state machine: ciphertext read from the socket goes into a
//! `rustls::ServerConnection`, and the plaintext it yields goes to `Conn` as if it had been
//! read; what `Conn` queues (plaintext) is sealed into records just before it is written.
//! Both backends drive it the same way; neither knows about TLS.
//!
//! The certificate is read from PEM files at start (errors name the file and the problem) and
//! can be reloaded while running ([`crate::ServerHandle::reload_tls`], wired to SIGHUP by
//! `gale`): new handshakes get the new certificate, open connections keep theirs.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Where the certificate chain and private key are (PEM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The certificate new handshakes get; swapped on reload.
#[derive(Debug)]
struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// A server's TLS settings: the rustls configuration every connection starts from.
pub(crate) struct TlsAcceptor {
    files: TlsFiles,
    cert: Arc<ReloadableCert>,
    pub(crate) config: Arc<rustls::ServerConfig>,
}

impl TlsAcceptor {
    /// Load the files and build the configuration: TLS 1.2 and 1.3, ALPN `http/1.1`.
    pub(crate) fn new(files: TlsFiles) -> Result<TlsAcceptor, String> {
        let key = load_certified_key(&files)?;
        let cert = Arc::new(ReloadableCert { current: RwLock::new(key) });
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor { files, cert, config: Arc::new(config) })
    }

    /// Read the files again and use the new certificate for new handshakes.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let key = load_certified_key(&self.files)?;
        *self.cert.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    /// A session for a new connection.
    pub(crate) fn session(&self) -> Result<TlsSession, rustls::Error> {
        let mut conn = rustls::ServerConnection::new(self.config.clone())?;
        conn.set_buffer_limit(None);
        Ok(TlsSession { conn, sealed: Vec::new(), notified: false, started: false })
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the TLS {what} {}: {e}", path.display()))
}

/// Load and check a certificate chain and its key.
fn load_certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, String> {
    let cert_pem = read_file(&files.cert, "certificate")?;
    let key_pem = read_file(&files.key, "key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", files.cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no certificate found (expected PEM \"BEGIN CERTIFICATE\")",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!("{}: no private key found (expected a PEM private key): {e}", files.key.display())
    })?;
    let provider = default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{}: unsupported private key: {e}", files.key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!("{} and {} do not go together: {e}", files.cert.display(), files.key.display())
    })?;
    Ok(Arc::new(certified))
}

/// One connection's TLS state.
pub(crate) struct TlsSession {
    conn: rustls::ServerConnection,
    /// Records sealed and not yet handed to the kernel.
    pub(crate) sealed: Vec<u8>,
    /// `close_notify` has been queued.
    pub(crate) notified: bool,
    /// Some bytes have arrived (so a first byte can be checked for plain HTTP).
    started: bool,
}

/// What arrived, once decrypted.
pub(crate) enum Opened {
    /// Plaintext (possibly none: a handshake message).
    Data,
    /// The peer does not speak TLS or broke it: the alert (or the HTTP answer) is sealed,
    /// and the connection must close once it is written.
    Failed,
    /// The peer sent `close_notify`: nothing more will come (like an EOF).
    Closed,
}

/// The answer to plain HTTP on a TLS port: the client should use https or wss.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 47\r\nConnection: close\r\n\r\nThis port expects TLS: use https:// or wss://.\n";

impl TlsSession {
    /// Feed ciphertext; the plaintext it yields goes to `plain[..n]`, and `n` is returned
    /// with the outcome. `plain` only grows (zeroed once, when it does): it is the loop's
    /// scratch buffer, and clearing and refilling it with zeroes for every read showed up in
    /// profiles.
    pub(crate) fn open(&mut self, mut data: &[u8], plain: &mut Vec<u8>) -> (Opened, usize) {
        let mut filled = 0;
        if !self.started {
            self.started = true;
            // A TLS connection starts with a handshake record (0x16); a letter is a plain
            // HTTP request: answer it in plain HTTP rather than with an alert it cannot read.
            if data.first().is_some_and(u8::is_ascii_alphabetic) {
                self.sealed.extend_from_slice(PLAIN_HTTP_ANSWER);
                self.notified = true;
                return (Opened::Failed, 0);
            }
        }
        while !data.is_empty() {
            match self.conn.read_tls(&mut data) {
                // After the peer's close_notify rustls takes nothing more: stop, do not spin.
                Ok(0) => break,
                Ok(_) => {}
                Err(_) => return (self.fail(), filled),
            }
            match self.conn.process_new_packets() {
                Ok(state) => {
                    let n = state.plaintext_bytes_to_read();
                    if n > 0 {
                        if plain.len() < filled + n {
                            plain.resize(filled + n, 0);
                        }
                        if self.conn.reader().read_exact(&mut plain[filled..filled + n]).is_err() {
                            return (self.fail(), filled);
                        }
                        filled += n;
                    }
                    if state.peer_has_closed() {
                        self.seal(&mut Vec::new());
                        return (Opened::Closed, filled);
                    }
                }
                Err(_) => return (self.fail(), filled),
            }
        }
        self.seal(&mut Vec::new());
        (Opened::Data, filled)
    }

    /// The peer broke the protocol: seal the alert rustls queued (it ends the session, so no
    /// `close_notify` follows).
    fn fail(&mut self) -> Opened {
        self.seal(&mut Vec::new());
        self.notified = true;
        Opened::Failed
    }

    /// Encrypt `plain` (emptied) and move every pending record into `sealed`.
    pub(crate) fn seal(&mut self, plain: &mut Vec<u8>) {
        if !plain.is_empty() {
            // With no buffer limit the writer takes everything.
            let _ = self.conn.writer().write_all(plain);
            plain.clear();
        }
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sealed) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }

    /// Queue `close_notify` (sealed at once).
    pub(crate) fn notify_close(&mut self) {
        if !self.notified {
            self.notified = true;
            self.conn.send_close_notify();
            self.seal(&mut Vec::new());
        }
    }
}
