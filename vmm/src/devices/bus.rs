//! Port I/O dispatch: each device owns a range of ports; accesses to ports nobody owns
//! read as all ones (an empty ISA bus) and writes to them are dropped.

use std::sync::{Arc, Mutex};

/// A device reached through port I/O. `offset` is relative to the device's first port.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A device as the bus and its owner share it.
pub type SharedPioDevice = Arc<Mutex<dyn PioDevice>>;

struct Range {
    base: u16,
    len: u16,
    device: SharedPioDevice,
}

#[derive(Default, Clone)]
pub struct PioBus {
    ranges: Arc<Vec<Range>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("port range {base:#x}+{len} overlaps a registered device")]
pub struct BusOverlap {
    pub base: u16,
    pub len: u16,
}

impl PioBus {
    /// Builds a bus from (first port, number of ports, device) triples.
    pub fn new(devices: Vec<(u16, u16, SharedPioDevice)>) -> Result<PioBus, BusOverlap> {
        let mut ranges: Vec<Range> =
            devices.into_iter().map(|(base, len, device)| Range { base, len, device }).collect();
        ranges.sort_by_key(|r| r.base);
        for pair in ranges.windows(2) {
            if u32::from(pair[0].base) + u32::from(pair[0].len) > u32::from(pair[1].base) {
                return Err(BusOverlap { base: pair[1].base, len: pair[1].len });
            }
        }
        Ok(PioBus { ranges: Arc::new(ranges) })
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        let index = self.ranges.partition_point(|r| r.base <= port).checked_sub(1)?;
        let range = &self.ranges[index];
        let offset = port - range.base;
        (offset < range.len).then_some((range, offset))
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((range, offset)) => lock(&range.device).read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) {
        if let Some((range, offset)) = self.find(port) {
            lock(&range.device).write(offset, data);
        }
    }
}

/// Locks a device. A vCPU thread that panicked while holding the lock left the device
/// in whatever state it reached; the VM is going down anyway, so carry on with it.
fn lock<'a>(device: &'a Mutex<dyn PioDevice + 'static>) -> std::sync::MutexGuard<'a, dyn PioDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, u8)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_port_with_device_relative_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let bus = PioBus::new(vec![(0x3f8, 8, a.clone() as _), (0x60, 1, b.clone() as _)]).unwrap();
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
        let err = PioBus::new(vec![(0x3f8, 8, a.clone() as _), (0x3ff, 1, a as _)]).err().unwrap();
        assert_eq!(err, BusOverlap { base: 0x3ff, len: 1 });
    }
}
