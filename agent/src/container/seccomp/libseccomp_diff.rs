//! The agent's compiler against the real libseccomp (the host's libseccomp-dev, linked
//! into this test only): the same profile compiled by both, driven the way runc drives
//! libseccomp, and both programs run in `tests::run` over a corpus of `seccomp_data`
//! inputs (every number of every ABI, the x32 bit, numbers no ABI has, architectures
//! outside the filter, argument values on both sides of every condition, high halves
//! included). Every input must get the same verdict (action and errno).

use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::io::{Read, Seek};
use std::os::fd::AsRawFd;

use serde_json::Value;

use super::tests::{run, run_counted};
use super::{
    compile, libseccomp_equivalent, Abi, Insn, LinuxSeccomp, AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT,
};

#[repr(C)]
struct ScmpArgCmp {
    arg: c_uint,
    op: c_int,
    datum_a: u64,
    datum_b: u64,
}

#[link(name = "seccomp")]
extern "C" {
    fn seccomp_init(def_action: u32) -> *mut c_void;
    fn seccomp_release(ctx: *mut c_void);
    fn seccomp_arch_add(ctx: *mut c_void, arch_token: u32) -> c_int;
    fn seccomp_syscall_resolve_name(name: *const c_char) -> c_int;
    fn seccomp_syscall_resolve_name_arch(arch_token: u32, name: *const c_char) -> c_int;
    fn seccomp_rule_add_array(
        ctx: *mut c_void,
        action: u32,
        syscall: c_int,
        arg_cnt: c_uint,
        arg_array: *const ScmpArgCmp,
    ) -> c_int;
    fn seccomp_export_bpf(ctx: *const c_void, fd: c_int) -> c_int;
    fn seccomp_attr_set(ctx: *mut c_void, attr: c_int, value: u32) -> c_int;
}

const AUDIT_ARCH_AARCH64: u32 = 0xc000_00b7;

/// An OCI action as runc hands it to libseccomp (runc's getAction), from seccomp.h's
/// values; written out here rather than shared with the compiler under test.
fn runc_action(name: &str, errno: Option<u64>) -> u32 {
    let errno = errno.map_or(1, |e| e as u32 & 0xffff);
    match name {
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => 0x0000_0000,
        "SCMP_ACT_KILL_PROCESS" => 0x8000_0000,
        "SCMP_ACT_TRAP" => 0x0003_0000,
        "SCMP_ACT_ERRNO" => 0x0005_0000 | errno,
        "SCMP_ACT_TRACE" => 0x7ff0_0000 | errno,
        "SCMP_ACT_LOG" => 0x7ffc_0000,
        "SCMP_ACT_ALLOW" => 0x7fff_0000,
        other => panic!("no libseccomp action for {other}"),
    }
}

fn scmp_op(name: &str) -> c_int {
    match name {
        "SCMP_CMP_NE" => 1,
        "SCMP_CMP_LT" => 2,
        "SCMP_CMP_LE" => 3,
        "SCMP_CMP_EQ" => 4,
        "SCMP_CMP_GE" => 5,
        "SCMP_CMP_GT" => 6,
        "SCMP_CMP_MASKED_EQ" => 7,
        other => panic!("no libseccomp operator {other}"),
    }
}

fn u64_field(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// The profile compiled by libseccomp the way runc's InitSeccomp and matchCall do it;
/// the error names the call whose rule libseccomp refused.
fn libseccomp_program(profile: &Value) -> Result<Vec<Insn>, String> {
    let default =
        runc_action(profile["defaultAction"].as_str().expect("defaultAction"), u64_field(profile, "defaultErrnoRet"));
    // SAFETY (this function's FFI calls): ctx comes from seccomp_init, is checked non-null,
    // used only while alive and released once at the end; pointers passed point at live
    // CStrings and vectors.
    let ctx = unsafe { seccomp_init(default) };
    assert!(!ctx.is_null(), "seccomp_init");
    for arch in profile["architectures"].as_array().into_iter().flatten() {
        let token = match arch.as_str().expect("arch name") {
            "SCMP_ARCH_X86_64" => AUDIT_ARCH_X86_64,
            "SCMP_ARCH_X86" => AUDIT_ARCH_I386,
            "SCMP_ARCH_X32" => 0x4000_003e,
            other => panic!("architecture {other} is not in this test"),
        };
        let rc = unsafe { seccomp_arch_add(ctx, token) };
        assert!(rc == 0 || rc == -libc::EEXIST, "seccomp_arch_add {arch}: {rc}");
    }
    // runc turns on libseccomp's binary tree for more than 32 names (SCMP_FLTATR_CTL_OPTIMIZE).
    let names = profile["syscalls"].as_array().into_iter().flatten().flat_map(|e| e["names"].as_array()).flatten();
    if names.count() > 32 {
        assert_eq!(unsafe { seccomp_attr_set(ctx, 8, 2) }, 0, "SCMP_FLTATR_CTL_OPTIMIZE");
    }
    for entry in profile["syscalls"].as_array().into_iter().flatten() {
        let act = runc_action(entry["action"].as_str().expect("action"), u64_field(entry, "errnoRet"));
        let conds: Vec<ScmpArgCmp> = entry["args"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| ScmpArgCmp {
                arg: u64_field(a, "index").expect("index") as c_uint,
                op: scmp_op(a["op"].as_str().expect("op")),
                datum_a: u64_field(a, "value").expect("value"),
                datum_b: u64_field(a, "valueTwo").unwrap_or(0),
            })
            .collect();
        let shared = conds.iter().enumerate().any(|(i, c)| conds[..i].iter().any(|d| d.arg == c.arg));
        let rules: Vec<&[ScmpArgCmp]> = if shared { conds.chunks(1).collect() } else { vec![conds.as_slice()] };
        for name in entry["names"].as_array().expect("names") {
            let name = name.as_str().expect("name");
            if act == default {
                continue;
            }
            let cname = CString::new(name).expect("name without NUL");
            let nr = unsafe { seccomp_syscall_resolve_name(cname.as_ptr()) };
            if nr == -1 {
                continue; // unknown to libseccomp: runc skips it
            }
            for rule in &rules {
                let rc = unsafe { seccomp_rule_add_array(ctx, act, nr, rule.len() as c_uint, rule.as_ptr()) };
                if rc != 0 {
                    unsafe { seccomp_release(ctx) };
                    return Err(format!("libseccomp refused a rule for {name}: {rc}"));
                }
            }
        }
    }
    let mut out = tempfile::tempfile().expect("a temporary file");
    let rc = unsafe { seccomp_export_bpf(ctx, out.as_raw_fd()) };
    unsafe { seccomp_release(ctx) };
    assert_eq!(rc, 0, "seccomp_export_bpf");
    let mut bytes = Vec::new();
    out.rewind().expect("rewind");
    out.read_to_end(&mut bytes).expect("read the exported program");
    Ok(bytes
        .chunks_exact(8)
        .map(|b| Insn {
            code: u16::from_ne_bytes([b[0], b[1]]),
            jt: b[2],
            jf: b[3],
            k: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        })
        .collect())
}

/// Whether runc's ENOSYS stub answers (arch, nr) before the filter: the default action
/// does not let calls through, the ABI is listed, and nr is above the highest number
/// libseccomp resolves for any of the profile's names there (runc's findLastSyscalls).
fn runc_stub_says_enosys(profile: &Value, arch: u32, nr: u32) -> bool {
    if ["SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_TRACE"].contains(&profile["defaultAction"].as_str().unwrap_or("")) {
        return false;
    }
    let highest = |oci_arch: &str, token: u32| -> Option<u32> {
        let listed = profile["architectures"].as_array().into_iter().flatten().any(|a| a == oci_arch);
        let names = profile["syscalls"].as_array().into_iter().flatten().flat_map(|e| e["names"].as_array()).flatten();
        let numbers = names.filter_map(|n| {
            let name = CString::new(n.as_str().expect("name")).expect("name without NUL");
            // SAFETY: a live NUL-terminated string; libseccomp only reads it.
            u32::try_from(unsafe { seccomp_syscall_resolve_name_arch(token, name.as_ptr()) }).ok()
        });
        numbers.max().filter(|_| listed)
    };
    let above = |last: Option<u32>| last.is_some_and(|last| nr > last);
    match arch {
        AUDIT_ARCH_X86_64 if nr & X32_SYSCALL_BIT != 0 => above(highest("SCMP_ARCH_X32", 0x4000_003e)),
        AUDIT_ARCH_X86_64 => above(highest("SCMP_ARCH_X86_64", AUDIT_ARCH_X86_64)),
        AUDIT_ARCH_I386 => above(highest("SCMP_ARCH_X86", AUDIT_ARCH_I386)),
        _ => false,
    }
}

/// Argument values around every condition of the profile, per argument index.
fn arg_candidates(profile: &Value) -> [BTreeSet<u64>; 6] {
    let mut sets: [BTreeSet<u64>; 6] = Default::default();
    for set in &mut sets {
        set.extend([0, 1, 0xffff_ffff, 1 << 32, u64::MAX]);
    }
    // socketcall's and ipc's call numbers (i386 multiplexers).
    sets[0].extend(0..=25);
    for entry in profile["syscalls"].as_array().into_iter().flatten() {
        for a in entry["args"].as_array().into_iter().flatten() {
            let i = u64_field(a, "index").expect("index") as usize;
            let (v, v2) = (u64_field(a, "value").expect("value"), u64_field(a, "valueTwo").unwrap_or(0));
            for base in [v, v2] {
                sets[i].extend([base, base.wrapping_add(1), base.wrapping_sub(1), base ^ (1 << 32)]);
                sets[i].extend([base | 0xffff_ffff_0000_0000, base & 0xffff_ffff, base >> 32, base << 32]);
                sets[i].extend([base ^ 0x8000_0000, base | 1, base & !1]);
            }
            // Masked: every single mask bit flipped in the wanted value.
            if a["op"] == "SCMP_CMP_MASKED_EQ" {
                sets[i].extend((0..64).filter(|b| v >> b & 1 == 1).map(|b| v2 ^ (1 << b)));
            }
        }
    }
    sets
}

/// The corpus: (arch, nr, args).
fn corpus(profile: &Value) -> Vec<(u32, u32, [u64; 6])> {
    let mut nrs: Vec<u32> = (0..=600).collect();
    nrs.extend((0..=600).map(|n| n | X32_SYSCALL_BIT));
    nrs.extend([1000, 4095, 0x3fff_ffff, 0x7fff_ffff, 0x8000_0000, 0xbfff_ffff, 0xc000_0000, u32::MAX]);
    let arches = [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, AUDIT_ARCH_AARCH64, 0];
    let mut inputs: Vec<_> = arches
        .iter()
        .flat_map(|&a| nrs.iter().flat_map(move |&n| [(a, n, [0u64; 6]), (a, n, [u64::MAX; 6])]))
        .collect();
    // Calls with argument conditions in any ABI, and the i386 multiplexers.
    let mut conditional = BTreeSet::from([(AUDIT_ARCH_I386, 102), (AUDIT_ARCH_I386, 117)]);
    let with_args = |e: &&Value| e["args"].as_array().is_some_and(|a| !a.is_empty());
    for entry in profile["syscalls"].as_array().into_iter().flatten().filter(with_args) {
        for name in entry["names"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            for (abi, arch) in
                [(Abi::X86_64, AUDIT_ARCH_X86_64), (Abi::X32, AUDIT_ARCH_X86_64), (Abi::I386, AUDIT_ARCH_I386)]
            {
                conditional.extend(abi.number(name).map(|n| (arch, n)));
            }
        }
    }
    let candidates = arg_candidates(profile);
    let mut pairs = BTreeSet::new();
    for entry in profile["syscalls"].as_array().into_iter().flatten() {
        let indices: Vec<usize> = entry["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| u64_field(a, "index"))
            .map(|i| i as usize)
            .collect();
        for (n, &i) in indices.iter().enumerate() {
            pairs.extend(indices[n + 1..].iter().filter(|&&j| j != i).map(|&j| (i.min(j), i.max(j))));
        }
    }
    for &(arch, nr) in &conditional {
        for i in 0..6 {
            for &v in &candidates[i] {
                let mut args = [0u64; 6];
                args[i] = v;
                inputs.push((arch, nr, args));
            }
        }
        // Pairs, for the argument pairs that rules AND.
        for &(i, j) in &pairs {
            for &v in &candidates[i] {
                for &w in &candidates[j] {
                    let mut args = [0u64; 6];
                    (args[i], args[j]) = (v, w);
                    inputs.push((arch, nr, args));
                }
            }
        }
    }
    inputs
}

/// Compiles `profile` both ways and compares every verdict; returns (inputs compared,
/// libseccomp's program length, the agent's).
fn compare(label: &str, profile: &Value) -> (usize, usize, usize) {
    let oci: LinuxSeccomp = serde_json::from_value(profile.clone()).expect("an OCI seccomp profile");
    let (ours, theirs) = match (libseccomp_equivalent(&oci), libseccomp_program(profile)) {
        (Ok(ours), Ok(theirs)) => (ours, theirs),
        (Err(ours), Err(theirs)) => {
            eprintln!("{label}: both refuse it: agent: {ours}; {theirs}");
            return (0, 0, 0);
        }
        (ours, theirs) => {
            panic!("{label}: agent {:?}, libseccomp {:?}", ours.map(|p| p.len()), theirs.map(|p| p.len()))
        }
    };
    let inputs = corpus(profile);
    // The whole program: runc's stub in front of what libseccomp makes.
    let full = compile(&oci).expect("compiles with the stub");
    let mut diffs = Vec::new();
    for &(arch, nr, args) in &inputs {
        let (a, b) = (run(&ours, arch, nr, args), run(&theirs, arch, nr, args));
        if a != b {
            diffs.push(format!("arch {arch:#x} nr {nr:#x} args {args:x?}: agent {a:#x}, libseccomp {b:#x}"));
        }
        let want = if runc_stub_says_enosys(profile, arch, nr) { 0x0005_0000 | 38 } else { b };
        let got = run(&full, arch, nr, args);
        if got != want {
            diffs.push(format!(
                "with the stub: arch {arch:#x} nr {nr:#x} args {args:x?}: agent {got:#x}, runc {want:#x}"
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{label}: {} of {} inputs differ, first:\n{}",
        diffs.len(),
        inputs.len(),
        diffs[..diffs.len().min(20)].join("\n")
    );
    // Instructions executed for an x86_64 call, on average over the numbers 0-449.
    let mean =
        |prog: &[Insn]| (0..450).map(|nr| run_counted(prog, AUDIT_ARCH_X86_64, nr, [0; 6]).1).sum::<usize>() / 450;
    eprintln!(
        "{label}: {} inputs agree; libseccomp {} instructions ({} run per x86_64 call), agent {} (+{} of runc's stub; {} run)",
        inputs.len(),
        theirs.len(),
        mean(&theirs),
        ours.len(),
        full.len() - ours.len(),
        mean(&full),
    );
    (inputs.len(), theirs.len(), ours.len())
}

/// containerd's default profile as containerd 1.6.20 (this host's) writes it into a
/// container's spec for seccomp RuntimeDefault: with the default capabilities, and with
/// CAP_SYS_ADMIN, which swaps the masked clone rule and clone3's ENOSYS for plain rules
/// (testdata/, copied from real bundles; `_source` says which).
#[test]
fn containerd_default_profiles_match_libseccomp() {
    for (label, json) in [
        ("containerd 1.6.20 default", include_str!("testdata/containerd-1.6.20-default.json")),
        ("containerd 1.6.20 default, CAP_SYS_ADMIN", include_str!("testdata/containerd-1.6.20-default-sys-admin.json")),
    ] {
        let fixture: Value = serde_json::from_str(json).expect("fixture JSON");
        let profile = &fixture["seccomp"];
        assert_eq!(profile["defaultAction"], "SCMP_ACT_ERRNO", "{label}");
        let (inputs, theirs, ours) = compare(label, profile);
        assert!(
            inputs > 10_000 && theirs > 300 && ours > 300,
            "{label}: {inputs} inputs, {theirs}/{ours} instructions"
        );
    }
}

/// Hand-made profiles (testdata/edge-profiles.json) for what the default profile does not
/// exercise: every action, ERRNO and KILL defaults, errnos cut to 16 bits, three ABIs and
/// none listed, every comparison on 64-bit values, masks with high halves, conditions
/// ANDed and ORed, one index twice, unconditional and conditional rules of one call in
/// both orders, i386 socketcall/ipc, and profiles libseccomp refuses (the agent must too).
#[test]
fn edge_case_profiles_match_libseccomp() {
    let cases: Vec<Value> = serde_json::from_str(include_str!("testdata/edge-profiles.json")).expect("fixture JSON");
    let mut refused = 0;
    for case in &cases {
        let label = case["label"].as_str().expect("label");
        let (inputs, ..) = compare(label, &case["profile"]);
        refused += usize::from(inputs == 0);
        assert_eq!(inputs == 0, label.starts_with("refused"), "{label}");
    }
    assert_eq!((cases.len(), refused), (10, 3));
}

/// A generated profile as large as real ones: every x86_64, i386 and x32 name with one of
/// five actions in turn (deep search trees, leaves with several returns), and calls with
/// so many conditional rules that their blocks need long jumps.
#[test]
fn a_large_profile_matches_libseccomp() {
    let mut names: Vec<&str> = super::syscalls_x86_64::SYSCALLS.iter().map(|(n, _)| *n).collect();
    names.extend(super::syscalls_i386::SYSCALLS.iter().map(|(n, _)| *n));
    names.extend(super::syscalls_x32::SYSCALLS.iter().map(|(n, _)| *n));
    names.sort_unstable();
    names.dedup();
    let conditional = ["ioctl", "prctl", "fcntl"];
    let actions = [
        ("SCMP_ACT_ALLOW", 0),
        ("SCMP_ACT_ERRNO", 13),
        ("SCMP_ACT_TRAP", 0),
        ("SCMP_ACT_LOG", 0),
        ("SCMP_ACT_ERRNO", 1),
    ];
    let mut syscalls: Vec<Value> = names
        .iter()
        .filter(|n| !conditional.contains(n))
        .enumerate()
        .map(|(i, n)| {
            let (action, errno) = actions[i % actions.len()];
            serde_json::json!({"names": [n], "action": action, "errnoRet": errno})
        })
        .collect();
    for (c, name) in conditional.iter().enumerate() {
        // ioctl's block is longer than a short jump (60 rules of 5 instructions on x86_64).
        for v in 0..if c == 0 { 60u64 } else { 10 } {
            let value = if c == 0 { v } else { v << 32 | v };
            syscalls.push(serde_json::json!({"names": [name], "action": actions[(v as usize + c) % 4].0,
                "errnoRet": 13, "args": [{"index": c, "value": value, "op": "SCMP_CMP_EQ"}]}));
        }
    }
    let profile = serde_json::json!({"defaultAction": "SCMP_ACT_KILL_PROCESS",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"], "syscalls": syscalls});
    let (inputs, _, ours) = compare("large: every name, five actions, long blocks", &profile);
    assert!(inputs > 10_000 && ours > 1000, "{inputs} inputs, {ours} instructions");
}
