//! The console log's bound: a guest that prints without end (hostile or looping) must not
//! fill the host's disk, or its RAM where the sandbox directory is a tmpfs (/run).

use std::io::Write;

/// Console bytes kept per VM; what the guest prints beyond them is dropped.
pub const CONSOLE_LOG_MAX: u64 = 16 << 20;

/// The line written once the bound is reached.
pub const CAPPED_MARKER: &str =
    "\n[nestbox-vmm: console log reached its bound; the guest's further output is dropped]\n";

/// A writer that passes `max` bytes through, then the marker, then drops everything while
/// still reporting it written (the guest's UART must never stall on a full log).
pub struct CappedWriter<W: Write> {
    inner: W,
    written: u64,
    max: u64,
}

impl<W: Write> CappedWriter<W> {
    pub fn new(inner: W, max: u64) -> CappedWriter<W> {
        CappedWriter { inner, written: 0, max }
    }
}

impl<W: Write> Write for CappedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written > self.max {
            return Ok(buf.len());
        }
        let room = usize::try_from(self.max - self.written).unwrap_or(usize::MAX);
        if room == 0 {
            self.written = self.max + 1;
            self.inner.write_all(CAPPED_MARKER.as_bytes())?;
            return Ok(buf.len());
        }
        let n = self.inner.write(&buf[..buf.len().min(room)])?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_beyond_the_bound_is_dropped_after_one_marker() {
        let mut w = CappedWriter::new(Vec::new(), 10);
        for _ in 0..1000 {
            w.write_all(b"0123456").expect("never fails");
        }
        let out = String::from_utf8(w.inner).expect("utf-8");
        assert_eq!(out, format!("0123456012{CAPPED_MARKER}"));
    }
}
