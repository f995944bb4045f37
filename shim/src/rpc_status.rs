//! Failures as containerd sees them: ttrpc statuses with a code it acts on (NotFound,
//! AlreadyExists, FailedPrecondition, ...) and a message that says what failed.

use crate::sandbox::agent::AgentError;
use crate::sandbox::SandboxError;
use crate::spec::SpecError;
use nestbox_protocols::ttrpc;

pub type RpcResult<T> = ttrpc::Result<T>;

pub fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

pub fn not_found(what: &str) -> ttrpc::Error {
    status(ttrpc::Code::NOT_FOUND, format!("{what} not found"))
}

pub fn internal(what: impl Into<String>) -> ttrpc::Error {
    status(ttrpc::Code::INTERNAL, what)
}

/// An agent failure: the agent's own status code where it gave one (NotFound,
/// Unimplemented, ...), otherwise Internal, with the message.
pub fn agent_error(context: &str, e: AgentError) -> ttrpc::Error {
    let code = e.status_code().unwrap_or(ttrpc::Code::INTERNAL);
    status(code, format!("{context}: {e}"))
}

pub fn sandbox_error(context: &str, e: SandboxError) -> ttrpc::Error {
    let code = match &e {
        SandboxError::Agent(a) => a.status_code().unwrap_or(ttrpc::Code::INTERNAL),
        SandboxError::BootTimeout { .. } => ttrpc::Code::DEADLINE_EXCEEDED,
        SandboxError::Exists { .. } => ttrpc::Code::ALREADY_EXISTS,
        _ => ttrpc::Code::INTERNAL,
    };
    status(code, format!("{context}: {e}"))
}

/// A spec containerd gave that cannot be read is the caller's mistake (InvalidArgument);
/// failing to share its files is ours (Internal).
pub fn spec_error(e: SpecError) -> ttrpc::Error {
    let code = match &e {
        SpecError::Read { .. }
        | SpecError::Parse { .. }
        | SpecError::NoRoot { .. }
        | SpecError::HostNamespaces { .. } => ttrpc::Code::INVALID_ARGUMENT,
        _ => ttrpc::Code::INTERNAL,
    };
    status(code, e.to_string())
}
