//! The kinds of VMM thread and the errors of their filters.

use std::cell::Cell;

/// The kinds of VMM thread, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: builds the VM, then waits for its end and serves control
    /// requests (pause, snapshot files, shutdown).
    Main,
    /// A vCPU: KVM_RUN and the device registers it traps into.
    Vcpu,
    /// A device's worker (vsock, net, virtio-fs): queues, sockets, the tap, host files.
    Device,
    /// Starts device threads for the vCPUs.
    Launcher,
    /// The control API socket.
    Api,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] =
        [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Device, ThreadKind::Launcher, ThreadKind::Api];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Device => "device",
            ThreadKind::Launcher => "launcher",
            ThreadKind::Api => "api",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} seccomp filter: {reason}")]
    Build { kind: &'static str, reason: String },
    #[error("installing the {kind} seccomp filter: {reason}")]
    Install { kind: &'static str, reason: String },
    #[error("starting the device launcher thread: {0}")]
    Launcher(std::io::Error),
}

thread_local! {
    /// This thread's kind, for the diagnostic handler.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Records the calling thread's kind (for the diagnostic handler).
pub fn set_current(kind: ThreadKind) {
    KIND.with(|k| k.set(Some(kind)));
}

/// The current thread's kind, if it installed a filter.
pub fn current() -> Option<ThreadKind> {
    KIND.with(Cell::get)
}
