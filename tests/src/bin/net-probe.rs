//! The network tests' and benchmark's tool, run inside containers (static, std only: it
//! needs no resolver, which is what breaks Debian's static busybox wget in a container):
//!
//! - `net-probe ifaces`: one line per interface with an IPv4 address:
//!   `<name> <address>/<prefix> mtu=<mtu> mac=<mac>`;
//! - `net-probe serve PORT TEXT`: a TCP server on 0.0.0.0:PORT answering every
//!   connection with TEXT and a newline, forever;
//! - `net-probe get ADDR PORT`: connects (10 s bound), prints the first line the server
//!   sends, exits 0; exits 1 saying why when it cannot;
//! - `net-probe echo PORT`: a TCP server echoing every byte, for round trips;
//! - `net-probe rr ADDR PORT N`: N one-byte round trips on one connection; prints
//!   `rr n=N p50_us=... p99_us=...`;
//! - `net-probe sink PORT`: a TCP server that reads and discards until EOF;
//! - `net-probe stream ADDR PORT MIB`: sends MIB MiB; prints `stream mib=... mib_per_s=...`.
//!
//! Built for x86_64-unknown-linux-musl (static): it runs in any container image.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["ifaces"] => ifaces(),
        ["serve", port, text] => serve(port, |mut s| writeln!(s, "{text}")),
        ["echo", port] => serve(port, echo),
        ["sink", port] => serve(port, |mut s| std::io::copy(&mut s, &mut std::io::sink()).map(drop)),
        ["get", addr, port] => get(addr, port),
        ["rr", addr, port, n] => round_trips(addr, port, n),
        ["stream", addr, port, mib] => stream(addr, port, mib),
        _ => {
            eprintln!("usage: net-probe ifaces | serve PORT TEXT | get ADDR PORT | echo PORT | rr ADDR PORT N | sink PORT | stream ADDR PORT MIB");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("net-probe {}: {e}", args.join(" "));
        std::process::exit(1);
    }
}

type Result<T> = std::result::Result<T, String>;

fn ifaces() -> Result<()> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(format!("getifaddrs: {}", std::io::Error::last_os_error()));
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: entry is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        entry = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family we check before the cast.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: both are AF_INET sockaddrs (the netmask has the address's family).
        let (addr, mask) =
            unsafe { (&*(ifa.ifa_addr as *const libc::sockaddr_in), &*(ifa.ifa_netmask as *const libc::sockaddr_in)) };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        let ip = std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        let prefix = u32::from_be(mask.sin_addr.s_addr).count_ones();
        let sys =
            |file: &str| std::fs::read_to_string(format!("/sys/class/net/{name}/{file}")).map(|s| s.trim().to_string());
        let (mtu, mac) = (sys("mtu").unwrap_or_default(), sys("address").unwrap_or_default());
        println!("{name} {ip}/{prefix} mtu={mtu} mac={mac}");
    }
    // SAFETY: list came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(())
}

fn serve(port: &str, handle: impl Fn(TcpStream) -> std::io::Result<()>) -> Result<()> {
    let port: u16 = port.parse().map_err(|e| format!("port {port:?}: {e}"))?;
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("bind :{port}: {e}"))?;
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                if let Err(e) = handle(stream) {
                    eprintln!("net-probe: a connection failed: {e}");
                }
            }
            Err(e) => eprintln!("net-probe: accept: {e}"),
        }
    }
    Ok(())
}

fn echo(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n])?;
    }
}

fn connect(addr: &str, port: &str) -> Result<TcpStream> {
    let target: SocketAddr = format!("{addr}:{port}").parse().map_err(|e| format!("address {addr}:{port}: {e}"))?;
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).map_err(|e| format!("connect {target}: {e}"))?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(|e| e.to_string())?;
    Ok(stream)
}

fn get(addr: &str, port: &str) -> Result<()> {
    let stream = connect(addr, port)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| format!("reading the answer: {e}"))?;
    print!("{line}");
    Ok(())
}

fn round_trips(addr: &str, port: &str, n: &str) -> Result<()> {
    let n: usize = n.parse().map_err(|e| format!("count {n:?}: {e}"))?;
    let mut stream = connect(addr, port)?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(n);
    let mut byte = [0u8; 1];
    for _ in 0..n.max(1) {
        let started = Instant::now();
        stream.write_all(&byte).and_then(|()| stream.read_exact(&mut byte)).map_err(|e| format!("round trip: {e}"))?;
        times.push(started.elapsed().as_micros());
    }
    times.sort_unstable();
    let at = |q: usize| times[(times.len() - 1) * q / 100];
    println!("rr n={} p50_us={} p99_us={}", times.len(), at(50), at(99));
    Ok(())
}

fn stream(addr: &str, port: &str, mib: &str) -> Result<()> {
    let mib: usize = mib.parse().map_err(|e| format!("size {mib:?}: {e}"))?;
    let mut stream = connect(addr, port)?;
    let chunk = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    for _ in 0..mib {
        stream.write_all(&chunk).map_err(|e| format!("sending: {e}"))?;
    }
    stream.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
    // The sink closes after EOF: wait for that so the time covers delivery.
    let _ = stream.read(&mut [0u8; 1]);
    let secs = started.elapsed().as_secs_f64();
    println!("stream mib={mib} secs={secs:.3} mib_per_s={:.1}", mib as f64 / secs);
    Ok(())
}
