//! Task events to containerd. containerd expects them in call order (TaskCreate before
//! TaskStart before TaskExit, ...): one thread publishes every event in the order it was
//! queued, so a slow publish never blocks a task call and never reorders events.

use containerd_shim::event::Event;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::publisher::RemotePublisher;
use nestbox_protocols::ttrpc;
use std::sync::{mpsc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

type QueuedEvent = Box<dyn Event + Send>;

/// The queue to the publisher thread.
pub struct EventPublisher {
    queue: Mutex<mpsc::Sender<QueuedEvent>>,
}

impl EventPublisher {
    /// Starts the publisher thread for events of containerd namespace `namespace`.
    pub fn start(publisher: RemotePublisher, namespace: &str) -> EventPublisher {
        let (tx, rx) = mpsc::channel::<QueuedEvent>();
        let namespace = namespace.to_string();
        let spawned = std::thread::Builder::new().name("events".into()).spawn(move || {
            for event in rx {
                let topic = event.topic();
                let event: Box<dyn MessageDyn> = event;
                if let Err(e) = publisher.publish(ttrpc::context::with_timeout(0), &topic, &namespace, event) {
                    log::error!("publishing {topic}: {e}");
                }
            }
        });
        if let Err(e) = spawned {
            log::error!("no event publisher thread, events are lost: {e}");
        }
        EventPublisher { queue: Mutex::new(tx) }
    }

    /// Queues an event behind every event queued before it.
    pub fn publish(&self, event: impl Event + Send + 'static) {
        // Sending fails only when the thread is gone, which start() already logged.
        let _ = self.queue.lock().unwrap_or_else(|e| e.into_inner()).send(Box::new(event));
    }
}

/// Now, as containerd's messages carry times.
pub fn now() -> Timestamp {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: since.as_secs() as i64, nanos: since.subsec_nanos() as i32, ..Default::default() }
}
