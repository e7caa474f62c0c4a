//! The client side of TLS and QUIC setup: which certificates to trust, and a client endpoint whose
//! default client config carries the quicktick ALPN and transport settings.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use quicktick_shared::wire::ALPN;
use rustls_pki_types::CertificateDer;

/// Keep-alive interval: well below half the idle timeout, so an idle lobby client is never dropped.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Idle timeout the client proposes (the effective one is the smaller of both peers').
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing datagram buffer: small, so a stale input datagram is evicted rather than queued.
pub const DATAGRAM_SEND_BUFFER: usize = 16 * 1024;
/// Requested `SO_RCVBUF` of each client socket (best effort): many bots share one socket.
pub const SOCKET_RECV_BUFFER: usize = 4 * 1024 * 1024;

/// Reads every PEM certificate in `path`; errors name the file and fail when it holds none.
pub fn load_trust(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read certificate file {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("cannot parse PEM certificate file {}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(certs)
}

/// The QUIC client config: trusts exactly `trust`, TLS 1.3 with the ring provider, quicktick ALPN,
/// keep-alive [`KEEP_ALIVE`], idle timeout [`IDLE_TIMEOUT`], send buffer [`DATAGRAM_SEND_BUFFER`].
pub fn client_config(trust: &[CertificateDer<'static>]) -> anyhow::Result<quinn::ClientConfig> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if trust.is_empty() {
        bail!("no certificate to trust");
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in trust {
        roots
            .add(cert.clone())
            .context("cannot trust the given certificate")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 unavailable")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .context("TLS config unusable for QUIC")?;

    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).context("idle timeout out of range")?,
        ))
        .datagram_send_buffer_size(DATAGRAM_SEND_BUFFER);
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A client endpoint bound to `bind` (port 0 for any) whose default client config is
/// [`client_config`]`(trust)`. Must be called inside a tokio runtime. Asks for a
/// [`SOCKET_RECV_BUFFER`] receive buffer; the OS may grant less.
pub fn client_endpoint(
    bind: SocketAddr,
    trust: &[CertificateDer<'static>],
) -> anyhow::Result<quinn::Endpoint> {
    client_endpoint_with(bind, trust, Ok)
}

/// [`client_endpoint`] with the runtime's socket passed through `wrap` before quinn gets it (the
/// link conditioner wraps it).
pub(crate) fn client_endpoint_with(
    bind: SocketAddr,
    trust: &[CertificateDer<'static>],
    wrap: impl FnOnce(Arc<dyn quinn::AsyncUdpSocket>) -> anyhow::Result<Arc<dyn quinn::AsyncUdpSocket>>,
) -> anyhow::Result<quinn::Endpoint> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = client_config(trust)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| anyhow!("client_endpoint must be called inside a tokio runtime"))?;
    let socket = bind_udp(bind)?;
    let socket = runtime
        .wrap_udp_socket(socket)
        .with_context(|| format!("cannot use UDP socket {bind}"))?;
    let socket = wrap(socket)?;
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        socket,
        runtime,
    )
    .with_context(|| format!("cannot create QUIC endpoint on {bind}"))?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// A UDP socket bound to `bind`, asking for a [`SOCKET_RECV_BUFFER`] receive buffer (best effort).
pub(crate) fn bind_udp(bind: SocketAddr) -> anyhow::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(bind)
        .with_context(|| format!("cannot bind UDP socket {bind}"))?;
    match quinn::udp::UdpSocketState::new((&socket).into()) {
        Ok(state) => {
            if let Err(e) = state.set_recv_buffer_size((&socket).into(), SOCKET_RECV_BUFFER) {
                tracing::debug!("cannot set SO_RCVBUF to {SOCKET_RECV_BUFFER}: {e}");
            }
        }
        Err(e) => tracing::debug!("cannot inspect UDP socket: {e}"),
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn missing_cert_file_is_named() {
        let err = load_trust(Path::new("/nonexistent/quicktick/cert.pem")).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/quicktick/cert.pem"));
    }

    #[test]
    fn file_without_certs_is_refused() {
        let path = std::env::temp_dir().join(format!("qt-empty-{}.pem", std::process::id()));
        std::fs::write(&path, "not a pem\n").unwrap();
        let err = load_trust(&path).unwrap_err();
        assert!(err.to_string().contains(&path.display().to_string()));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn endpoint_needs_a_runtime_and_a_trust() {
        assert!(client_endpoint("127.0.0.1:0".parse().unwrap(), &[]).is_err());
        assert!(client_config(&[]).is_err());
    }
}
