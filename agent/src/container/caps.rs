//! Linux capabilities by name, and setting a process's sets (helper side).

use std::io;

use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};

/// Capability names in kernel number order (CAP_CHOWN is 0).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

fn number(cap: &Capability) -> Option<u32> {
    // oci-spec serialises a capability under its kernel name ("CAP_CHOWN").
    let name = serde_json::to_string(cap).ok()?;
    NAMES.iter().position(|n| *n == name.trim_matches('"')).map(|i| i as u32)
}

/// The set as a 64-bit mask. Names this table does not know are errors (a typo must not
/// silently grant or drop less than asked).
fn mask(set: &Option<Capabilities>) -> io::Result<u64> {
    let mut mask = 0u64;
    for cap in set.iter().flatten() {
        let n = number(cap).ok_or_else(|| io::Error::other(format!("unknown capability {cap:?}")))?;
        mask |= 1 << n;
    }
    Ok(mask)
}

/// The highest capability this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NAMES.len() as u32 - 1)
}

/// Checks that every name is known, without changing anything (agent side, early errors).
pub fn validate(caps: &LinuxCapabilities) -> io::Result<()> {
    for set in [caps.bounding(), caps.effective(), caps.inheritable(), caps.permitted(), caps.ambient()] {
        mask(set)?;
    }
    Ok(())
}

/// Drops from the bounding set every capability not in `caps.bounding`. Needs
/// CAP_SETPCAP, so it runs before the user switch.
pub fn drop_bounding(caps: &LinuxCapabilities) -> io::Result<()> {
    let keep = mask(caps.bounding())?;
    for cap in 0..=last_cap().min(63) {
        if keep & (1 << cap) == 0 {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                let err = io::Error::last_os_error();
                // A capability number this kernel does not have.
                if err.raw_os_error() != Some(libc::EINVAL) {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Sets the effective, permitted and inheritable sets, then raises the ambient ones.
pub fn set(caps: &LinuxCapabilities) -> io::Result<()> {
    let (e, p, i) = (mask(caps.effective())?, mask(caps.permitted())?, mask(caps.inheritable())?);
    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [
        CapData { effective: e as u32, permitted: p as u32, inheritable: i as u32 },
        CapData { effective: (e >> 32) as u32, permitted: (p >> 32) as u32, inheritable: (i >> 32) as u32 },
    ];
    // SAFETY: capset reads a v3 header and two data structs, both valid for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let ambient = mask(caps.ambient())?;
    for cap in 0..64u32 {
        if ambient & (1 << cap) != 0 {
            // SAFETY: prctl with integer arguments only.
            let rc = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_kernel_numbers() {
        let caps: LinuxCapabilities =
            serde_json::from_str(r#"{"bounding":["CAP_CHOWN","CAP_KILL","CAP_SYS_ADMIN","CAP_CHECKPOINT_RESTORE"]}"#)
                .expect("caps JSON");
        assert_eq!(mask(caps.bounding()).expect("known"), 1 | 1 << 5 | 1 << 21 | 1 << 40);
        validate(&caps).expect("valid");
    }
}
