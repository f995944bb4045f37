//! Just enough of the i8042 keyboard controller for the guest to reboot through it
//! (`reboot=k`): the reset command ends the VM. No keyboard or mouse is attached.

use super::super::bus::BusDevice;

/// Ports 0x60 (data) and 0x64 (status/command), registered as one range of 5 ports.
pub const I8042_BASE: u64 = 0x60;
pub const I8042_PORTS: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0": wired to the CPU reset on a PC.
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    on_reset: Box<dyn FnMut() + Send>,
}

impl I8042 {
    /// `on_reset` runs when the guest pulses the reset line.
    pub fn new(on_reset: impl FnMut() + Send + 'static) -> I8042 {
        I8042 { on_reset: Box::new(on_reset) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the kernel's wait for a
        // ready controller before the reset command ends at once. Port 0x61 (offset 1)
        // is the PIT's speaker port, handled in KVM, and never reaches us.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command_fires_once_per_write_and_nothing_else_does() {
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = resets.clone();
        let mut dev = I8042::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        dev.write(0, &[CMD_RESET_CPU]); // data port: not a command
        dev.write(COMMAND_OFFSET, &[0xad]); // disable keyboard
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
