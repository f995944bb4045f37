//! The guest's console: a 16550A UART (vm-superio) at COM1, its output written to
//! stdout or a file, its interrupt delivered through an irqfd.

pub mod capped;
pub mod persist;

use crate::devices::bus::BusDevice;
use std::io::Write;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_PORTS: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt by signalling the eventfd KVM listens on (irqfd).
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> SerialConsole {
        SerialConsole { uart: Serial::new(IrqTrigger(irq), out) }
    }
}

impl SerialConsole {
    /// Pushes out anything the output buffers.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(offset)) => *byte = self.uart.read(offset),
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            // A console that cannot be written (a full disk, a closed pipe) must not
            // stop the guest: the byte is lost, the guest runs on.
            let _ = self.uart.write(offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut console = SerialConsole::new(irq, Box::new(sink.clone()));
        for b in b"hi\n" {
            console.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Line status: transmitter empty, so the guest's driver keeps writing.
        let mut lsr = [0u8];
        console.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Wide accesses are not UART accesses.
        let mut wide = [0u8; 2];
        console.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }
}
