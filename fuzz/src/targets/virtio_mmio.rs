//! virtio-mmio: any sequence of register accesses (any offset, width and value: feature
//! negotiation, queue configuration, status changes, resets, config space) against the
//! transport with a real device behind it, whose queues lie in guest memory the fuzzer
//! wrote first. The device is virtio-net, detached: its worker consumes TX chains and
//! walks RX chains, so whatever queue configuration the driver got through to
//! activation is then used on guest memory.
//!
//! Guest memory is written before the register accesses (phase 1, then phase 2), so the
//! device thread that activation starts never races the harness.

use crate::guest::{encode_chain, queue_base, Guest, QUEUE_SIZE};
use crate::input::{Encoder, Input};
use nestbox_vmm::devices::bus::BusDevice;
use nestbox_vmm::devices::virtio::mmio::{MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK};
use nestbox_vmm::devices::virtio::mmio::{MMIO_WINDOW, QUEUE_NOTIFY, STATUS_FEATURES_OK};
use nestbox_vmm::devices::virtio::net::{MacAddr, NetDevice};

const REG_STATUS: u64 = 0x70;

/// Register operations of phase 2, the first byte of each.
pub const REG_WRITE: u8 = 0;
pub const REG_READ: u8 = 1;
pub const ODD_ACCESS: u8 = 2;
pub const HANDSHAKE: u8 = 3;
pub const DRIVER_OK: u8 = 4;
pub const RESET: u8 = 5;
const REG_OPS: u8 = 6;

fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// What Linux's virtio_mmio driver does up to DRIVER_OK, with the features and queue
/// sizes from the input.
fn handshake(t: &mut MmioTransport, input: &mut Input<'_>) {
    let (low, high) = (input.u32(), input.u32());
    write32(t, REG_STATUS, STATUS_ACKNOWLEDGE);
    write32(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for (sel, value) in [(0, low), (1, high)] {
        write32(t, 0x24, sel);
        write32(t, 0x20, value);
    }
    write32(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    for q in 0..2u32 {
        let base = queue_base(q as usize) as u32;
        let size = match input.u8() {
            0 => u32::from(QUEUE_SIZE),
            n => u32::from(n),
        };
        write32(t, 0x30, q);
        write32(t, 0x38, size);
        for (reg, addr) in [(0x80, base), (0x90, base + 0x1000), (0xa0, base + 0x2000)] {
            write32(t, reg, addr);
            write32(t, reg + 4, 0);
        }
        write32(t, 0x44, 1);
    }
}

pub fn run(data: &[u8]) {
    let _cpu = super::SameCpu::pin();
    let mut input = Input::new(data);
    let memory_ops = input.u8() % 32;
    let mut guest = Guest::new(2);
    for _ in 0..memory_ops {
        guest.step(&mut input);
    }
    let device = NetDevice::new(MacAddr([2, 0, 0, 0, 0, 1]), None);
    let mut t = MmioTransport::new(Box::new(device), guest.mem.clone(), super::interrupt()).expect("transport");
    while !input.is_empty() {
        match input.u8() % REG_OPS {
            REG_WRITE => {
                let (offset, value) = (u64::from(input.u8()) * 4, input.u32());
                write32(&mut t, offset, value);
            }
            REG_READ => {
                let offset = u64::from(input.u8()) * 4;
                read32(&mut t, offset);
            }
            ODD_ACCESS => {
                let (offset, len, write) = (u64::from(input.u16()) % MMIO_WINDOW, input.u8() % 9, input.bool());
                let mut buf = [0u8; 8];
                let buf = &mut buf[..usize::from(len)];
                if write {
                    let content = input.bytes(buf.len());
                    buf[..content.len()].copy_from_slice(content);
                    t.write(offset, buf);
                } else {
                    t.read(offset, buf);
                }
            }
            HANDSHAKE => handshake(&mut t, &mut input),
            DRIVER_OK => {
                let status = read32(&mut t, REG_STATUS);
                write32(&mut t, REG_STATUS, status | STATUS_DRIVER_OK);
                let queue = input.u8();
                write32(&mut t, QUEUE_NOTIFY, u32::from(queue % 3));
            }
            _ => write32(&mut t, REG_STATUS, 0),
        }
    }
    // A reset stops the device thread (and waits for it).
    write32(&mut t, REG_STATUS, 0);
}

pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let frame = [0u8; 72];
    let mut memory = Encoder::default();
    encode_chain(&mut memory, 0, &[(0, 2048, true, b"")]);
    encode_chain(&mut memory, 1, &[(0x100, 72, false, &frame)]);
    let mut seeds = Vec::new();

    // The driver's handshake (VERSION_1 accepted), DRIVER_OK, reset, and again.
    let mut e = Encoder::default();
    e.u8(2).bytes(&memory.0);
    e.u8(HANDSHAKE).u32(0xffff_ffff).u32(1).u8(0).u8(0).u8(DRIVER_OK).u8(1).u8(RESET);
    e.u8(HANDSHAKE).u32(0x20).u32(1).u8(0).u8(0).u8(DRIVER_OK).u8(0);
    seeds.push(("handshake", e.0));

    // A legacy driver, a queue of a size that is not a power of two, odd accesses.
    let mut e = Encoder::default();
    e.u8(2).bytes(&memory.0);
    e.u8(HANDSHAKE).u32(0).u32(0).u8(3).u8(0).u8(DRIVER_OK).u8(0);
    e.u8(RESET).u8(HANDSHAKE).u32(0).u32(1).u8(255).u8(7).u8(DRIVER_OK).u8(1);
    e.u8(ODD_ACCESS).u16(0x100).u8(6).u8(0).u8(ODD_ACCESS).u16(0x70).u8(1).u8(1).u8(4);
    e.u8(REG_WRITE).u8(0x30 / 4).u32(7).u8(REG_READ).u8(0x34 / 4).u8(REG_WRITE).u8(0x64 / 4).u32(3);
    seeds.push(("odd-driver", e.0));
    seeds
}
