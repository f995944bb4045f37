//! The agent API's errors, each mapped to the ttrpc status code a shim can act on.

use nestbox_protocols::ttrpc;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request itself is wrong (bad id, spec, rootfs, signal): retrying will not help.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// Valid, but not in the current state (exec into a stopped container, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Internal(String),
    /// The agent is shutting down: the call cannot be served any more.
    #[error("{0}")]
    Unavailable(String),
}

/// An [`AgentError::InvalidArgument`] saying what is wrong with the request.
pub fn invalid(msg: impl Into<String>) -> AgentError {
    AgentError::InvalidArgument(msg.into())
}

impl AgentError {
    /// An internal error with what was being done.
    pub fn internal(what: &str, err: impl std::fmt::Display) -> Self {
        AgentError::Internal(format!("{what}: {err}"))
    }

    fn code(&self) -> ttrpc::Code {
        match self {
            AgentError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            AgentError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            AgentError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            AgentError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            AgentError::DeadlineExceeded(_) => ttrpc::Code::DEADLINE_EXCEEDED,
            AgentError::Internal(_) => ttrpc::Code::INTERNAL,
            AgentError::Unavailable(_) => ttrpc::Code::UNAVAILABLE,
        }
    }
}

impl From<AgentError> for ttrpc::Error {
    fn from(e: AgentError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}
