//! The device cgroup of cgroup v2: a `BPF_PROG_TYPE_CGROUP_DEVICE` program, built from the
//! spec's `linux.resources.devices` and attached to the container's cgroup, decides every
//! open and mknod of a device node by the container's processes.
//!
//! Semantics are runc's: the rules apply in order, a later rule overriding an earlier one,
//! access by access (`m`, `r` and `w` are decided separately, as the v1 device controller
//! does: `allow c 1:3 r` after `deny c 1:3 rw` allows reading only); a request for several
//! accesses (an O_RDWR open) needs each of them allowed; nothing matched is denied; and
//! runc's default devices (mknod of any node, /dev/null, zero, full, random, urandom, tty,
//! ptmx and the pts terminals) are appended after the spec's rules, so a spec cannot take
//! away what every container needs. containerd's specs start with `deny a rwm`; a
//! privileged container's has `allow a rwm`.
//!
//! Why an own emitter rather than youki's libcgroups: its `cgroupsv2_devices` feature loads
//! through libbpf-sys, which compiles libbpf's C sources (and wants libelf and zlib), so it
//! does not build for the static x86_64-unknown-linux-musl agent without a C toolchain, and
//! it pulls procfs and D-Bus besides. The program here is a few dozen instructions of one
//! fixed shape, loaded and attached with two bpf(2) calls.
//!
//! The program stays attached while the cgroup exists: removing the cgroup frees it, so the
//! descriptor returned by [`attach`] is only kept to replace the program on an update.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

use super::{Cgroup, CgroupError, UNIFIED};

impl Cgroup {
    /// Attaches the device program of the spec's rules (`linux.resources.devices`; runc's
    /// defaults are added) in place of `old`, the program attached before, if any. The
    /// returned program is the one to pass as `old` next time.
    pub fn set_devices(&self, spec: &[LinuxDeviceCgroup], old: Option<&OwnedFd>) -> Result<OwnedFd, CgroupError> {
        let dir = match self {
            Cgroup::V2(dir) => dir.as_path(),
            Cgroup::V1(_) => self.v1(UNIFIED).ok_or_else(|| {
                CgroupError::Unsupported(
                    "devices (a v1 host without a cgroup2 hierarchy for the device program)".into(),
                )
            })?,
        };
        let rules = rules(spec).map_err(CgroupError::Devices)?;
        attach(dir, &rules, old).map_err(|source| CgroupError::Io {
            op: "attaching the device program to",
            path: dir.to_path_buf(),
            source,
        })
    }
}

/// The three accesses of a device rule (BPF_DEVCG_ACC_*).
const MKNOD: u8 = 1;
const READ: u8 = 2;
const WRITE: u8 = 4;
/// Device kinds (BPF_DEVCG_DEV_*).
const BLOCK: u32 = 1;
const CHAR: u32 = 2;

/// One rule: `kind` None matches every device ('a'), `major`/`minor` None any number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Option<u32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// MKNOD | READ | WRITE bits.
    pub access: u8,
}

impl Rule {
    const fn chr(major: u32, minor: Option<u32>) -> Rule {
        Rule { allow: true, kind: Some(CHAR), major: Some(major), minor, access: MKNOD | READ | WRITE }
    }

    /// Type 'a' matches every device: nothing after it can be reached.
    fn is_universal(&self) -> bool {
        self.kind.is_none()
    }
}

/// runc's default allowed devices (libcontainer/specconv AllowedDevices), appended after the
/// spec's rules.
const DEFAULTS: [Rule; 10] = [
    Rule { allow: true, kind: Some(CHAR), major: None, minor: None, access: MKNOD },
    Rule { allow: true, kind: Some(BLOCK), major: None, minor: None, access: MKNOD },
    Rule::chr(1, Some(3)), // null
    Rule::chr(1, Some(8)), // random
    Rule::chr(1, Some(7)), // full
    Rule::chr(5, Some(0)), // tty
    Rule::chr(1, Some(5)), // zero
    Rule::chr(1, Some(9)), // urandom
    Rule::chr(136, None),  // the pts terminals
    Rule::chr(5, Some(2)), // ptmx
];

/// The spec's rules followed by runc's defaults; a rule that cannot be a device rule is an
/// error naming it.
pub fn rules(spec: &[LinuxDeviceCgroup]) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::with_capacity(spec.len() + DEFAULTS.len());
    for r in spec {
        let kind = match r.typ().unwrap_or(LinuxDeviceType::A) {
            LinuxDeviceType::A => None,
            LinuxDeviceType::B => Some(BLOCK),
            LinuxDeviceType::C | LinuxDeviceType::U => Some(CHAR),
            // A pipe is no device: the device cgroup never sees one.
            LinuxDeviceType::P => continue,
        };
        let number = |n: Option<i64>| match n {
            None | Some(-1) => Ok(None),
            Some(n) => u32::try_from(n).map(Some).map_err(|_| format!("device rule {r:?}: number {n} out of range")),
        };
        let mut access = 0;
        // runc: no access string means all three.
        for c in r.access().as_deref().filter(|a| !a.is_empty()).unwrap_or("rwm").chars() {
            access |= match c {
                'm' => MKNOD,
                'r' => READ,
                'w' => WRITE,
                _ => return Err(format!("device rule {r:?}: unknown access {c:?} (expected r, w, m)")),
            };
        }
        rules.push(Rule { allow: r.allow(), kind, major: number(r.major())?, minor: number(r.minor())?, access });
    }
    rules.extend(DEFAULTS);
    Ok(rules)
}

/// One eBPF instruction, as `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcodes of the instructions used (linux/bpf.h, bpf_common.h).
pub const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
pub const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
pub const MOV64_K: u8 = 0xb7;
pub const AND64_K: u8 = 0x57;
pub const RSH64_K: u8 = 0x77;
pub const JSET_K: u8 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
pub const JNE32_K: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K: device numbers are u32
pub const JA: u8 = 0x05;
pub const EXIT: u8 = 0x95;

// Registers: r1 the context; r6 the device kind, r7 the accesses, r8 major, r9 minor.
const CTX: u8 = 1;
const KIND: u8 = 6;
const ACCESS: u8 = 7;
const MAJOR: u8 = 8;
const MINOR: u8 = 9;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}

/// An instruction list whose forward jumps name labels, resolved at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    /// (index of the jump, label)
    fixups: Vec<(usize, usize)>,
    labels: Vec<usize>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(usize::MAX);
        self.labels.len() - 1
    }
    fn bind(&mut self, label: usize) {
        self.labels[label] = self.insns.len();
    }
    fn jump(&mut self, code: u8, dst: u8, imm: i32, label: usize) {
        self.fixups.push((self.insns.len(), label));
        self.insns.push(insn(code, dst, 0, 0, imm));
    }
    fn ret(&mut self, value: i32) {
        self.insns.push(insn(MOV64_K, 0, 0, 0, value));
        self.insns.push(insn(EXIT, 0, 0, 0, 0));
    }
    fn finish(mut self) -> Result<Vec<Insn>, String> {
        for (at, label) in self.fixups {
            let off = self.labels[label] as i64 - at as i64 - 1;
            self.insns[at].off = i16::try_from(off).map_err(|_| format!("device program too long ({off} jump)"))?;
        }
        Ok(self.insns)
    }
}

/// The program: per requested access, the rules from the last
/// to the first, the first that matches decides; none: denied. Code after a rule that
/// matches every device is never emitted (the verifier refuses unreachable instructions).
pub fn program(rules: &[Rule]) -> Result<Vec<Insn>, String> {
    let mut asm = Asm::default();
    asm.insns.extend([
        insn(LDX_W, KIND, CTX, 0, 0),
        insn(MOV64_X, ACCESS, KIND, 0, 0),
        insn(AND64_K, KIND, 0, 0, 0xffff),
        insn(RSH64_K, ACCESS, 0, 0, 16),
        insn(LDX_W, MAJOR, CTX, 4, 0),
        insn(LDX_W, MINOR, CTX, 8, 0),
    ]);
    for bit in [MKNOD, READ, WRITE] {
        let next = asm.label();
        let requested = asm.label();
        asm.jump(JSET_K, ACCESS, bit.into(), requested);
        asm.jump(JA, 0, 0, next);
        asm.bind(requested);
        let mut decided = false;
        for rule in rules.iter().rev().filter(|r| r.access & bit != 0) {
            let no_match = asm.label();
            let tests = [(KIND, rule.kind), (MAJOR, rule.major), (MINOR, rule.minor)];
            // Type 'a' matches every device whatever numbers it names.
            for (reg, value) in tests.into_iter().take(if rule.kind.is_some() { 3 } else { 0 }) {
                if let Some(value) = value {
                    asm.jump(JNE32_K, reg, value as i32, no_match);
                }
            }
            if rule.allow {
                asm.jump(JA, 0, 0, next);
            } else {
                asm.ret(0);
            }
            asm.bind(no_match);
            if rule.is_universal() {
                decided = true;
                break;
            }
        }
        if !decided {
            asm.ret(0);
        }
        asm.bind(next);
    }
    asm.ret(1);
    asm.finish()
}

// bpf(2) commands, program and attach types, flags (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;
const BPF_F_REPLACE: u32 = 4;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// bpf(2) with an attribute structure; the kernel takes a prefix of its `union bpf_attr`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised repr(C) prefix of union bpf_attr of the given size;
    // the pointers inside it point to live buffers.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Loads a device program; on a verifier refusal the error carries the verifier's log.
pub fn load(program: &[Insn]) -> io::Result<OwnedFd> {
    let license = CString::new("Apache").map_err(io::Error::other)?;
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: u32::try_from(program.len()).map_err(io::Error::other)?,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    let fd = match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) => {
            // Again with the log, to say why.
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            let _ = bpf(BPF_PROG_LOAD, &mut attr);
            let text = String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(0)]).into_owned();
            return Err(io::Error::new(e.kind(), format!("loading the device program: {e}; verifier: {text}")));
        }
        Err(e) => return Err(io::Error::new(e.kind(), format!("loading the device program: {e}"))),
    };
    // SAFETY: bpf(2) just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Builds, loads and attaches the device program of `rules` to the cgroup `dir`, in place
/// of `replace` (the program attached before) if given. Returns the program.
pub fn attach(dir: &Path, rules: &[Rule], replace: Option<&OwnedFd>) -> io::Result<OwnedFd> {
    let program = program(rules).map_err(io::Error::other)?;
    let prog = load(&program)?;
    let cgroup =
        std::fs::File::open(dir).map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", dir.display())))?;
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        // MULTI: an ancestor's program (a host's, in host mode) still runs too.
        attach_flags: BPF_F_ALLOW_MULTI | replace.map_or(0, |_| BPF_F_REPLACE),
        replace_bpf_fd: replace.map_or(0, |f| f.as_raw_fd() as u32),
    };
    bpf(BPF_PROG_ATTACH, &mut attr)?;
    Ok(prog)
}

#[cfg(test)]
#[path = "devices_tests.rs"]
mod tests;
