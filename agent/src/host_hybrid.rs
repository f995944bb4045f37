//! Host mode standing in for a VM, for the shim's test-only `host-agent` build (which
//! measures everything but the guest kernel): a Unix socket that speaks the VMM's side of
//! hybrid vsock (`CONNECT <port>\n`, answered `OK <host-port>\n`, then the stream's bytes)
//! and relays each connection to the host-mode socket serving that port. (The share is
//! `Env::share`: the shim makes it a shared mount, so what it mounts there later reaches
//! the agent's mount namespace, as virtio-fs shows it to a guest.)
//!
//! The relay copies bytes between two Unix sockets, as the VMM's vsock muxer copies them
//! between the host socket and the guest's queues; it is the VMM's part of a stream, not
//! an extra one.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;
use nestbox_protocols::{AGENT_PORT, IO_PORT, PORT_FORWARD_PORT};

/// The longest `CONNECT <port>\n` line a client may send (as the VMM's muxer allows).
const MAX_CONNECT_LINE: usize = 32;

/// The host-mode sockets behind the guest ports.
#[derive(Clone, Debug)]
pub struct Ports {
    pub api: PathBuf,
    pub io: PathBuf,
    pub forward: PathBuf,
}

impl Ports {
    fn socket(&self, port: u32) -> Option<&Path> {
        match port {
            AGENT_PORT => Some(&self.api),
            IO_PORT => Some(&self.io),
            PORT_FORWARD_PORT => Some(&self.forward),
            _ => None,
        }
    }
}

/// Binds `path` and serves hybrid vsock connections on a thread of their own.
pub fn serve(path: &Path, ports: Ports) -> io::Result<()> {
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new().name("hybrid-vsock".into()).spawn(move || {
        // Host-side ports as the VMM numbers them: from 2^30 up, one per connection.
        let next_port = AtomicU32::new(1 << 30);
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let ports = ports.clone();
            let host_port = next_port.fetch_add(1, Ordering::Relaxed);
            let spawned = std::thread::Builder::new().name("hybrid-conn".into()).spawn(move || {
                if let Err(e) = relay(conn, &ports, host_port) {
                    eprintln!("nestbox-agent: hybrid vsock connection: {e:#}");
                }
            });
            if let Err(e) = spawned {
                eprintln!("nestbox-agent: hybrid vsock: no thread for a connection: {e}");
            }
        }
    })?;
    Ok(())
}

/// Reads the `CONNECT` line, connects to the port's socket, answers `OK` and copies both
/// ways until each side has closed. A port nobody serves is closed without an answer, as
/// the VMM does when nothing listens on the guest port.
fn relay(mut client: UnixStream, ports: &Ports, host_port: u32) -> anyhow::Result<()> {
    let line = read_line(&mut client)?;
    let port = parse_connect(&line)?;
    let Some(socket) = ports.socket(port) else { anyhow::bail!("CONNECT {port}: nothing serves that port") };
    let service = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
    client.write_all(format!("OK {host_port}\n").as_bytes()).context("answering CONNECT")?;
    let (mut from_client, mut to_service) = (client.try_clone()?, service.try_clone()?);
    let upstream = std::thread::Builder::new().name("hybrid-up".into()).spawn(move || {
        let _ = io::copy(&mut from_client, &mut to_service);
        let _ = to_service.shutdown(Shutdown::Write);
    })?;
    let (mut from_service, mut to_client) = (service, client);
    let _ = io::copy(&mut from_service, &mut to_client);
    let _ = to_client.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

/// One byte at a time up to the newline, so no byte of the stream after it is consumed.
fn read_line(conn: &mut UnixStream) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if conn.read(&mut byte).context("reading the CONNECT line")? == 0 {
            anyhow::bail!("closed before a CONNECT line");
        }
        if byte[0] == b'\n' {
            return String::from_utf8(line).context("CONNECT line is not UTF-8");
        }
        line.push(byte[0]);
        if line.len() > MAX_CONNECT_LINE {
            anyhow::bail!("CONNECT line longer than {MAX_CONNECT_LINE} bytes");
        }
    }
}

fn parse_connect(line: &str) -> anyhow::Result<u32> {
    let port = line.strip_prefix("CONNECT ").with_context(|| format!("{line:?} is not \"CONNECT <port>\""))?;
    port.trim().parse().with_context(|| format!("bad port in {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect("CONNECT 1024").expect("valid"), 1024);
        for bad in ["CONNECT", "CONNECT x", "connect 1024", "OK 1", "CONNECT 99999999999"] {
            assert!(parse_connect(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn relays_a_known_port_and_closes_an_unknown_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let api = dir.path().join("api.sock");
        let service = UnixListener::bind(&api).expect("binding the service");
        let ports = Ports { api, io: dir.path().join("none.io"), forward: dir.path().join("none.pf") };
        let hybrid = dir.path().join("vsock.sock");
        serve(&hybrid, ports).expect("serving");

        let mut client = UnixStream::connect(&hybrid).expect("connecting");
        client.write_all(b"CONNECT 1024\nhello").expect("writing");
        let (mut served, _) = service.accept().expect("accepting");
        let mut reply = [0u8; 14];
        client.read_exact(&mut reply).expect("reading OK");
        assert_eq!(&reply, b"OK 1073741824\n");
        let mut hello = [0u8; 5];
        served.read_exact(&mut hello).expect("reading what followed CONNECT");
        assert_eq!(&hello, b"hello");
        served.write_all(b"world").expect("answering");
        drop(served);
        let mut back = Vec::new();
        client.read_to_end(&mut back).expect("reading until the service closed");
        assert_eq!(back, b"world");

        let mut unknown = UnixStream::connect(&hybrid).expect("connecting");
        unknown.write_all(b"CONNECT 5\n").expect("writing");
        let mut answer = Vec::new();
        unknown.read_to_end(&mut answer).expect("reading");
        assert!(answer.is_empty(), "{answer:?}");
    }
}
