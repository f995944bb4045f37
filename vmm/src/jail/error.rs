//! The jail's errors: each names what it was doing.

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    // The cause is in the message, not chained: callers print chains too.
    #[error("jail: {what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("jail: {what}: {errno}")]
    Sys { what: String, errno: nix::Error },
    #[error("jail: capabilities: {0}")]
    Caps(#[from] caps::errors::CapsError),
    #[error("jail: {0}")]
    Invalid(String),
}

pub fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let what = what.into();
    move |error| JailError::Io { what, error }
}

pub fn sys_error(what: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let what = what.into();
    move |errno| JailError::Sys { what, errno }
}
