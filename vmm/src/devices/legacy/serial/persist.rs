//! The saved state of the serial console: the UART's registers and the bytes the guest
//! has not read yet. Where its output goes is not saved; a restored console writes to
//! the new VMM's console.

use super::{IrqTrigger, SerialConsole};
use serde::{Deserialize, Serialize};
use std::io::Write;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

/// The 16550A's registers (vm-superio's `SerialState`, which is not serialisable).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// vm-superio refused the saved registers.
#[derive(Debug, thiserror::Error)]
#[error("serial console state: {0}")]
pub struct SerialStateError(String);

impl SerialConsole {
    pub fn save_state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A console in the state a snapshot saved, writing to `out`.
    pub fn from_state(
        state: &SerialState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<SerialConsole, SerialStateError> {
        let saved = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&saved, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| SerialStateError(format!("{e:?}")))?;
        Ok(SerialConsole { uart })
    }
}
