//! OOM events: one watcher thread per container sleeps on the kernel's notification for
//! its cgroup (no polling) and queues the container's id each time its OOM kill count
//! grows; GetOOMEvent takes them from the queue, and a shutdown ends its long poll.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use crate::cgroup::{Cgroup, OomSource};

/// Container ids in the order their OOM kills happened, until the agent shuts down.
#[derive(Default)]
pub struct OomQueue {
    events: Mutex<Events>,
    ready: Condvar,
}

#[derive(Default)]
struct Events {
    queue: VecDeque<String>,
    /// Set at shutdown: long polls end instead of holding the server's drain.
    closed: bool,
}

/// The answer of a long poll the agent's shutdown ended.
#[derive(Debug, thiserror::Error)]
#[error("the agent is shutting down: no more OOM events")]
pub struct ShuttingDown;

impl OomQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Events> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, container_id: &str) {
        self.lock().queue.push_back(container_id.to_string());
        self.ready.notify_one();
    }

    /// Blocks until an event is queued and takes it, or until [`OomQueue::close`]: a
    /// shutdown wakes every waiter at once (events still queued are handed out first).
    pub fn next_event(&self) -> Result<String, ShuttingDown> {
        let mut events = self.lock();
        loop {
            if let Some(id) = events.queue.pop_front() {
                return Ok(id);
            }
            if events.closed {
                return Err(ShuttingDown);
            }
            events = self.ready.wait(events).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The agent is shutting down: every [`OomQueue::next_event`], waiting or to come,
    /// returns [`ShuttingDown`] once the queue is empty.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }
}

/// How long after an OOM notification the kill count may take to grow.
const KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Stops its watcher thread when dropped (container removed).
pub struct OomWatcher {
    stop: EventFd,
}

impl Drop for OomWatcher {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
    }
}

/// The kernel's notification of a cgroup's memory events.
enum Notifier {
    /// cgroup v2: inotify IN_MODIFY on memory.events.
    Inotify(Inotify),
    /// cgroup v1: an eventfd registered for memory.oom_control in cgroup.event_control
    /// (the control file is kept open as the registration requires).
    EventFd(EventFd, #[allow(dead_code)] std::fs::File),
}

impl Notifier {
    fn new(source: &OomSource) -> io::Result<Self> {
        match source {
            OomSource::V2Events(file) => {
                let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
                inotify.add_watch(file, AddWatchFlags::IN_MODIFY)?;
                Ok(Notifier::Inotify(inotify))
            }
            OomSource::V1Control(dir) => {
                let efd = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?;
                let control = std::fs::File::open(dir.join("memory.oom_control"))?;
                let registration = format!("{} {}", efd.as_fd().as_raw_fd(), control.as_raw_fd());
                std::fs::write(dir.join("cgroup.event_control"), registration)?;
                Ok(Notifier::EventFd(efd, control))
            }
        }
    }

    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Notifier::Inotify(i) => i.as_fd(),
            Notifier::EventFd(e, _) => e.as_fd(),
        }
    }

    /// Consumes the pending notification.
    fn drain(&self) {
        match self {
            Notifier::Inotify(i) => {
                let _ = i.read_events();
            }
            Notifier::EventFd(e, _) => {
                let _ = e.read();
            }
        }
    }
}

/// Starts watching `cgroup` for OOM kills of container `id`.
pub fn watch(id: &str, cgroup: &Cgroup, queue: Arc<OomQueue>) -> io::Result<OomWatcher> {
    let source = cgroup.oom_source().ok_or_else(|| io::Error::other("no memory controller to watch"))?;
    let notifier = Notifier::new(&source)?;
    let stop = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?;
    let stop_fd: OwnedFd = stop.as_fd().try_clone_to_owned()?;
    let id = id.to_string();
    let cgroup = cgroup.clone();
    let mut seen = cgroup.oom_kills();
    std::thread::Builder::new().name(format!("oom-{id}")).spawn(move || loop {
        let mut fds = [PollFd::new(notifier.fd(), PollFlags::POLLIN), PollFd::new(stop_fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
            Ok(_) => {}
        }
        let fired = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        if fired(&fds[1]) {
            return;
        }
        if fired(&fds[0]) {
            notifier.drain();
            if matches!(notifier, Notifier::EventFd(..)) && !cgroup.exists() {
                return; // v1 also signals the eventfd when the cgroup is removed
            }
            // v1 notifies when the cgroup goes out of memory, before the OOM killer has
            // picked its victim; v2 also for "oom" and "max" events: the kill count is
            // what tells a kill happened, so give it a moment to move.
            let start = std::time::Instant::now();
            loop {
                let kills = cgroup.oom_kills();
                if kills > seen {
                    seen = kills;
                    queue.push(&id);
                    break;
                }
                if start.elapsed() > KILL_GRACE {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    })?;
    Ok(OomWatcher { stop })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A long poll in flight and one that comes later both end when the queue closes;
    /// an event queued before the close is still handed out first.
    #[test]
    fn close_ends_the_long_poll_at_once() {
        let queue = Arc::new(OomQueue::default());
        let (tx, rx) = mpsc::channel();
        let waiting = queue.clone();
        std::thread::spawn(move || {
            let _ = tx.send(waiting.next_event().map_err(|e| e.to_string()));
        });
        // Not answered while nothing happened (the poll is really waiting).
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "answered without an event");
        queue.close();
        // The bound only catches a poll that never wakes; a close answers in microseconds.
        let answer = rx.recv_timeout(Duration::from_secs(10)).expect("the poll did not wake at close");
        assert_eq!(answer, Err("the agent is shutting down: no more OOM events".to_string()));

        let queue = OomQueue::default();
        queue.push("c1");
        queue.close();
        assert_eq!(queue.next_event().ok().as_deref(), Some("c1"));
        assert!(queue.next_event().is_err());
    }
}
