//! Test helpers: start the real server in-process on 127.0.0.1:0 with a fresh development
//! certificate, and a raw QUIC client that speaks the protocol by hand (to send hostile bytes).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing
)]

pub mod http;
pub mod memory;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quicktick_server::{config::ServerConfig, net::server_endpoint, tls, Server};
use quicktick_shared::wire::{
    encode_frame, ClientMsg, FrameDecoder, ServerMsg, Welcome, ALPN, PROTOCOL_VERSION,
};
use rustls_pki_types::CertificateDer;

pub struct TestServer {
    pub server: Server,
    pub addr: SocketAddr,
    pub trust: Vec<CertificateDer<'static>>,
    pub cert_path: PathBuf,
    /// Where the development certificate lives (a restarted server reuses it).
    pub cert_dir: PathBuf,
}

pub fn test_config() -> ServerConfig {
    ServerConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        npc_count: 100,
        handshake_timeout_ms: 1500,
        ..ServerConfig::default()
    }
}

/// Starts the real server with `cfg` (bind is forced to 127.0.0.1:0). Call inside a tokio runtime.
pub fn start(cfg: ServerConfig) -> TestServer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(format!(
        "quicktick-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    start_at(cfg, "127.0.0.1:0".parse().unwrap(), &dir)
}

/// Starts the real server on `addr` with the development certificate in `dir` (created if missing).
pub fn start_at(cfg: ServerConfig, addr: SocketAddr, dir: &std::path::Path) -> TestServer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = tls::load_or_create_dev_cert(dir).unwrap();
    let trust = cert.chain.clone();
    let map = cfg.load_map().unwrap();
    let endpoint = server_endpoint(addr, cert, &cfg).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let server = Server::start(endpoint, cfg, map).unwrap();
    TestServer {
        server,
        addr,
        trust,
        cert_path: tls::dev_paths(dir).0,
        cert_dir: dir.to_path_buf(),
    }
}

pub fn raw_endpoint(trust: &[CertificateDer<'static>]) -> quinn::Endpoint {
    raw_endpoint_at(trust, "127.0.0.1:0".parse().unwrap())
}

/// [`raw_endpoint`] bound to `bind` (another loopback address plays another host).
pub fn raw_endpoint_at(trust: &[CertificateDer<'static>], bind: SocketAddr) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for c in trust {
        roots.add(c.clone()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    cc.transport_config(Arc::new(t));
    let mut ep = quinn::Endpoint::client(bind).unwrap();
    ep.set_default_client_config(cc);
    ep
}

pub struct RawClient {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub dec: FrameDecoder,
}

impl RawClient {
    pub async fn connect(ep: &quinn::Endpoint, addr: SocketAddr) -> Self {
        let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        Self {
            conn,
            send,
            recv,
            dec: FrameDecoder::new(),
        }
    }

    pub async fn send_msg(&mut self, m: &ClientMsg) {
        self.send
            .write_all(&encode_frame(m).unwrap())
            .await
            .unwrap();
    }

    /// The next server message, or None if the stream ended / 5 s passed.
    pub async fn next_msg(&mut self) -> Option<ServerMsg> {
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(Some(m)) = self.dec.next_msg::<ServerMsg>() {
                return Some(m);
            }
            match tokio::time::timeout(Duration::from_secs(5), self.recv.read(&mut buf)).await {
                Ok(Ok(Some(n))) => self.dec.extend(&buf[..n]),
                _ => return None,
            }
        }
    }

    pub async fn join(ep: &quinn::Endpoint, addr: SocketAddr, name: &str) -> (Self, Welcome) {
        let mut c = Self::connect(ep, addr).await;
        c.send_msg(&ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            name: name.into(),
            token: None,
        })
        .await;
        match c.next_msg().await {
            Some(ServerMsg::Welcome(w)) => (c, w),
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Waits until the connection is closed and returns the application close code and reason.
    pub async fn closed(&self) -> Option<(u64, String)> {
        match tokio::time::timeout(Duration::from_secs(5), self.conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => Some((
                c.error_code.into_inner(),
                String::from_utf8_lossy(&c.reason).into_owned(),
            )),
            Ok(other) => Some((u64::MAX, other.to_string())),
            Err(_) => None,
        }
    }
}

/// Counts snapshot datagrams a connection receives within `dur`.
pub async fn count_datagrams(conn: &quinn::Connection, dur: Duration) -> usize {
    let mut n = 0;
    let end = tokio::time::Instant::now() + dur;
    while let Ok(Ok(_)) = tokio::time::timeout_at(end, conn.read_datagram()).await {
        n += 1;
    }
    n
}
