//! The cluster token. When a head or node is given one (`--auth-token-file` or
//! `RAYCTL_AUTH_TOKEN`), every gRPC call and every HTTP request must carry
//! `authorization: Bearer <token>`; calls without it get UNAUTHENTICATED (HTTP 401).

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// A cluster token. Never printed: `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(Arc<str>);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthToken(<{} chars>)", self.0.len())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read auth token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "auth token from {origin} is empty or has whitespace inside; expected one line of printable characters"
    )]
    Malformed { origin: String },
}

impl AuthToken {
    pub fn new(token: &str, origin: &str) -> Result<Self, TokenError> {
        let t = token.trim();
        if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenError::Malformed {
                origin: origin.to_string(),
            });
        }
        Ok(Self(t.into()))
    }

    /// The token from `file` if given, else from `RAYCTL_AUTH_TOKEN`, else none.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>, TokenError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                path: path.display().to_string(),
                source,
            })?;
            return Self::new(&text, &path.display().to_string()).map(Some);
        }
        match std::env::var(crate::AUTH_TOKEN_ENV) {
            Ok(v) if !v.is_empty() => Self::new(&v, crate::AUTH_TOKEN_ENV).map(Some),
            _ => Ok(None),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether an `authorization` header value carries this token. Constant time in the
    /// token's length so the comparison leaks nothing through timing.
    pub fn matches_header(&self, header: Option<&str>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let (a, b) = (given.as_bytes(), self.0.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Client side: adds the token to every request.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth(pub Option<AuthToken>);

impl Interceptor for ClientAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            let v: MetadataValue<_> = format!("Bearer {}", t.as_str())
                .parse()
                .map_err(|_| Status::internal("auth token is not a valid header value"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_matching() {
        let t = AuthToken::new(" s3cret\n", "test").unwrap();
        assert!(t.matches_header(Some("Bearer s3cret")));
        assert!(!t.matches_header(Some("Bearer s3cre")));
        assert!(!t.matches_header(Some("s3cret")));
        assert!(!t.matches_header(None));
        assert!(AuthToken::new("a b", "test").is_err());
        assert!(AuthToken::new("  ", "test").is_err());
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn client_interceptor_adds_the_token() {
        let t = AuthToken::new("tok", "test").unwrap();
        let req = ClientAuth(Some(t.clone())).call(Request::new(())).unwrap();
        let h = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        assert!(t.matches_header(h));
        let req = ClientAuth(None).call(Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }
}
