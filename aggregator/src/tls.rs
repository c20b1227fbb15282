//! HTTPS: the TLS settings `[http] tls_cert`, `tls_key` and `tls_client_ca` make, and a listener
//! that hands axum connections whose TLS handshake is done, so that `axum::serve` (and its
//! graceful shutdown) works as with plain TCP.
//!
//! Handshakes run in tasks of their own, beside the accept loop: a client that connects and says
//! nothing, sends plain HTTP or garbage instead of a TLS hello, or has no acceptable certificate,
//! delays no one else. Such failures are counted (`tributary_tls_handshake_failures_total`) and
//! logged at debug, as a scanner on the port would otherwise fill the log.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::HttpConfig;

/// A client has this long to finish its handshake; one that stalls is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for axum to take them.
const READY_QUEUE: usize = 64;
/// After an accept error other than a connection's own (e.g. out of file descriptors), the loop
/// waits before the next accept instead of spinning: 1 s, doubling up to 64 s.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(64));

/// A TLS key (`http.tls_cert`, ...) whose file cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TlsConfigError {
    pub key: &'static str,
    pub reason: String,
}

impl TlsConfigError {
    fn new(key: &'static str, reason: String) -> TlsConfigError {
        TlsConfigError { key, reason }
    }
}

/// The server's TLS settings, from the files `[http]` names (paths as resolved at load): `None`
/// when `tls_cert` and `tls_key` are not set (plain HTTP).
pub fn server_config(http: &HttpConfig) -> Result<Option<Arc<rustls::ServerConfig>>, TlsConfigError> {
    let (cert, key) = match (&http.tls_cert, &http.tls_key) {
        (None, None) => {
            if http.tls_client_ca.is_some() {
                return Err(TlsConfigError::new(
                    "http.tls_client_ca",
                    "client certificates need HTTPS: set tls_cert and tls_key too".into(),
                ));
            }
            return Ok(None);
        }
        (Some(_), None) => {
            return Err(TlsConfigError::new(
                "http.tls_key",
                "required with tls_cert: the PEM file of its private key".into(),
            ));
        }
        (None, Some(_)) => {
            return Err(TlsConfigError::new(
                "http.tls_cert",
                "required with tls_key: the PEM file of the server's certificate".into(),
            ));
        }
        (Some(cert), Some(key)) => (cert, key),
    };
    // Explicitly ring, as everywhere here: the configuration is checked before main installs it.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::new("http.tls_cert", format!("no TLS version to offer: {e}")))?;
    let builder = match &http.tls_client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for (i, cert) in read_certificates("http.tls_client_ca", ca)?.into_iter().enumerate() {
                roots.add(cert).map_err(|e| {
                    TlsConfigError::new(
                        "http.tls_client_ca",
                        format!("certificate #{} in {} is not a usable CA: {e}", i + 1, ca.display()),
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsConfigError::new("http.tls_client_ca", format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = read_certificates("http.tls_cert", cert)?;
    let key_der = read_private_key("http.tls_key", key)?;
    let mut config = builder.with_single_cert(chain, key_der).map_err(|e| {
        let reason = match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                format!("{} is not the private key of {}", key.display(), cert.display())
            }
            e => format!("{} cannot sign for {}: {e}", key.display(), cert.display()),
        };
        TlsConfigError::new("http.tls_key", reason)
    })?;
    // The server speaks HTTP/1.1 only (axum's http1 feature).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The certificates of a PEM file; at least one.
fn read_certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    tributary_shared::pem::certificates(path).map_err(|reason| TlsConfigError::new(key, reason))
}

/// The first private key of a PEM file.
fn read_private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    tributary_shared::pem::private_key(path).map_err(|reason| TlsConfigError::new(key, reason))
}

/// A TCP listener whose connections come out TLS-handshaken: an [`axum::serve::Listener`].
/// Dropping it (axum does, once shutdown begins) closes the port and abandons open handshakes.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `listener` (bound to `local`); `failures` counts handshakes that fail
    /// or time out.
    pub fn new(
        listener: TcpListener,
        local: SocketAddr,
        config: Arc<rustls::ServerConfig>,
        failures: Counter,
    ) -> TlsListener {
        let (ready_tx, ready) = mpsc::channel(READY_QUEUE);
        tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), ready_tx, failures));
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            // The accept loop only ends once this listener is dropped: not reached.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accepts TCP connections and handshakes each in a task of its own, until the listener is dropped.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    failures: Counter,
) {
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = ready.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(connection) => {
                backoff = ACCEPT_BACKOFF.0;
                connection
            }
            // The connection's own trouble (reset before it was accepted): nothing to wait for.
            Err(e) if is_connection_error(&e) => continue,
            Err(error) => {
                tracing::error!(%error, retry_in = ?backoff, "cannot accept connections");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = ready.closed() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let (acceptor, ready, failures) = (acceptor.clone(), ready.clone(), failures.clone());
        tokio::spawn(async move {
            let handshake = tokio::select! {
                handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)) => handshake,
                _ = ready.closed() => return,
            };
            match handshake {
                // An error here means the server is stopping: the connection is dropped.
                Ok(Ok(stream)) => {
                    let _ = ready.send((stream, peer)).await;
                }
                Ok(Err(error)) => {
                    failures.inc();
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                }
                Err(_) => {
                    failures.inc();
                    tracing::debug!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                }
            }
        });
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
