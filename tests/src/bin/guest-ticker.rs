//! Guest side of the restore benchmark (tests/benches/restore.rs): runs as /init of a
//! test initramfs and prints `tick N` every 10 ms forever, after one `ticker: ready`. The
//! first tick a restored VM prints marks the moment its guest runs again, whichever VMM
//! restored it, so nestbox-vmm and QEMU are timed to the same event.
//!
//! Built for x86_64-unknown-linux-musl (static): it is PID 1 with nothing else around.

use std::io::Write;
use std::time::Duration;

fn main() {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ticker: ready");
    // PID 1 must never return: the kernel would panic.
    for n in 0u64.. {
        std::thread::sleep(Duration::from_millis(10));
        let _ = writeln!(out, "tick {n}");
        let _ = out.flush();
    }
}
