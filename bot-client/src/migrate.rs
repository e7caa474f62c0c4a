//! QUIC connection migration from the client side: the endpoint moves to a fresh UDP socket (a new
//! local port, as after a NAT rebinding or a network switch) and every connection on it carries on
//! with the same session. quinn sends from the new address at once; the server validates the new
//! path and answers there (QUIC migration, RFC 9000 §9). Nothing is renegotiated: no new handshake,
//! no new `hello`, the same player.

use std::net::SocketAddr;

use anyhow::{anyhow, Context};

use crate::conditioner::{ConditionedSocket, Conditioner};
use crate::endpoint::bind_udp;

/// Moves `endpoint` to a fresh UDP socket on the same IP as its current one with a new port
/// (127.0.0.1:0 for the usual test and bot endpoints) and returns the new local address.
///
/// With `conditioner` (the handle of the endpoint's conditioned socket), the new socket is put under
/// the same links ([`ConditionedSocket::rewrap`]): same impairments, queues and counters, and the
/// handle keeps controlling them. Must be called inside a tokio runtime. On error the endpoint keeps
/// its old socket.
pub fn rebind_endpoint(
    endpoint: &quinn::Endpoint,
    conditioner: Option<&Conditioner>,
) -> anyhow::Result<SocketAddr> {
    let ip = endpoint
        .local_addr()
        .context("cannot read the endpoint's address")?
        .ip();
    rebind_endpoint_to(endpoint, SocketAddr::new(ip, 0), conditioner)
}

/// [`rebind_endpoint`] to a socket bound to `bind`.
pub fn rebind_endpoint_to(
    endpoint: &quinn::Endpoint,
    bind: SocketAddr,
    conditioner: Option<&Conditioner>,
) -> anyhow::Result<SocketAddr> {
    let runtime =
        quinn::default_runtime().ok_or_else(|| anyhow!("rebinding needs a tokio runtime"))?;
    let socket = runtime
        .wrap_udp_socket(bind_udp(bind)?)
        .with_context(|| format!("cannot use UDP socket {bind}"))?;
    // Read the address before the links change hands: past that point nothing may fail.
    let addr = socket
        .local_addr()
        .context("cannot read the new socket's address")?;
    let socket: std::sync::Arc<dyn quinn::AsyncUdpSocket> = match conditioner {
        Some(handle) => ConditionedSocket::rewrap(socket, handle)?,
        None => socket,
    };
    endpoint
        .rebind_abstract(socket)
        .context("cannot rebind the endpoint")?;
    tracing::debug!(%addr, "endpoint rebound");
    Ok(addr)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn needs_a_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ep = {
            let _guard = rt.enter();
            quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
        };
        assert!(rebind_endpoint(&ep, None).is_err());
    }

    #[tokio::test]
    async fn a_rebind_changes_the_local_port() {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let before = ep.local_addr().unwrap();
        let after = rebind_endpoint(&ep, None).unwrap();
        assert_ne!(before.port(), after.port());
        assert_eq!(after.ip(), before.ip());
        assert_eq!(ep.local_addr().unwrap(), after);
        // A bind that cannot succeed leaves the endpoint on its socket.
        assert!(rebind_endpoint_to(&ep, "192.0.2.1:0".parse().unwrap(), None).is_err());
        assert_eq!(ep.local_addr().unwrap(), after);
    }
}
