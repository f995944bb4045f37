//! The guest's vsock test services: what nestbox-agent serves when the kernel command line
//! carries [`PARAM`], so a host test can exercise the VMM's vsock device end to end.
//!
//! | guest port | service |
//! |---|---|
//! | [`ECHO_PORT`] 1025 | echoes every byte until the host half-closes, then closes |
//! | [`SINK_PORT`] 1026 | reads until EOF, then answers one line `<byte count> <sha256 hex>\n` and closes |
//! | [`SOURCE_PORT`] 1027 | reads one line `<N>\n`, sends `N` bytes of [`pattern_byte`] (offsets 0..N), closes |
//! | [`CLOSE_PORT`] 1028 | closes every connection as soon as it is accepted (a guest-side close) |
//! | [`FLOOD_PORT`] 1029 | reads one line `<N>\n`, opens `N` connections to the host's port [`HOST_FLOOD_PORT`] and holds those it got, answers `<opened> <refused>\n`, closes them all at the host's end of stream (a guest flooding the VMM's vsock) |
//!
//! (The agent's own ports, 1024 for the API and 1030 for standard I/O, are outside this
//! range.)
//!
//! And once ready the agent connects out to the host (CID 2) port [`HOST_PORT`] 1100 (the
//! VMM forwards that to `<vsock.sock>_1100`), writes [`GREETING`], then echoes what the host
//! sends until EOF: a guest-initiated connection.

/// Kernel parameter that turns the test services on.
pub const PARAM: &str = "nestbox.vsock_test";

pub const ECHO_PORT: u32 = 1025;
pub const SINK_PORT: u32 = 1026;
pub const SOURCE_PORT: u32 = 1027;
pub const CLOSE_PORT: u32 = 1028;
pub const FLOOD_PORT: u32 = 1029;

/// The host port the guest connects to (CID 2).
pub const HOST_PORT: u32 = 1100;

/// The host port the flood service connects to, as many times as it is asked.
pub const HOST_FLOOD_PORT: u32 = 1101;

/// The most connections the flood service opens for one request.
pub const MAX_FLOOD: usize = 4096;

/// What the guest writes first on its connection to [`HOST_PORT`].
pub const GREETING: &[u8] = b"hello from guest\n";

/// The longest request line the source service reads (`<N>\n`); anything longer is refused.
pub const MAX_REQUEST_LINE: usize = 32;

/// Byte number `offset` of the source service's stream.
///
/// The top byte of a 64-bit multiplicative (Fibonacci) hash of the offset: cheap, the same
/// on both sides, and without a short period, so a lost, repeated or reordered chunk of the
/// stream changes the checksum (a counter mod 256 would hide a lost 256-byte block).
pub fn pattern_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

/// Fills `buf` with the stream's bytes from `offset` on.
pub fn fill_pattern(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(offset + i as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_stable_and_not_periodic_in_small_blocks() {
        // Fixed values: the guest and the host must agree whatever the build.
        let mut first = [0u8; 8];
        fill_pattern(0, &mut first);
        assert_eq!(first, [0x00, 0x9e, 0x3c, 0xda, 0x78, 0x17, 0xb5, 0x53]);
        let mut chunk = [0u8; 4];
        fill_pattern(4, &mut chunk);
        assert_eq!(chunk, first[4..]);
        for period in [1u64, 2, 4, 256, 4096, 65536] {
            assert!((0..1024).any(|i| pattern_byte(i) != pattern_byte(i + period)), "period {period}");
        }
    }
}
