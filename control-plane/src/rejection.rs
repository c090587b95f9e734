//! Why a committed command changed nothing: the one error type of `state::apply` and of the
//! tables it delegates to (`instances`).

use serde::{Deserialize, Serialize};

/// Why a committed command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("{kind} {id} not found")]
    NotFound { kind: String, id: String },
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: String, id: String },
    #[error("{kind} {id} cannot go from {from} to {to}")]
    InvalidTransition {
        kind: String,
        id: String,
        from: String,
        to: String,
    },
    #[error(
        "node {node_id} incarnation {given} is fenced (current incarnation {current}, {state})"
    )]
    Fenced {
        node_id: String,
        given: u64,
        current: u64,
        state: String,
    },
    #[error("{0}")]
    Invalid(String),
}
