//! `peer-tokio-tungstenite-tls`: the tokio-tungstenite echo server of `peer-tokio-tungstenite`
//! behind TLS, the usual tokio way: `tokio-rustls` (rustls 0.23 on the ring provider, TLS 1.2
//! and 1.3, ALPN `http/1.1`) accepts each connection, then `accept_async_with_config` and
//! `read.forward(write)` as in its echo example. Certificate and key from `--tls-cert` and
//! `--tls-key` (PEM); prints `tokio-tungstenite-tls listening on wss://127.0.0.1:PORT`.

use std::net::Ipv4Addr;
use std::num::NonZeroUsize;
use std::sync::Arc;

use clap::Parser;
use futures_util::{StreamExt, TryStreamExt, future};
use gale_peers::MAX_MESSAGE;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Command line: the peers' common one plus the certificate.
#[derive(Parser, Debug)]
struct Args {
    /// TCP port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Worker threads.
    #[arg(long, default_value_t = std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))]
    threads: NonZeroUsize,
    /// Certificate chain (PEM).
    #[arg(long)]
    tls_cert: std::path::PathBuf,
    /// Private key (PEM).
    #[arg(long)]
    tls_key: std::path::PathBuf,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&args.tls_cert)
        .and_then(|i| i.collect())
        .map_err(|e| std::io::Error::other(format!("{}: {e}", args.tls_cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&args.tls_key)
        .map_err(|e| std::io::Error::other(format!("{}: {e}", args.tls_key.display())))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(std::io::Error::other)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.get())
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, args.port)).await?;
        gale_peers::announce("tokio-tungstenite-tls", "wss", listener.local_addr()?.port())?;
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let config = WebSocketConfig::default()
                    .max_message_size(Some(MAX_MESSAGE))
                    .max_frame_size(Some(MAX_MESSAGE));
                let Ok(ws) = tokio_tungstenite::accept_async_with_config(tls, Some(config)).await else {
                    return;
                };
                let (write, read) = ws.split();
                let _ = read
                    .try_filter(|msg| future::ready(msg.is_text() || msg.is_binary()))
                    .forward(write)
                    .await;
            });
        }
    })
}
