//! Guest physical memory layout of an x86_64 nestbox microVM.
//!
//! ```text
//! 0x0000_0500  boot GDT, then the (empty) boot IDT
//! 0x0000_6000  PVH start info, module list at +0x40
//! 0x0000_7000  PVH memory map
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (inside the BIOS EBDA range the kernel scans)
//! 0x0010_0000  kernel (ELF vmlinux loaded at its physical addresses)
//!     ...      initramfs, at the top of RAM below the MMIO gap
//! 0xd000_0000  MMIO gap (768 MiB): virtio-mmio devices, I/O APIC, local APIC
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than fits below the gap
//! ```

use vm_memory::GuestAddress;

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const PVH_INFO_START: u64 = 0x6000;
pub const MODLIST_START: u64 = 0x6040;
pub const MEMMAP_START: u64 = 0x7000;
pub const CMDLINE_START: u64 = 0x2_0000;
/// The x86 kernel's COMMAND_LINE_SIZE, terminating NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; conventional RAM ends here.
pub const EBDA_START: u64 = 0x9_fc00;
pub const MPTABLE_START: u64 = EBDA_START;
/// Where the kernel is loaded: the first megabyte belongs to the legacy PC layout.
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices sit at the start of the MMIO gap, one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Interrupt lines of virtio-mmio devices: the I/O APIC pins above the legacy devices'
/// (4 is COM1), so at most 19 virtio devices.
pub const VIRTIO_IRQ_FIRST: u32 = 5;
pub const VIRTIO_IRQ_LAST: u32 = 23;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
pub const PAGE_SIZE: u64 = 0x1000;

/// Guest RAM as (start, length) ranges: all of it below the MMIO gap when it fits,
/// otherwise the rest continues at 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START)]
    }
}

/// Kind of an e820 / PVH memory map entry (values from the e820 specification).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryKind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

/// The memory map handed to the guest: conventional RAM below the EBDA, RAM from 1 MiB
/// (split around the MMIO gap), and the gap itself reserved so the kernel never puts
/// anything at device addresses.
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![MemoryMapEntry { addr: 0, size: EBDA_START, kind: MemoryKind::Ram }];
    for (start, len) in ram_ranges(mem_size) {
        let (start, end) = (start.0.max(HIMEM_START), start.0 + len);
        if end > start {
            map.push(MemoryMapEntry { addr: start, size: end - start, kind: MemoryKind::Ram });
        }
    }
    map.push(MemoryMapEntry { addr: MMIO_GAP_START, size: MMIO_GAP_END - MMIO_GAP_START, kind: MemoryKind::Reserved });
    map.sort_by_key(|e| e.addr);
    map
}

/// Highest guest address (exclusive) of RAM below the MMIO gap: the initramfs goes
/// just under it, out of the kernel's way.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// Where an initramfs of `size` bytes is placed: page aligned, as high as possible
/// below the MMIO gap. `None` when it would overlap `kernel_end`.
pub fn initramfs_address(mem_size: u64, size: u64, kernel_end: u64) -> Option<u64> {
    let top = low_ram_end(mem_size);
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_guest_is_one_range_below_the_gap() {
        assert_eq!(ram_ranges(256 * MIB), vec![(GuestAddress(0), 256 * MIB)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(GuestAddress(0), MMIO_GAP_START)]);
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let ranges = ram_ranges(4 * GIB);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(ranges[1], (GuestAddress(MMIO_GAP_END), 4 * GIB - MMIO_GAP_START));
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 * GIB);
    }

    #[test]
    fn memory_map_of_small_guest() {
        let map = memory_map(128 * MIB);
        assert_eq!(
            map,
            vec![
                MemoryMapEntry { addr: 0, size: EBDA_START, kind: MemoryKind::Ram },
                MemoryMapEntry { addr: HIMEM_START, size: 128 * MIB - HIMEM_START, kind: MemoryKind::Ram },
                MemoryMapEntry { addr: MMIO_GAP_START, size: 768 * MIB, kind: MemoryKind::Reserved },
            ]
        );
    }

    #[test]
    fn memory_map_of_large_guest_skips_the_gap() {
        let map = memory_map(5 * GIB);
        let ram: u64 = map.iter().filter(|e| e.kind == MemoryKind::Ram).map(|e| e.size).sum();
        // Everything but the legacy hole between the EBDA and 1 MiB is RAM.
        assert_eq!(ram, 5 * GIB - (HIMEM_START - EBDA_START));
        assert_eq!(map.last().unwrap().addr, MMIO_GAP_END);
        // No RAM entry overlaps the gap and entries are sorted and disjoint.
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{pair:?}");
        }
    }

    #[test]
    fn initramfs_sits_page_aligned_under_the_gap() {
        let addr = initramfs_address(256 * MIB, 3 * MIB + 5, 20 * MIB).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 3 * MIB + 5 <= 256 * MIB);
        let big = initramfs_address(8 * GIB, MIB, 20 * MIB).unwrap();
        assert!(big + MIB <= MMIO_GAP_START);
    }

    #[test]
    fn initramfs_that_does_not_fit_is_refused() {
        assert_eq!(initramfs_address(64 * MIB, 60 * MIB, 20 * MIB), None);
        assert_eq!(initramfs_address(64 * MIB, 128 * MIB, 0), None);
    }
}
