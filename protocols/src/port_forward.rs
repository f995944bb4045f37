//! CRI port forwarding into the pod: containerd serves PortForward by connecting to
//! `localhost:<port>` inside the pod's network namespace on the host. In a nestbox pod that
//! namespace holds only CNI's veth and the VM's tap; the pod's localhost is in the guest.
//! So the shim catches those connections there and carries each one over its own
//! connection to the agent's port-forward port ([`crate::PORT_FORWARD_PORT`], vsock in a
//! guest, a Unix socket in host mode), opened by the host with one header line:
//!
//! ```text
//! tcp <port>\n
//! ```
//!
//! The agent connects to 127.0.0.1:<port> (then [::1]:<port>) in the pod's network
//! namespace and, once connected, answers `ok\n`; from then on the connection carries the
//! TCP stream's bytes both ways, and a half-close is passed on. When the agent cannot
//! connect it answers `error <reason>\n` and closes.

/// The longest header or answer line, newline included.
pub const MAX_LINE_LEN: usize = 256;

/// The header a host writes: the pod-local TCP port to connect to.
pub fn header(port: u16) -> String {
    format!("tcp {port}\n")
}

/// Parses a header line (without its newline): the port, or why it is not one.
pub fn parse_header(line: &str) -> Result<u16, String> {
    let port =
        line.strip_prefix("tcp ").ok_or_else(|| format!("port-forward header {line:?}: expected \"tcp <port>\""))?;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("port-forward header {line:?}: {port:?} is not a TCP port (1-65535)")),
        Ok(port) => Ok(port),
    }
}

/// The agent's answer once connected.
pub const OK: &str = "ok";

/// Parses the agent's answer line (without its newline).
pub fn parse_answer(line: &str) -> Result<(), String> {
    match line {
        OK => Ok(()),
        _ => Err(line.strip_prefix("error ").unwrap_or(line).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        assert_eq!(header(8080), "tcp 8080\n");
        assert_eq!(parse_header("tcp 8080"), Ok(8080));
        assert_eq!(parse_header("tcp 65535"), Ok(65535));
    }

    #[test]
    fn bad_headers_are_named() {
        for bad in ["", "tcp", "tcp ", "tcp 0", "tcp 65536", "tcp -1", "udp 53", "tcp 80 x", "TCP 80"] {
            let err = parse_header(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer("ok"), Ok(()));
        assert_eq!(parse_answer("error connection refused"), Err("connection refused".into()));
        assert_eq!(parse_answer("garbage"), Err("garbage".into()));
    }
}
