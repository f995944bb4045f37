//! The launcher thread: starts device threads on behalf of vCPU threads (see the module
//! above for why), so a device thread inherits the launcher's filter, not a vCPU's.

use super::kind::SeccompError;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

static JOBS: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

/// Starts the launcher, which first runs `init` (installs its filter).
pub(super) fn start(init: fn()) -> Result<(), SeccompError> {
    let (tx, rx) = channel::<Job>();
    std::thread::Builder::new()
        .name("launcher".into())
        .spawn(move || {
            init();
            for job in rx {
                job();
            }
        })
        .map_err(SeccompError::Launcher)?;
    let _ = JOBS.set(Mutex::new(tx));
    Ok(())
}

/// Runs `job` on the launcher thread (if there is one, else here) and returns its result.
pub fn launch<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> T {
    let Some(jobs) = JOBS.get() else { return job() };
    let (reply_tx, reply_rx) = channel();
    let wrapped: Job = Box::new(move || {
        let _ = reply_tx.send(job());
    });
    let sent = jobs.lock().unwrap_or_else(|e| e.into_inner()).send(wrapped);
    match sent {
        Ok(()) => match reply_rx.recv() {
            Ok(value) => value,
            // The launcher only goes away with the process.
            Err(_) => std::process::exit(1),
        },
        // Unreachable while the process runs; never run the job on this thread instead.
        Err(_) => std::process::exit(1),
    }
}
