//! Guest-side vsock test services (kernel parameter `nestbox.vsock_test`), the far end of
//! the host tests of the VMM's vsock device. Ports and protocols: see
//! `nestbox_protocols::vsock_test`.
//!
//! Every service takes any number of concurrent connections, one thread each: the tests
//! open many at once to exercise the device's connection multiplexing. The services are
//! written over `Read + Write` so they are unit-tested on Unix sockets on the host.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use nestbox_protocols::vsock_test::{
    fill_pattern, CLOSE_PORT, ECHO_PORT, FLOOD_PORT, GREETING, HOST_FLOOD_PORT, HOST_PORT, MAX_FLOOD, MAX_REQUEST_LINE,
    SINK_PORT, SOURCE_PORT,
};
use sha2::{Digest, Sha256};

use crate::vsock::{VsockListener, VsockStream, CID_ANY, CID_HOST};

const BUF_SIZE: usize = 64 * 1024;

/// How long the guest keeps trying to reach the host's port 1100: the host test may start
/// listening only after it has seen the guest boot, which takes minutes on nested KVM.
const HOST_CONNECT_PATIENCE: Duration = Duration::from_secs(600);
const HOST_CONNECT_RETRY: Duration = Duration::from_millis(500);

/// A connection handler: runs on its own thread, returns when the connection is done.
type Handler<S> = fn(S) -> io::Result<()>;

/// Something to accept connections from: vsock in the guest, Unix sockets in unit tests.
pub trait Listener: Send + 'static {
    type Stream: Read + Write + Send + 'static;
    fn accept(&self) -> io::Result<Self::Stream>;
}

impl Listener for VsockListener {
    type Stream = VsockStream;
    fn accept(&self) -> io::Result<VsockStream> {
        VsockListener::accept(self)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    fn accept(&self) -> io::Result<UnixStream> {
        UnixListener::accept(self).map(|(stream, _)| stream)
    }
}

/// Starts every test service on its vsock port, and the outgoing connection to the host.
/// Returns once all listeners are bound (so the host can connect from then on).
pub fn start() -> io::Result<()> {
    let services: [(u32, &str, Handler<VsockStream>); 5] = [
        (ECHO_PORT, "echo", echo),
        (SINK_PORT, "sink", sink),
        (SOURCE_PORT, "source", source),
        (CLOSE_PORT, "close", close),
        (FLOOD_PORT, "flood", flood_host),
    ];
    for (port, name, handler) in services {
        let listener = VsockListener::bind(CID_ANY, port)
            .map_err(|e| io::Error::new(e.kind(), format!("binding vsock port {port} ({name}): {e}")))?;
        spawn_named(format!("vsock-test-{name}"), move || serve(name, listener, handler))?;
    }
    spawn_named("vsock-test-to-host".into(), || {
        match connect_with_retry(|| VsockStream::connect(CID_HOST, HOST_PORT), HOST_CONNECT_PATIENCE) {
            Ok(stream) => {
                if let Err(e) = greet_and_echo(stream) {
                    eprintln!("nestbox-agent: vsock test: host port {HOST_PORT}: {e}");
                }
            }
            Err(e) => eprintln!("nestbox-agent: vsock test: no connection to host port {HOST_PORT}: {e}"),
        }
    })?;
    println!(
        "nestbox-agent: vsock test services on ports {ECHO_PORT}-{FLOOD_PORT}, connecting to host port {HOST_PORT}"
    );
    Ok(())
}

fn spawn_named(name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new().name(name).spawn(f).map(drop)
}

/// Accepts forever, one thread per connection.
pub fn serve<L: Listener>(name: &'static str, listener: L, handler: Handler<L::Stream>) {
    loop {
        match listener.accept() {
            Ok(stream) => {
                let spawned = spawn_named(format!("vsock-test-{name}-conn"), move || {
                    if let Err(e) = handler(stream) {
                        // Peers that go away mid-stream are part of what the tests do.
                        if !matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) {
                            eprintln!("nestbox-agent: vsock test {name}: {e}");
                        }
                    }
                });
                if let Err(e) = spawned {
                    eprintln!("nestbox-agent: vsock test {name}: no thread for a connection: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors or memory: pause rather than spin, then go on serving.
                eprintln!("nestbox-agent: vsock test {name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Reads into `buf`, retrying on EINTR; 0 means end of stream.
fn read_some(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Port 1025: every byte back, until the peer's end of stream; then close.
pub fn echo<S: Read + Write>(mut stream: S) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = read_some(&mut stream, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Port 1026: count and hash everything until end of stream, answer
/// `<byte count> <sha256 hex>\n`, close.
pub fn sink<S: Read + Write>(mut stream: S) -> io::Result<()> {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    loop {
        let n = read_some(&mut stream, &mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    stream.write_all(format!("{total} {hex}\n").as_bytes())
}

/// Port 1027: read `<N>\n`, send N bytes of the shared test pattern, close. A bad request
/// is closed without data (and logged): any bytes sent would read as pattern.
pub fn source<S: Read + Write>(mut stream: S) -> io::Result<()> {
    let line = read_request_line(&mut stream)?;
    let count: u64 = std::str::from_utf8(&line)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| bad_request(format!("source: expected \"<N>\\n\", got {:?}", String::from_utf8_lossy(&line))))?;
    let mut buf = vec![0u8; BUF_SIZE];
    let mut sent: u64 = 0;
    while sent < count {
        let n = (count - sent).min(BUF_SIZE as u64) as usize;
        fill_pattern(sent, &mut buf[..n]);
        stream.write_all(&buf[..n])?;
        sent += n as u64;
    }
    Ok(())
}

/// One line, read a byte at a time so nothing after the newline is consumed.
fn read_request_line(stream: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if read_some(stream, &mut byte)? == 0 {
            return Err(bad_request(format!("end of stream before a newline after {line:?}")));
        }
        if byte[0] == b'\n' {
            return Ok(line);
        }
        if line.len() >= MAX_REQUEST_LINE {
            return Err(bad_request(format!("request line longer than {MAX_REQUEST_LINE} bytes")));
        }
        line.push(byte[0]);
    }
}

fn bad_request(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Port 1028: close at once, from the guest's side.
pub fn close<S>(stream: S) -> io::Result<()> {
    drop(stream);
    Ok(())
}

/// The flood service in the guest: connections to the host's [`HOST_FLOOD_PORT`].
fn flood_host(stream: VsockStream) -> io::Result<()> {
    flood(stream, || VsockStream::connect(CID_HOST, HOST_FLOOD_PORT))
}

/// Reads `<N>\n`, makes `N` connections with `connect` and holds those it got, answers
/// `<opened> <refused>\n`, and closes them all at the requester's end of stream. The
/// descriptor limit is raised to its hard limit first, so the guest can hold more
/// connections than the VMM accepts.
pub fn flood<S: Read + Write, C>(mut stream: S, mut connect: impl FnMut() -> io::Result<C>) -> io::Result<()> {
    let line = read_request_line(&mut stream)?;
    let text = String::from_utf8_lossy(&line);
    let count: usize = text.trim().parse().map_err(|_| bad_request(format!("not a count: {text:?}")))?;
    if count > MAX_FLOOD {
        return Err(bad_request(format!("{count} connections asked, at most {MAX_FLOOD}")));
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit with a valid rlimit on our stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    let (mut held, mut refused) = (Vec::new(), 0usize);
    for _ in 0..count {
        match connect() {
            Ok(conn) => held.push(conn),
            Err(_) => refused += 1,
        }
    }
    stream.write_all(format!("{} {refused}\n", held.len()).as_bytes())?;
    let mut buf = [0u8; 64];
    while read_some(&mut stream, &mut buf)? > 0 {}
    drop(held);
    Ok(())
}

/// The guest-initiated connection: greet, then echo until the host's end of stream.
pub fn greet_and_echo<S: Read + Write>(mut stream: S) -> io::Result<()> {
    stream.write_all(GREETING)?;
    echo(stream)
}

/// Calls `connect` until it succeeds or `patience` has passed (the host side may not be
/// listening yet: the VMM then refuses or resets the connection).
pub fn connect_with_retry<S>(mut connect: impl FnMut() -> io::Result<S>, patience: Duration) -> io::Result<S> {
    let start = Instant::now();
    loop {
        match connect() {
            Ok(stream) => return Ok(stream),
            Err(e) if start.elapsed() >= patience => {
                return Err(io::Error::new(e.kind(), format!("gave up after {:?}: {e}", start.elapsed())))
            }
            Err(_) => std::thread::sleep(HOST_CONNECT_RETRY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;
    use std::path::Path;
    use std::thread;

    fn start_service(dir: &Path, name: &'static str, handler: Handler<UnixStream>) -> std::path::PathBuf {
        let path = dir.join(format!("{name}.sock"));
        let listener = UnixListener::bind(&path).expect("binding");
        thread::spawn(move || serve(name, listener, handler));
        path
    }

    fn sha256_hex(data: &[u8]) -> String {
        Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn echo_returns_everything_then_closes_on_eof() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = start_service(dir.path(), "echo", echo);
        // Many connections at once, each with its own data.
        let clients: Vec<_> = (0..16u8)
            .map(|i| {
                let path = path.clone();
                thread::spawn(move || {
                    let mut stream = UnixStream::connect(&path).expect("connecting");
                    let data = vec![i; 200_000 + usize::from(i)];
                    let writer = {
                        let mut stream = stream.try_clone().expect("cloning");
                        let data = data.clone();
                        thread::spawn(move || {
                            stream.write_all(&data).expect("writing");
                            stream.shutdown(Shutdown::Write).expect("half-closing");
                        })
                    };
                    let mut back = Vec::new();
                    stream.read_to_end(&mut back).expect("reading until the service closes");
                    writer.join().expect("writer");
                    assert_eq!(back, data);
                })
            })
            .collect();
        for c in clients {
            c.join().expect("client");
        }
    }

    #[test]
    fn sink_answers_count_and_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = start_service(dir.path(), "sink", sink);
        for size in [0usize, 1, 65536, 1_000_003] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let mut stream = UnixStream::connect(&path).expect("connecting");
            stream.write_all(&data).expect("writing");
            stream.shutdown(Shutdown::Write).expect("half-closing");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).expect("reading the answer");
            assert_eq!(answer, format!("{size} {}\n", sha256_hex(&data)));
        }
    }

    #[test]
    fn source_sends_the_shared_pattern() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = start_service(dir.path(), "source", source);
        for count in [0u64, 1, 100_000, 300_001] {
            let mut stream = UnixStream::connect(&path).expect("connecting");
            stream.write_all(format!("{count}\n").as_bytes()).expect("asking");
            let mut got = Vec::new();
            stream.read_to_end(&mut got).expect("reading");
            let mut want = vec![0u8; count as usize];
            fill_pattern(0, &mut want);
            assert!(got == want, "{count} bytes asked, {} received or different", got.len());
        }
        // A bad request is closed without data.
        let mut stream = UnixStream::connect(&path).expect("connecting");
        stream.write_all(b"lots\n").expect("asking");
        let mut got = Vec::new();
        stream.read_to_end(&mut got).expect("reading");
        assert!(got.is_empty());
    }

    #[test]
    fn close_service_closes_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = start_service(dir.path(), "close", close);
        for _ in 0..8 {
            let mut stream = UnixStream::connect(&path).expect("connecting");
            let mut got = Vec::new();
            stream.read_to_end(&mut got).expect("end of stream, not an error");
            assert!(got.is_empty());
        }
    }

    #[test]
    fn guest_initiated_connection_greets_then_echoes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.sock");
        // The host's listener appears late: the guest must keep trying.
        let host = {
            let path = path.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(1200));
                let listener = UnixListener::bind(&path).expect("binding");
                let (mut stream, _) = listener.accept().expect("accepting");
                let mut greeting = vec![0u8; GREETING.len()];
                stream.read_exact(&mut greeting).expect("reading the greeting");
                assert_eq!(greeting, GREETING);
                stream.write_all(b"from the host").expect("writing");
                stream.shutdown(Shutdown::Write).expect("half-closing");
                let mut back = Vec::new();
                stream.read_to_end(&mut back).expect("reading the echo");
                assert_eq!(back, b"from the host");
            })
        };
        let stream =
            connect_with_retry(|| UnixStream::connect(&path), Duration::from_secs(30)).expect("eventually connects");
        greet_and_echo(stream).expect("greeting and echoing");
        host.join().expect("host side");
    }

    #[test]
    fn flood_holds_what_it_got_until_the_end_of_stream() {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("flood");
        let listener = UnixListener::bind(&target).unwrap();
        let mut attempt = 0;
        let server = thread::spawn(move || {
            flood(guest, || {
                attempt += 1;
                // Every third attempt is refused, as a VMM at its connection bound does.
                if attempt % 3 == 0 {
                    Err(io::Error::from(io::ErrorKind::ConnectionReset))
                } else {
                    UnixStream::connect(&target)
                }
            })
        });
        host.write_all(b"9\n").unwrap();
        let mut answer = String::new();
        io::BufRead::read_line(&mut io::BufReader::new(&mut host), &mut answer).unwrap();
        assert_eq!(answer, "6 3\n");
        let mut accepted: Vec<UnixStream> = (0..6).map(|_| listener.accept().unwrap().0).collect();
        host.shutdown(Shutdown::Write).unwrap();
        server.join().unwrap().unwrap();
        for conn in &mut accepted {
            let mut buf = [0u8; 1];
            assert_eq!(conn.read(&mut buf).unwrap(), 0, "closed at the end of stream");
        }
        let (mut too_many, guest) = UnixStream::pair().unwrap();
        too_many.write_all(format!("{}\n", MAX_FLOOD + 1).as_bytes()).unwrap();
        assert!(flood(guest, || UnixStream::connect("/nonexistent")).is_err(), "over MAX_FLOOD is refused");
    }

    #[test]
    fn connect_with_retry_gives_up_after_its_patience() {
        let start = Instant::now();
        let err = connect_with_retry(|| UnixStream::connect("/nonexistent/host.sock"), Duration::from_millis(600))
            .expect_err("nobody listens");
        assert!(start.elapsed() >= Duration::from_millis(600));
        assert!(err.to_string().starts_with("gave up after"), "{err}");
    }
}
