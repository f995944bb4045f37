use super::bpf::{AND_K, JA, JEQ_K, JGE_K, JGT_K, JSET_K, LD_W_ABS, RET_K};
use super::*;

/// A classic-BPF interpreter for seccomp programs: what `compile` emits and what
/// libseccomp exports (loads, scratch memory, ALU, jumps, returns). Panics on anything
/// else, on a read past `seccomp_data` and on running off the end.
pub(super) fn run(prog: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
    run_counted(prog, arch, nr, args).0
}

/// `run`, also counting the instructions executed.
pub(super) fn run_counted(prog: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> (u32, usize) {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_le_bytes());
    data[4..8].copy_from_slice(&arch.to_le_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
    }
    let (mut pc, mut a, mut x, mut mem) = (0usize, 0u32, 0u32, [0u32; 16]);
    for steps in 1.. {
        let insn = prog[pc];
        pc += 1;
        let class = u32::from(insn.code) & 0x07;
        let src = if u32::from(insn.code) & libc::BPF_X != 0 { x } else { insn.k };
        match class {
            libc::BPF_LD | libc::BPF_LDX => {
                let v = match u32::from(insn.code) & 0xe0 {
                    libc::BPF_ABS => {
                        assert_eq!(u32::from(insn.code) & 0x18, libc::BPF_W, "only word loads");
                        let k = insn.k as usize;
                        u32::from_le_bytes(data[k..k + 4].try_into().expect("a load inside seccomp_data"))
                    }
                    libc::BPF_IMM => insn.k,
                    libc::BPF_MEM => mem[insn.k as usize],
                    other => panic!("unexpected load mode {other:#x}"),
                };
                if class == libc::BPF_LD {
                    a = v
                } else {
                    x = v
                }
            }
            libc::BPF_ST => mem[insn.k as usize] = a,
            libc::BPF_STX => mem[insn.k as usize] = x,
            libc::BPF_ALU => {
                a = match u32::from(insn.code) & 0xf0 {
                    libc::BPF_ADD => a.wrapping_add(src),
                    libc::BPF_SUB => a.wrapping_sub(src),
                    libc::BPF_AND => a & src,
                    libc::BPF_OR => a | src,
                    libc::BPF_XOR => a ^ src,
                    libc::BPF_LSH => a << (src & 31),
                    libc::BPF_RSH => a >> (src & 31),
                    libc::BPF_NEG => a.wrapping_neg(),
                    other => panic!("unexpected ALU op {other:#x}"),
                }
            }
            libc::BPF_JMP => {
                let cond = match u32::from(insn.code) & 0xf0 {
                    libc::BPF_JA => {
                        pc += insn.k as usize;
                        continue;
                    }
                    libc::BPF_JEQ => a == src,
                    libc::BPF_JGT => a > src,
                    libc::BPF_JGE => a >= src,
                    libc::BPF_JSET => a & src != 0,
                    other => panic!("unexpected jump {other:#x}"),
                };
                pc += usize::from(if cond { insn.jt } else { insn.jf });
            }
            libc::BPF_RET => return (if u32::from(insn.code) & 0x18 == libc::BPF_A { a } else { insn.k }, steps),
            libc::BPF_MISC => {
                if u32::from(insn.code) & 0xf8 == libc::BPF_TAX {
                    x = a
                } else {
                    a = x
                }
            }
            other => panic!("unexpected class {other:#x}"),
        }
    }
    unreachable!("the loop returns")
}

fn profile(json: &str) -> LinuxSeccomp {
    serde_json::from_str(json).expect("profile JSON")
}

const ALLOW: u32 = RET_ALLOW;
const DENY: u32 = RET_ERRNO | EPERM;

fn nr(name: &str) -> u32 {
    Abi::X86_64.number(name).expect("a known call")
}

#[test]
fn names_actions_and_default() {
    let p = profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
            "syscalls":[{"names":["mkdir","mkdirat","no_such_call"],"action":"SCMP_ACT_ERRNO"},
                        {"names":["getpid"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
                        {"names":["kill"],"action":"SCMP_ACT_KILL_PROCESS"},
                        {"names":["tkill"],"action":"SCMP_ACT_KILL"}]}"#,
    );
    let prog = compile(&p).expect("compiles");
    let x86_64 = |name| run(&prog, AUDIT_ARCH_X86_64, nr(name), [0; 6]);
    assert_eq!(x86_64("mkdir"), DENY);
    assert_eq!(x86_64("mkdirat"), DENY);
    assert_eq!(x86_64("getpid"), RET_ERRNO | 38);
    assert_eq!(x86_64("kill"), RET_KILL_PROCESS);
    assert_eq!(x86_64("tkill"), RET_KILL_THREAD);
    assert_eq!(x86_64("read"), ALLOW);
    // i386 is listed: its own numbers (mkdir is 39 there, 83 on x86_64).
    let i386 = |name| run(&prog, AUDIT_ARCH_I386, Abi::I386.number(name).expect("i386 call"), [0; 6]);
    assert_eq!(i386("mkdir"), DENY);
    assert_eq!(i386("getpid"), RET_ERRNO | 38);
    assert_eq!(run(&prog, AUDIT_ARCH_I386, nr("mkdir"), [0; 6]), ALLOW, "x86_64's mkdir number is another i386 call");
    // x32 is not listed: its calls are killed, as libseccomp's bad-arch action does.
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, nr("read") | X32_SYSCALL_BIT, [0; 6]), RET_KILL_THREAD);
    assert_eq!(run(&prog, 0xc000_00b7, nr("read"), [0; 6]), RET_KILL_THREAD, "aarch64 is not in the filter");
}

#[test]
fn architectures_follow_the_profile() {
    let p = profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X32"],
            "syscalls":[{"names":["read","rt_sigaction","socketcall"],"action":"SCMP_ACT_ALLOW"}]}"#,
    );
    let prog = compile(&p).expect("compiles");
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, 0, [0; 6]), ALLOW, "x86_64 is always in (native)");
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, [0; 6]), ALLOW, "x32 read");
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 512, [0; 6]), ALLOW, "x32 rt_sigaction");
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | 13, [0; 6]), DENY, "x86_64's rt_sigaction on x32");
    assert_eq!(run(&prog, AUDIT_ARCH_I386, 3, [0; 6]), RET_KILL_THREAD, "i386 is not listed");
    // No architectures at all: x86_64 alone.
    let p = profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_TRAP"}]}"#);
    let prog = compile(&p).expect("compiles");
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, 0, [0; 6]), RET_TRAP);
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT, [0; 6]), RET_KILL_THREAD);
    assert_eq!(run(&prog, AUDIT_ARCH_I386, 3, [0; 6]), RET_KILL_THREAD);
}

#[test]
fn argument_comparisons_are_64_bit() {
    let big = 0x1_0000_0005u64;
    for (op, value, cases) in [
        ("SCMP_CMP_EQ", big, vec![(big, true), (5, false), (big + 1, false)]),
        ("SCMP_CMP_NE", big, vec![(big, false), (5, true), (0x2_0000_0005, true)]),
        ("SCMP_CMP_GT", big, vec![(big, false), (big + 1, true), (0x2_0000_0000, true), (0xffff_ffff, false)]),
        ("SCMP_CMP_GE", big, vec![(big, true), (big - 1, false), (0x2_0000_0000, true), (6, false)]),
        ("SCMP_CMP_LT", big, vec![(big, false), (big - 1, true), (0xffff_ffff, true), (0x2_0000_0000, false)]),
        ("SCMP_CMP_LE", big, vec![(big, true), (big + 1, false), (0, true), (0x1_0000_0006, false)]),
    ] {
        let p = profile(&format!(
            r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["personality"],
                "action":"SCMP_ACT_ERRNO","args":[{{"index":1,"value":{value},"op":"{op}"}}]}}]}}"#
        ));
        let prog = compile(&p).expect("compiles");
        for (arg, denied) in cases {
            let got = run(&prog, AUDIT_ARCH_X86_64, nr("personality"), [0, arg, 0, 0, 0, 0]);
            assert_eq!(got == DENY, denied, "{op} {value:#x} against {arg:#x}");
        }
    }
    // Masked equality, and two conditions that must both hold.
    let p = profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["clone"],"action":"SCMP_ACT_ALLOW",
            "args":[{"index":0,"value":2114060288,"valueTwo":0,"op":"SCMP_CMP_MASKED_EQ"},
                    {"index":2,"value":7,"op":"SCMP_CMP_EQ"}]}]}"#,
    );
    let prog = compile(&p).expect("compiles");
    let clone = nr("clone");
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, clone, [0x11, 0, 7, 0, 0, 0]), ALLOW);
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, clone, [0x1000_0000, 0, 7, 0, 0, 0]), DENY, "CLONE_NEWUSER");
    assert_eq!(run(&prog, AUDIT_ARCH_X86_64, clone, [0x11, 0, 8, 0, 0, 0]), DENY);
}

#[test]
fn rules_merge_as_in_libseccomp() {
    // An unconditional rule wins over conditional ones of the same call, before or after;
    // the first unconditional rule wins over later ones; conditions on one argument index
    // become separate rules (ORed), as runc adds them.
    let p = profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[
            {"names":["read"],"action":"SCMP_ACT_ERRNO","errnoRet":5,"args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"}]},
            {"names":["read","write"],"action":"SCMP_ACT_ERRNO","errnoRet":6},
            {"names":["write"],"action":"SCMP_ACT_ERRNO","errnoRet":7},
            {"names":["write"],"action":"SCMP_ACT_ERRNO","errnoRet":8,"args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"}]},
            {"names":["close"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":3,"op":"SCMP_CMP_EQ"},
                                                                {"index":0,"value":4,"op":"SCMP_CMP_EQ"}]},
            {"names":["getpid"],"action":"SCMP_ACT_ALLOW"}]}"#,
    );
    let prog = compile(&p).expect("compiles");
    let call = |name, arg0| run(&prog, AUDIT_ARCH_X86_64, nr(name), [arg0, 0, 0, 0, 0, 0]);
    assert_eq!(call("read", 1), RET_ERRNO | 6);
    assert_eq!(call("read", 2), RET_ERRNO | 6);
    assert_eq!(call("write", 1), RET_ERRNO | 6);
    assert_eq!(call("close", 3), DENY);
    assert_eq!(call("close", 4), DENY);
    assert_eq!(call("close", 5), ALLOW);
    assert_eq!(call("getpid", 0), ALLOW);
}

#[test]
fn i386_compares_low_halves_and_multiplexes_sockets() {
    let p = profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86"],"syscalls":[
            {"names":["personality"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
            {"names":["socket","accept"],"action":"SCMP_ACT_ERRNO"}]}"#,
    );
    let prog = compile(&p).expect("compiles");
    let i386 = |name, args| run(&prog, AUDIT_ARCH_I386, Abi::I386.number(name).expect("i386 call"), args);
    assert_eq!(i386("personality", [8, 0, 0, 0, 0, 0]), DENY);
    assert_eq!(i386("personality", [0x1_0000_0008, 0, 0, 0, 0, 0]), DENY, "the high half does not count");
    assert_eq!(i386("personality", [9, 0, 0, 0, 0, 0]), ALLOW);
    assert_eq!(i386("socket", [0; 6]), DENY, "the direct call");
    assert_eq!(i386("socketcall", [1, 0, 0, 0, 0, 0]), DENY, "SYS_SOCKET");
    assert_eq!(i386("socketcall", [5, 0, 0, 0, 0, 0]), DENY, "SYS_ACCEPT");
    assert_eq!(i386("socketcall", [2, 0, 0, 0, 0, 0]), ALLOW, "SYS_BIND");
}

#[test]
fn unsupported_profiles_are_errors() {
    let notify = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
    assert!(matches!(compile(&notify), Err(SeccompError::Action(_))));
    let bad_index = profile(
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO",
            "args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
    );
    assert_eq!(compile(&bad_index), Err(SeccompError::ArgIndex(6)));
    // libseccomp refuses errnos from 4095 (MAX_ERRNO) on, after runc's cut to 16 bits.
    let errno = |e: u32| profile(&format!(r#"{{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":{e}}}"#));
    assert_eq!(compile(&errno(4095)), Err(SeccompError::Errno(4095)));
    assert_eq!(compile(&errno(70000)), Err(SeccompError::Errno(70000)), "70000 is 4464 in 16 bits");
    assert!(compile(&errno(4094)).is_ok());
    assert!(compile(&errno(65537)).is_ok(), "65537 is 1 in 16 bits");
    // Architectures an x86_64 kernel never reports are accepted and have no rules.
    let arm = profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_AARCH64"]}"#);
    let prog = compile(&arm).expect("compiles");
    assert_eq!(run(&prog, 0xc000_00b7, 0, [0; 6]), RET_KILL_THREAD);
    assert_eq!(nr("read"), 0);
    assert_eq!(nr("openat2"), 437);
    // The program uses only what the interpreter knows (and the kernel checks).
    assert!(prog.iter().all(|i| [LD_W_ABS, JEQ_K, JGT_K, JGE_K, JSET_K, AND_K, RET_K, JA].contains(&i.code)));
}

#[test]
fn numbers_above_the_profiles_highest_get_enosys_as_under_runc() {
    let p = profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
            "syscalls":[{"names":["read","openat2"],"action":"SCMP_ACT_ALLOW"},
                        {"names":["mkdir"],"action":"SCMP_ACT_KILL"}]}"#,
    );
    let prog = compile(&p).expect("compiles");
    let enosys = RET_ERRNO | 38;
    let x86_64 = |nr| run(&prog, AUDIT_ARCH_X86_64, nr, [0; 6]);
    assert_eq!(x86_64(nr("openat2")), ALLOW);
    assert_eq!(x86_64(nr("openat2") - 1), DENY, "below the highest: the default");
    assert_eq!(x86_64(nr("openat2") + 1), enosys);
    assert_eq!(x86_64(nr("mkdir")), RET_KILL_THREAD);
    assert_eq!(x86_64(X32_SYSCALL_BIT), RET_KILL_THREAD, "x32 is not listed: no stub, bad arch");
    let i386_openat2 = Abi::I386.number("openat2").expect("i386 openat2");
    assert_eq!(run(&prog, AUDIT_ARCH_I386, i386_openat2 + 1, [0; 6]), enosys);
    assert_eq!(run(&prog, AUDIT_ARCH_I386, 1, [0; 6]), DENY);
    // SCMP_ARCH_NATIVE stands for x86_64.
    let native = profile(
        r#"{"defaultAction":"SCMP_ACT_ERRNO","architectures":["SCMP_ARCH_NATIVE"],
            "syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}"#,
    );
    assert_eq!(run(&compile(&native).expect("compiles"), AUDIT_ARCH_X86_64, 1, [0; 6]), enosys);
    // A default that lets calls through gets no stub.
    let allow =
        profile(r#"{"defaultAction":"SCMP_ACT_LOG","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO"}]}"#);
    assert_eq!(compile(&allow), libseccomp_equivalent(&allow));
}
