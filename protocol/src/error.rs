//! The one mapping between our RPC errors and gRPC status codes. Every server returns
//! `RpcError::into()` and every client classifies with `RpcError::from(Status)`, so whether an
//! error is retryable is decided here and nowhere else.
//!
//! | error | gRPC code | retry? |
//! |---|---|---|
//! | `NotLeader` | FAILED_PRECONDITION + `x-rayctl-error: not-leader`, `x-leader-address` | yes, at the leader |
//! | `Fenced` | ABORTED + `x-rayctl-error: fenced` | re-register first |
//! | `Unavailable` | UNAVAILABLE | yes, elsewhere |
//! | `NotFound`, `InvalidArgument`, `AlreadyExists`, `ResourceExhausted`, `Unauthenticated` | same name | no |

/// Metadata key naming which of our errors a status carries.
pub const ERROR_KIND_KEY: &str = "x-rayctl-error";
/// Metadata key carrying the leader's address with a `NotLeader` error.
pub const LEADER_ADDRESS_KEY: &str = "x-leader-address";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    #[error("not the leader (leader: {})", leader.as_deref().unwrap_or("unknown"))]
    NotLeader { leader: Option<String> },
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RpcError {
    /// The message without this variant's prefix (a message that crossed the wire already
    /// carries the prefix of the error that made it).
    pub fn detail(&self) -> String {
        match self {
            Self::NotLeader { .. } => self.to_string(),
            Self::Fenced(m)
            | Self::NotFound(m)
            | Self::InvalidArgument(m)
            | Self::AlreadyExists(m)
            | Self::ResourceExhausted(m)
            | Self::Unauthenticated(m)
            | Self::Unavailable(m)
            | Self::DeadlineExceeded(m)
            | Self::FailedPrecondition(m)
            | Self::Internal(m) => m.clone(),
        }
    }

    /// Whether the same request may succeed when sent again (possibly to another head).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::NotLeader { .. } | Self::Unavailable(_) | Self::DeadlineExceeded(_)
        )
    }
}

#[cfg(feature = "grpc")]
mod grpc {
    use super::*;
    use tonic::{Code, Status};

    impl From<RpcError> for Status {
        fn from(e: RpcError) -> Status {
            // The code carries the kind; the message only the detail, so the prefix of the
            // kind is not repeated when the error is rebuilt on the other side.
            let msg = e.detail();
            let (code, kind) = match &e {
                RpcError::NotLeader { .. } => (Code::FailedPrecondition, Some("not-leader")),
                RpcError::Fenced(_) => (Code::Aborted, Some("fenced")),
                RpcError::NotFound(_) => (Code::NotFound, None),
                RpcError::InvalidArgument(_) => (Code::InvalidArgument, None),
                RpcError::AlreadyExists(_) => (Code::AlreadyExists, None),
                RpcError::ResourceExhausted(_) => (Code::ResourceExhausted, None),
                RpcError::Unauthenticated(_) => (Code::Unauthenticated, None),
                RpcError::Unavailable(_) => (Code::Unavailable, None),
                RpcError::DeadlineExceeded(_) => (Code::DeadlineExceeded, None),
                RpcError::FailedPrecondition(_) => (Code::FailedPrecondition, None),
                RpcError::Internal(_) => (Code::Internal, None),
            };
            let mut status = Status::new(code, msg);
            if let Some(kind) = kind {
                status.metadata_mut().insert(
                    ERROR_KIND_KEY,
                    tonic::metadata::MetadataValue::from_static(kind),
                );
            }
            if let RpcError::NotLeader { leader: Some(addr) } = &e
                && let Ok(v) = addr.parse()
            {
                status.metadata_mut().insert(LEADER_ADDRESS_KEY, v);
            }
            status
        }
    }

    impl From<Status> for RpcError {
        fn from(s: Status) -> RpcError {
            let kind = s
                .metadata()
                .get(ERROR_KIND_KEY)
                .and_then(|v| v.to_str().ok());
            let msg = s.message().to_string();
            match (s.code(), kind) {
                (_, Some("not-leader")) => RpcError::NotLeader {
                    leader: s
                        .metadata()
                        .get(LEADER_ADDRESS_KEY)
                        .and_then(|v| v.to_str().ok())
                        .filter(|a| !a.is_empty())
                        .map(str::to_string),
                },
                (_, Some("fenced")) => RpcError::Fenced(msg),
                (Code::NotFound, _) => RpcError::NotFound(msg),
                (Code::InvalidArgument, _) | (Code::OutOfRange, _) => {
                    RpcError::InvalidArgument(msg)
                }
                (Code::AlreadyExists, _) => RpcError::AlreadyExists(msg),
                (Code::ResourceExhausted, _) => RpcError::ResourceExhausted(msg),
                (Code::Unauthenticated, _) | (Code::PermissionDenied, _) => {
                    RpcError::Unauthenticated(msg)
                }
                // Transport failures (connection refused, reset, h2 errors) surface as
                // UNAVAILABLE/UNKNOWN/CANCELLED from tonic: all mean "try another head".
                (Code::Unavailable, _) | (Code::Unknown, _) | (Code::Cancelled, _) => {
                    RpcError::Unavailable(msg)
                }
                (Code::DeadlineExceeded, _) => RpcError::DeadlineExceeded(msg),
                (Code::FailedPrecondition, _) | (Code::Aborted, _) => {
                    RpcError::FailedPrecondition(msg)
                }
                _ => RpcError::Internal(format!("{:?}: {msg}", s.code())),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn every_error_survives_the_wire() {
            let cases = [
                RpcError::NotLeader {
                    leader: Some("127.0.0.1:7000".into()),
                },
                RpcError::NotLeader { leader: None },
                RpcError::Fenced("x".into()),
                RpcError::NotFound("x".into()),
                RpcError::InvalidArgument("x".into()),
                RpcError::AlreadyExists("x".into()),
                RpcError::ResourceExhausted("x".into()),
                RpcError::Unauthenticated("x".into()),
                RpcError::Unavailable("x".into()),
                RpcError::DeadlineExceeded("x".into()),
            ];
            for e in cases {
                let back = RpcError::from(Status::from(e.clone()));
                match (&e, &back) {
                    (RpcError::NotLeader { leader: a }, RpcError::NotLeader { leader: b }) => {
                        assert_eq!(a, b)
                    }
                    _ => assert_eq!(
                        std::mem::discriminant(&e),
                        std::mem::discriminant(&back),
                        "{e:?} -> {back:?}"
                    ),
                }
            }
        }
    }
}
