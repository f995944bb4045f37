//! Intel MultiProcessor Specification (v1.4) table: tells a guest without ACPI how many
//! CPUs it has and how ISA interrupts reach the I/O APIC. Without it Linux falls back to
//! the 8259 PIC and a single CPU (and, on emulated KVM, boots ~10 s slower).
//!
//! The tables are assembled byte by byte in little-endian order: no `repr(C)` structs
//! are reinterpreted as bytes, so there is nothing unsafe here.

use super::layout::{APIC_ADDR, IOAPIC_ADDR};

/// Pins of the in-kernel I/O APIC (KVM emulates a 24-pin 82093AA).
pub const IOAPIC_PINS: u8 = 24;
/// Highest vCPU count the table can describe: APIC IDs are one byte, 0xff is the
/// broadcast ID and one more ID goes to the I/O APIC.
pub const MAX_CPUS: u8 = 254;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REVISION: u8 = 4;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const ISA_BUS_ID: u8 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;
/// CPU signature reported for every processor (family 6), and FPU + APIC present.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("an MP table describes 1 to {MAX_CPUS} CPUs, not {0}")]
    CpuCount(u8),
}

/// Builds the floating pointer followed by the configuration table, for placement at
/// guest address `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus;

    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // ISA IRQ n arrives on I/O APIC pin n, polarity and trigger as the bus defines.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, pin, ioapic_id, pin]);
        count += 1;
    }
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, int_type, 0, 0, ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
        count += 1;
    }

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = base + FLOATING_LEN as u64;
    let table_len = HEADER_LEN + entries.len();

    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(SPEC_REVISION);
    header.push(0); // checksum, below
    header.extend_from_slice(b"NESTBOX ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte paragraphs
    floating.push(SPEC_REVISION);
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table follows
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&header);
    Ok(floating)
}

/// The byte that makes all bytes of `data` sum to zero (mod 256).
fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_consistent() {
        let base = 0x9fc00;
        let t = build(base, 2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let table_addr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(table_addr, base + 16);
        let header = &t[16..];
        assert_eq!(&header[0..4], b"PCMP");
        let len = u16::from_le_bytes(header[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, header.len());
        assert_eq!(sum(header), 0);
    }

    #[test]
    fn one_processor_entry_per_cpu_and_one_boot_processor() {
        let t = build(0, 4).unwrap();
        let header = &t[16..];
        let count = u16::from_le_bytes(header[34..36].try_into().unwrap());
        // 4 CPUs, 1 bus, 1 I/O APIC, 24 pins, 2 local interrupts
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        let cpus: Vec<&[u8]> = header[44..44 + 4 * 20].chunks(20).collect();
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu[0], ENTRY_PROCESSOR);
            assert_eq!(cpu[1] as usize, i);
            assert_eq!(cpu[3] & CPU_BOOT_PROCESSOR != 0, i == 0);
        }
        let ioapic = &header[44 + 4 * 20 + 8..][..8];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 4, "I/O APIC ID follows the CPUs' APIC IDs");
    }

    #[test]
    fn cpu_count_is_checked() {
        assert_eq!(build(0, 0), Err(MpTableError::CpuCount(0)));
        assert_eq!(build(0, 255), Err(MpTableError::CpuCount(255)));
        assert!(build(0, MAX_CPUS).is_ok());
    }
}
