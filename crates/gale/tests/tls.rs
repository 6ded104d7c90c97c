//! `wss://`: `gale echo` with a throwaway certificate (rcgen), driven by a rustls client:
//! echo over TLS 1.3 and 1.2, ALPN, the certificate the client sees (and a name it does not
//! match), plain HTTP and garbage on the TLS port (neither disturbs other connections), bad
//! certificate files at start, and reloading the certificate on SIGHUP without dropping open
//! connections. Runs on the backend under test (`GALE_BACKEND`).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gale_frame::handshake::ClientHandshake;
use gale_frame::{Decoder, DecoderConfig, Event, FrameSpec, OpCode, append_frame};
use rustls::pki_types::{CertificateDer, ServerName};
use support::{Gale, echo_command, signal};

/// A fresh certificate and key for `localhost` and 127.0.0.1, written into `dir`.
fn make_cert(dir: &Path) -> CertificateDer<'static> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("generate a certificate");
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    cert.cert.der().clone()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gale-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(dir: &Path) -> Gale {
    let mut cmd = echo_command();
    cmd.arg("--tls-cert").arg(dir.join("cert.pem")).arg("--tls-key").arg(dir.join("key.pem"));
    Gale::start(&mut cmd)
}

fn client_config(trusted: &CertificateDer<'static>, tls12_only: bool) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&'static rustls::SupportedProtocolVersion] =
        if tls12_only { &[&rustls::version::TLS12] } else { &[&rustls::version::TLS13] };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A WebSocket client over TLS.
struct WssClient {
    tls: Tls,
    decoder: Decoder,
    pending: Vec<u8>,
}

impl WssClient {
    fn connect(
        gale: &Gale,
        config: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> Result<WssClient, std::io::Error> {
        let tcp = TcpStream::connect(gale.addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let conn = rustls::ClientConnection::new(config, ServerName::try_from(name.to_string()).unwrap())
            .map_err(std::io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let handshake = ClientHandshake::new();
        let mut request = Vec::new();
        handshake.write_request(&mut request, &gale.addr.to_string(), "/tls", &[], &[]);
        tls.write_all(&request)?;
        let mut head = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = tls.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&chunk[..n]);
            if let Some((_, used)) = handshake.parse_response(&head, &[]).map_err(std::io::Error::other)? {
                let pending = head[used..].to_vec();
                return Ok(WssClient { tls, decoder: Decoder::new(DecoderConfig::client(1 << 24)), pending });
            }
        }
    }

    fn send_text(&mut self, text: &str) {
        let mut frame = Vec::new();
        append_frame(&mut frame, FrameSpec::client(OpCode::Text, [1, 2, 3, 4]), text.as_bytes());
        self.tls.write_all(&frame).unwrap();
    }

    fn expect_text(&mut self) -> String {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let mut buf = std::mem::take(&mut self.pending);
            let (used, event) = self.decoder.decode(&mut buf).expect("valid frames");
            let text = match event {
                Some(Event::Text(t)) => Some(t.to_string()),
                Some(other) => panic!("expected text, got {other:?}"),
                None => None,
            };
            self.pending = buf[used..].to_vec();
            if let Some(t) = text {
                return t;
            }
            if used == 0 {
                let n = self.tls.read(&mut chunk).expect("read over TLS");
                assert!(n > 0, "the server closed the connection");
                self.pending.extend_from_slice(&chunk[..n]);
            }
        }
    }

    fn assert_echo(&mut self, text: &str) {
        self.send_text(text);
        assert_eq!(self.expect_text(), text);
    }

    fn peer_certificate(&self) -> CertificateDer<'static> {
        self.tls.conn.peer_certificates().expect("a certificate")[0].clone().into_owned()
    }
}

#[test]
fn echo_over_tls13_and_tls12_with_alpn() {
    let dir = temp_dir("echo");
    let cert = make_cert(&dir);
    let gale = start(&dir);
    assert!(gale.banner.contains("wss://"), "{}", gale.banner);
    for tls12 in [false, true] {
        let mut c = WssClient::connect(&gale, client_config(&cert, tls12), "localhost").unwrap();
        let version = c.tls.conn.protocol_version().unwrap();
        assert_eq!(
            version,
            if tls12 { rustls::ProtocolVersion::TLSv1_2 } else { rustls::ProtocolVersion::TLSv1_3 }
        );
        assert_eq!(c.tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        c.assert_echo("hello over TLS");
        c.assert_echo(&"漢字🚀".repeat(40_000));
        c.assert_echo(&"x".repeat(300_000));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_name_the_certificate_does_not_cover_fails_on_the_client() {
    let dir = temp_dir("sni");
    let cert = make_cert(&dir);
    let gale = start(&dir);
    let err = WssClient::connect(&gale, client_config(&cert, false), "wrong.example").err().expect("refused");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    // The server goes on serving.
    WssClient::connect(&gale, client_config(&cert, false), "localhost").unwrap().assert_echo("still here");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plain_http_and_garbage_on_the_tls_port_are_refused_without_disturbing_others() {
    let dir = temp_dir("garbage");
    let cert = make_cert(&dir);
    let gale = start(&dir);
    let mut good = WssClient::connect(&gale, client_config(&cert, false), "localhost").unwrap();
    good.assert_echo("before");

    let mut plain = TcpStream::connect(gale.addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain.write_all(b"GET /tls HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("expects TLS"), "{answer}");

    for garbage in [&[0x16u8, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5][..], &[0xff; 64][..], &[0x16, 0x03][..]]
    {
        let mut s = TcpStream::connect(gale.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(garbage).unwrap();
        if garbage.len() == 2 {
            // An incomplete record: the handshake timeout applies; just leave it open.
            continue;
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        // A TLS alert record (type 21) or nothing; never a hang.
        assert!(rest.is_empty() || rest[0] == 21, "{rest:?}");
    }
    good.assert_echo("after");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_certificate_files_stop_the_start_with_a_clear_message() {
    let dir = temp_dir("badfiles");
    make_cert(&dir);
    let other = temp_dir("badfiles-other");
    make_cert(&other);
    let run = |cert: &Path, key: &Path| {
        let out = echo_command().arg("--tls-cert").arg(cert).arg("--tls-key").arg(key).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = dir.join("nope.pem");
    assert!(run(&missing, &dir.join("key.pem")).contains("cannot read the TLS certificate"));
    assert!(run(&dir.join("key.pem"), &dir.join("key.pem")).contains("no certificate found"));
    assert!(run(&dir.join("cert.pem"), &dir.join("cert.pem")).contains("no private key"));
    assert!(run(&dir.join("cert.pem"), &other.join("key.pem")).contains("do not go together"));
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(other);
}

#[test]
fn sighup_reloads_the_certificate_and_keeps_open_connections() {
    let dir = temp_dir("reload");
    let first = make_cert(&dir);
    let gale = start(&dir);
    let mut old = WssClient::connect(&gale, client_config(&first, false), "localhost").unwrap();
    assert_eq!(old.peer_certificate(), first);
    let second = make_cert(&dir);
    assert_ne!(first, second);
    signal(gale.pid(), "HUP");
    let mut seen = None;
    for _ in 0..50 {
        let c = WssClient::connect(&gale, client_config(&second, false), "localhost");
        if let Ok(c) = c {
            seen = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut new = seen.expect("new handshakes get the reloaded certificate");
    assert_eq!(new.peer_certificate(), second);
    new.assert_echo("new");
    old.assert_echo("the old connection lives on");
    // A broken file on the next reload keeps the current certificate.
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    signal(gale.pid(), "HUP");
    std::thread::sleep(Duration::from_millis(300));
    WssClient::connect(&gale, client_config(&second, false), "localhost").unwrap().assert_echo("kept");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn close_notify_ends_the_connection_and_bytes_after_it_do_not_stall_the_loop() {
    let dir = temp_dir("notify");
    let cert = make_cert(&dir);
    // One loop: a loop stuck on this connection would stall every other one.
    let mut cmd = support::echo_command_with_threads(1);
    cmd.arg("--tls-cert").arg(dir.join("cert.pem")).arg("--tls-key").arg(dir.join("key.pem"));
    let gale = Gale::start(&mut cmd);
    let mut c = WssClient::connect(&gale, client_config(&cert, false), "localhost").unwrap();
    c.assert_echo("before close_notify");
    c.tls.conn.send_close_notify();
    while c.tls.conn.wants_write() {
        c.tls.conn.write_tls(&mut c.tls.sock).unwrap();
    }
    // A stray byte after close_notify, in the same or the next read.
    c.tls.sock.write_all(&[0x17]).unwrap();
    let mut rest = Vec::new();
    let _ = c.tls.sock.read_to_end(&mut rest);
    // The loop still serves others.
    WssClient::connect(&gale, client_config(&cert, false), "localhost").unwrap().assert_echo("loop alive");
    let _ = std::fs::remove_dir_all(dir);
}
