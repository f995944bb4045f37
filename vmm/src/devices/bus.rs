//! Address dispatch for vCPU exits: each device owns a range of port I/O or MMIO
//! addresses and sees offsets relative to its first address. Accesses nobody owns read
//! as all ones (an empty bus) and writes to them are dropped.

use std::sync::{Arc, Mutex};

/// A device reached through port I/O or MMIO. `offset` is relative to the device's base.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device as the bus and its owner share it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// One address space (port I/O or MMIO). Cloning shares the devices.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: Arc<Vec<Range>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("address range {base:#x}+{len:#x} overlaps a registered device")]
pub struct BusOverlap {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    /// Builds a bus from (base address, length, device) triples.
    pub fn new(devices: Vec<(u64, u64, SharedDevice)>) -> Result<Bus, BusOverlap> {
        let mut ranges: Vec<Range> =
            devices.into_iter().map(|(base, len, device)| Range { base, len, device }).collect();
        ranges.sort_by_key(|r| r.base);
        for pair in ranges.windows(2) {
            if pair[0].base.saturating_add(pair[0].len) > pair[1].base {
                return Err(BusOverlap { base: pair[1].base, len: pair[1].len });
            }
        }
        Ok(Bus { ranges: Arc::new(ranges) })
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        let index = self.ranges.partition_point(|r| r.base <= addr).checked_sub(1)?;
        let range = &self.ranges[index];
        let offset = addr - range.base;
        (offset < range.len).then_some((range, offset))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((range, offset)) => lock(&range.device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((range, offset)) = self.find(addr) {
            lock(&range.device).write(offset, data);
        }
    }
}

/// Locks a device. A vCPU thread that panicked while holding the lock left the device
/// in whatever state it reached; the VM is going down anyway, so carry on with it.
fn lock<'a>(device: &'a Mutex<dyn BusDevice + 'static>) -> std::sync::MutexGuard<'a, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, u8)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_address_with_device_relative_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new(vec![(0x3f8, 8, a.clone() as _), (0x60, 1, b.clone() as _)]).unwrap();
        bus.write(0x3fb, &[7]);
        bus.write(0x60, &[9]);
        bus.write(0x61, &[1]); // nobody's
        let mut data = [0u8; 1];
        bus.read(0x3fd, &mut data);
        assert_eq!(data, [5]);
        bus.read(0x400, &mut data);
        assert_eq!(data, [0xff]);
        bus.read(0x10, &mut data);
        assert_eq!(data, [0xff]);
        assert_eq!(a.lock().unwrap().writes, vec![(3, 7)]);
        assert_eq!(b.lock().unwrap().writes, vec![(0, 9)]);
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let err = Bus::new(vec![(0x3f8, 8, a.clone() as _), (0x3ff, 1, a as _)]).err().unwrap();
        assert_eq!(err, BusOverlap { base: 0x3ff, len: 1 });
    }

    #[test]
    fn ranges_at_the_top_of_the_address_space() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let bus = Bus::new(vec![(u64::MAX - 1, 2, a as _)]).unwrap();
        let mut data = [0u8; 1];
        bus.read(u64::MAX, &mut data);
        assert_eq!(data, [1]);
    }
}
