//! The one error of the pod network: which step failed, on which interface, in which
//! network namespace, and why.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("pod network {}: {step}: {reason}", netns.display())]
pub struct NetworkError {
    /// The pod's network namespace as containerd named it.
    pub netns: PathBuf,
    /// What was being done, with the interface it was done to.
    pub step: String,
    pub reason: String,
}

/// Builds errors that name one network namespace.
#[derive(Clone, Debug)]
pub struct Context {
    pub netns: PathBuf,
}

impl Context {
    pub fn new(netns: &Path) -> Context {
        Context { netns: netns.to_path_buf() }
    }

    pub fn error(&self, step: impl Into<String>, reason: impl std::fmt::Display) -> NetworkError {
        NetworkError { netns: self.netns.clone(), step: step.into(), reason: reason.to_string() }
    }

    /// For `map_err`: the failure of `step`.
    pub fn at<E: std::fmt::Display>(&self, step: impl Into<String>) -> impl FnOnce(E) -> NetworkError + '_ {
        let step = step.into();
        move |e| self.error(step, e)
    }
}
