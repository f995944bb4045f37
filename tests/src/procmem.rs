//! A process's resident memory as /proc reports it, for the tests that bound what a pod
//! costs the host.

/// A `Name:   N kB` field of a /proc text (status, smaps, meminfo), in KiB.
pub fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok())
}

/// Resident set size (VmRSS) of a process, KiB; 0 when it is gone.
pub fn rss_kib(pid: i32) -> u64 {
    kib_field(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(), "VmRSS:").unwrap_or(0)
}

/// A smaps field (`"Rss:"`, `"Pss:"`) of the process's largest mapping, KiB: in a VMM, the
/// guest's memory (as far as the guest has touched it).
pub fn largest_mapping_kib(pid: i32, field: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut best_size, mut best, mut size) = (0, 0, 0);
    for line in smaps.lines() {
        if let Some(v) = kib_field(line, "Size:") {
            size = v;
        } else if let Some(v) = kib_field(line, field) {
            if size > best_size {
                (best_size, best) = (size, v);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_resident_memory() {
        // A mapping larger than any other of this test process (glibc's arenas reserve
        // 64 MiB each), of which 16 MiB is touched, as a guest's RAM in a VMM is.
        const SIZE: usize = 160 << 20;
        let mut big = vec![0u8; SIZE];
        for page in big[..16 << 20].chunks_mut(4096) {
            page[0] = 1;
        }
        let me = std::process::id() as i32;
        let (rss, largest) = (rss_kib(me), largest_mapping_kib(me, "Rss:"));
        assert!(largest >= 16 << 10 && largest <= rss, "largest mapping {largest} KiB within {rss} KiB");
        assert!(largest < (SIZE as u64 >> 10), "only the touched part is resident: {largest} KiB");
        assert!(largest_mapping_kib(me, "Pss:") <= largest, "PSS never above RSS");
        assert_eq!(rss_kib(i32::MAX), 0, "no such process");
        std::hint::black_box(&big);
    }
}
