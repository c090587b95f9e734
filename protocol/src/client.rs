//! `HeadClient`: how every process (node daemons, `rayctl`, the SDK, tests) reaches the heads.
//! It holds every head address it knows, follows NOT_LEADER hints to the leader, and retries
//! retryable errors on the next head with capped exponential backoff, all within one overall
//! deadline. Channels are cached per address (one HTTP/2 connection each, with keepalive so a
//! silently dropped peer is noticed).
//!
//! Retrying a write whose reply was lost may apply it twice; every write in this API is either
//! idempotent or harmless to repeat (a repeated registration only bumps the incarnation).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::auth::{AuthToken, ClientAuth};
use crate::pb::control_plane_client::ControlPlaneClient;
use crate::pb::node_manager_client::NodeManagerClient;
use crate::pb::object_manager_client::ObjectManagerClient;
use crate::{MAX_MESSAGE_BYTES, RpcError};

pub type CpClient = ControlPlaneClient<InterceptedService<Channel, ClientAuth>>;
pub type NmClient = NodeManagerClient<InterceptedService<Channel, ClientAuth>>;

/// Timeouts of a `HeadClient`.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Overall budget of one `call`, retries included.
    pub deadline: Duration,
    /// Budget of one attempt.
    pub rpc_timeout: Duration,
    pub connect_timeout: Duration,
    /// Cap of the exponential backoff between attempts.
    pub max_backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(10),
            rpc_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(1),
            max_backoff: Duration::from_millis(500),
        }
    }
}

/// Why a call failed for good.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cluster answered with an error that retrying will not fix.
    #[error(transparent)]
    Rpc(#[from] RpcError),
    /// No head gave a usable answer before the deadline.
    #[error("no head answered within {deadline:?} (tried {addrs}); last error: {last}")]
    Unreachable {
        deadline: Duration,
        addrs: String,
        last: String,
    },
}

impl ClientError {
    pub fn rpc(&self) -> Option<&RpcError> {
        match self {
            Self::Rpc(e) => Some(e),
            Self::Unreachable { .. } => None,
        }
    }
}

/// Builds a channel to `addr` (`host:port`) with our limits and keepalives; connects lazily.
pub fn channel(addr: &str, opts: &ClientOptions) -> Result<Channel, RpcError> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| RpcError::InvalidArgument(format!("bad address {addr:?}: {e}")))?
        .connect_timeout(opts.connect_timeout)
        .timeout(opts.rpc_timeout)
        .tcp_nodelay(true)
        // Object chunks are MiBs: HTTP/2's 64 KiB default window would stall them on
        // round trips.
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_frame_size(1 << 20)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    Ok(ep.connect_lazy())
}

/// A node manager client for one node daemon.
pub fn node_manager(
    addr: &str,
    token: Option<AuthToken>,
    opts: &ClientOptions,
) -> Result<NmClient, RpcError> {
    Ok(
        NodeManagerClient::with_interceptor(channel(addr, opts)?, ClientAuth(token))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// An object manager client for one node (object transfer).
pub type OmClient = ObjectManagerClient<InterceptedService<Channel, ClientAuth>>;

/// An object manager client for the node whose object manager listens on `addr`.
pub fn object_manager(
    addr: &str,
    token: Option<AuthToken>,
    opts: &ClientOptions,
) -> Result<OmClient, RpcError> {
    Ok(
        ObjectManagerClient::with_interceptor(channel(addr, opts)?, ClientAuth(token))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
}

struct Inner {
    addrs: Vec<String>,
    leader: Option<String>,
    next: usize,
    channels: HashMap<String, Channel>,
}

/// Retrying client of the control plane. Cheap to clone; clones share the leader hint and
/// the connections.
#[derive(Clone)]
pub struct HeadClient {
    inner: Arc<Mutex<Inner>>,
    token: Option<AuthToken>,
    opts: ClientOptions,
}

impl std::fmt::Debug for HeadClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadClient")
            .field("addrs", &self.addresses())
            .finish()
    }
}

impl HeadClient {
    /// `addrs` are `host:port` of one or more heads.
    pub fn new(
        addrs: &[String],
        token: Option<AuthToken>,
        opts: ClientOptions,
    ) -> Result<Self, RpcError> {
        if addrs.is_empty() {
            return Err(RpcError::InvalidArgument("no head address given".into()));
        }
        for a in addrs {
            crate::ids::validate_address(a)
                .map_err(|e| RpcError::InvalidArgument(e.to_string()))?;
        }
        let inner = Inner {
            addrs: addrs.to_vec(),
            leader: None,
            next: 0,
            channels: HashMap::new(),
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(inner)),
            token,
            opts,
        })
    }

    /// Parses a comma-separated list of `host:port`.
    pub fn parse_addresses(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    pub fn with_options(&self, opts: ClientOptions) -> Self {
        Self {
            inner: self.inner.clone(),
            token: self.token.clone(),
            opts,
        }
    }

    pub fn token(&self) -> Option<&AuthToken> {
        self.token.as_ref()
    }

    pub fn addresses(&self) -> Vec<String> {
        self.lock().addrs.clone()
    }

    /// The head that last answered as leader, if any.
    pub fn leader_hint(&self) -> Option<String> {
        self.lock().leader.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another caller panicked mid-update of plain data.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn client_for(&self, addr: &str) -> Result<CpClient, RpcError> {
        let mut g = self.lock();
        let ch = match g.channels.get(addr) {
            Some(ch) => ch.clone(),
            None => {
                let ch = channel(addr, &self.opts)?;
                g.channels.insert(addr.to_string(), ch.clone());
                ch
            }
        };
        Ok(
            ControlPlaneClient::with_interceptor(ch, ClientAuth(self.token.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    fn pick(&self) -> String {
        let mut g = self.lock();
        if let Some(l) = &g.leader {
            return l.clone();
        }
        let i = g.next % g.addrs.len();
        g.next = g.next.wrapping_add(1);
        g.addrs[i].clone()
    }

    fn on_error(&self, addr: &str, e: &RpcError) {
        let mut g = self.lock();
        match e {
            RpcError::NotLeader { leader: Some(l) } if l != addr => {
                if !g.addrs.iter().any(|a| a == l) {
                    g.addrs.push(l.clone());
                }
                g.leader = Some(l.clone());
            }
            _ => {
                g.leader = None;
                // Drop the cached channel: a restarted head must be dialled afresh.
                g.channels.remove(addr);
            }
        }
    }

    /// Calls `f` against the leader (as far as known), retrying across heads until the
    /// deadline. `f` gets a fresh client handle for the chosen head on each attempt.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(CpClient) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let mut last;
        loop {
            let addr = self.pick();
            // Each attempt gets at most its own budget (whatever timeout the cached channel
            // was built with), so a head that stalls, such as one cut off by a partition,
            // costs one attempt and the call moves on to the next head.
            let budget = self
                .opts
                .rpc_timeout
                .min(self.opts.deadline.saturating_sub(start.elapsed()))
                .max(Duration::from_millis(1));
            let result = match self.client_for(&addr) {
                Ok(c) => match tokio::time::timeout(budget, f(c)).await {
                    Ok(r) => r.map_err(RpcError::from),
                    Err(_) => Err(RpcError::DeadlineExceeded(format!(
                        "{addr} did not answer within {budget:?}"
                    ))),
                },
                Err(e) => Err(e),
            };
            let e = match result {
                Ok(r) => {
                    self.lock().leader = Some(addr);
                    return Ok(r.into_inner());
                }
                Err(e) => e,
            };
            if !e.is_retryable() {
                return Err(ClientError::Rpc(e));
            }
            let redirected = matches!(&e, RpcError::NotLeader { leader: Some(l) } if *l != addr);
            self.on_error(&addr, &e);
            last = format!("{addr}: {e}");
            if start.elapsed() >= self.opts.deadline {
                return Err(ClientError::Unreachable {
                    deadline: self.opts.deadline,
                    addrs: self.addresses().join(","),
                    last,
                });
            }
            if !redirected {
                let left = self.opts.deadline.saturating_sub(start.elapsed());
                tokio::time::sleep(backoff.min(left)).await;
                backoff = (backoff * 2).min(self.opts.max_backoff);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_parsed_and_validated() {
        assert_eq!(
            HeadClient::parse_addresses(" a:1, b:2 ,,"),
            vec!["a:1", "b:2"]
        );
        assert!(HeadClient::new(&[], None, ClientOptions::default()).is_err());
        assert!(HeadClient::new(&["nope".into()], None, ClientOptions::default()).is_err());
    }

    #[tokio::test]
    async fn unreachable_heads_fail_within_the_deadline() {
        // Port 1 on loopback refuses connections.
        let opts = ClientOptions {
            deadline: Duration::from_millis(300),
            ..Default::default()
        };
        let c = HeadClient::new(&["127.0.0.1:1".into()], None, opts).unwrap();
        let t = std::time::Instant::now();
        let err = c
            .call(|mut c| async move { c.head_info(crate::pb::HeadInfoRequest {}).await })
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}
