//! virtio-vsock with a Unix-socket backend ("hybrid vsock", the Firecracker and Cloud
//! Hypervisor contract), entirely in the VMM: no vhost-vsock is needed on the host.
//!
//! - The host connects to the VM's socket (`vsock.sock`), writes `CONNECT <port>\n` and,
//!   once the guest accepted, reads `OK <host-port>\n`; from then on the stream is the
//!   connection to the guest's listener on `<port>`.
//! - A guest connection to CID 2 port P is connected to the Unix socket `vsock.sock_P`.
//!
//! [`device`] is the virtio device (queues, config space), [`connection`] the state of
//! one connection (flow control, shutdown), [`muxer`] the event loop that moves packets
//! between the queues and the Unix sockets.

pub mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;

pub use device::VsockDevice;

/// The host's CID: the address guest connections to the host use.
pub const HOST_CID: u64 = 2;
/// The guest's CID unless configured otherwise (the first one not reserved).
pub const DEFAULT_GUEST_CID: u64 = 3;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const QUEUE_SIZE: u16 = 256;
