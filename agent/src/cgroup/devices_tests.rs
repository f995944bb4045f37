use super::*;
use oci_spec::runtime::LinuxDeviceCgroupBuilder;

impl Rule {
    fn matches(&self, kind: u32, major: u32, minor: u32) -> bool {
        self.kind.is_none_or(|k| k == kind)
            && (self.kind.is_none() || self.major.is_none_or(|m| m == major) && self.minor.is_none_or(|m| m == minor))
    }
}

/// The reference the program must agree with: per requested access, the last rule that
/// names it and matches the device decides; none: denied.
fn decide(rules: &[Rule], kind: u32, major: u32, minor: u32, access: u8) -> bool {
    [MKNOD, READ, WRITE].into_iter().filter(|bit| access & bit != 0).all(|bit| {
        rules.iter().rev().find(|r| r.access & bit != 0 && r.matches(kind, major, minor)).is_some_and(|r| r.allow)
    })
}

/// Runs a device program on one request, as the kernel would: an interpreter of the few
/// instructions [`program`] emits.
fn run(program: &[Insn], kind: u32, major: u32, minor: u32, access: u8) -> u64 {
    let ctx = [(u32::from(access) << 16) | kind, major, minor];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    for _ in 0..10_000 {
        let i = program[pc];
        let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
        let jump = |taken: bool| if taken { i.off as isize } else { 0 };
        let mut delta = 0isize;
        match i.code {
            LDX_W => {
                assert_eq!(src, 1, "loads only from the context");
                r[dst] = u64::from(ctx[i.off as usize / 4]);
            }
            MOV64_X => r[dst] = r[src],
            MOV64_K => r[dst] = i.imm as i64 as u64,
            AND64_K => r[dst] &= i.imm as i64 as u64,
            RSH64_K => r[dst] >>= i.imm,
            JSET_K => delta = jump(r[dst] & (i.imm as i64 as u64) != 0),
            JNE32_K => delta = jump(r[dst] as u32 != i.imm as u32),
            JA => delta = i.off as isize,
            EXIT => return r[0],
            code => panic!("unexpected opcode {code:#x} at {pc}"),
        }
        pc = (pc as isize + 1 + delta) as usize;
    }
    panic!("the program did not end")
}

fn rule(allow: bool, typ: LinuxDeviceType, major: Option<i64>, minor: Option<i64>, access: &str) -> LinuxDeviceCgroup {
    LinuxDeviceCgroupBuilder::default()
        .allow(allow)
        .typ(typ)
        .major(major.unwrap_or(-1))
        .minor(minor.unwrap_or(-1))
        .access(access)
        .build()
        .expect("rule")
}

/// containerd's default: deny everything, then the standard devices.
fn containerd_default() -> Vec<LinuxDeviceCgroup> {
    let mut spec = vec![rule(false, LinuxDeviceType::A, None, None, "rwm")];
    for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (10, 200)] {
        spec.push(rule(true, LinuxDeviceType::C, Some(major), Some(minor), "rwm"));
    }
    spec.push(rule(true, LinuxDeviceType::C, Some(136), None, "rwm"));
    spec
}

const ALL: u8 = MKNOD | READ | WRITE;

/// Every request kind over a set of devices: program and reference agree.
fn agree(rules: &[Rule]) {
    let program = program(rules).expect("program");
    for kind in [BLOCK, CHAR] {
        for (major, minor) in [(1, 3), (1, 4), (5, 2), (8, 0), (8, 1), (10, 200), (136, 7), (u32::MAX, 0)] {
            for access in 1..=ALL {
                let want = decide(rules, kind, major, minor, access);
                let got = run(&program, kind, major, minor, access);
                assert_eq!(got, u64::from(want), "kind {kind} {major}:{minor} access {access:#b} rules {rules:?}");
            }
        }
    }
}

#[test]
fn containerd_default_allows_only_the_standard_devices() {
    let rules = super::rules(&containerd_default()).expect("rules");
    agree(&rules);
    assert!(decide(&rules, CHAR, 1, 3, READ | WRITE), "/dev/null");
    assert!(decide(&rules, CHAR, 136, 4, READ | WRITE), "a pts terminal");
    assert!(decide(&rules, BLOCK, 8, 0, MKNOD), "runc's default allows mknod");
    assert!(!decide(&rules, BLOCK, 8, 0, READ), "the disk is not readable");
    assert!(!decide(&rules, BLOCK, 8, 0, MKNOD | READ));
    assert!(!decide(&rules, CHAR, 1, 1, WRITE), "/dev/mem");
}

#[test]
fn later_rules_override_earlier_ones_access_by_access() {
    let spec = [
        rule(true, LinuxDeviceType::A, None, None, "rwm"),
        rule(false, LinuxDeviceType::B, Some(8), None, "rw"),
        rule(true, LinuxDeviceType::B, Some(8), Some(1), "r"),
    ];
    let ruled = rules(&spec).expect("rules");
    agree(&ruled);
    assert!(decide(&ruled, BLOCK, 8, 1, READ));
    assert!(!decide(&ruled, BLOCK, 8, 1, READ | WRITE), "write stays denied by the earlier rule");
    assert!(!decide(&ruled, BLOCK, 8, 0, READ));
    assert!(decide(&ruled, BLOCK, 8, 0, MKNOD), "mknod was never denied");
    assert!(decide(&ruled, CHAR, 8, 0, READ | WRITE), "type b rules leave char devices alone");
    // Privileged: everything, even after denials.
    let privileged = rules(&[spec[1].clone(), rule(true, LinuxDeviceType::A, None, None, "rwm")]).expect("rules");
    agree(&privileged);
    assert!(decide(&privileged, BLOCK, 8, 0, ALL));
}

#[test]
fn no_rules_and_a_deny_all_at_the_end() {
    let rules_none = rules(&[]).expect("rules");
    agree(&rules_none);
    assert!(!decide(&rules_none, CHAR, 10, 200, READ));
    // A spec rule cannot take away the defaults appended after it.
    let mut deny_all = DEFAULTS.to_vec();
    deny_all.push(Rule { allow: false, kind: None, major: None, minor: None, access: ALL });
    agree(&deny_all);
    assert!(!decide(&deny_all, CHAR, 1, 3, READ));
    assert_eq!(program(&deny_all).expect("program").len(), 6 + 3 * 4 + 2, "nothing after the universal rule");
}

#[test]
fn bad_rules_are_named_errors() {
    let e = rules(&[rule(true, LinuxDeviceType::C, Some(1), Some(3), "rwx")]).expect_err("bad access");
    assert!(e.contains("unknown access 'x'"), "{e}");
    let e = rules(&[rule(true, LinuxDeviceType::C, Some(1 << 33), Some(3), "r")]).expect_err("bad major");
    assert!(e.contains("out of range"), "{e}");
    // Pipes are no devices; no access means all three.
    let parsed = rules(&[rule(true, LinuxDeviceType::P, None, None, "r"), {
        let mut r = rule(true, LinuxDeviceType::C, Some(10), Some(200), "");
        r.set_access(None);
        r
    }])
    .expect("rules");
    assert_eq!(parsed.len(), 1 + DEFAULTS.len());
    assert_eq!(parsed[0].access, ALL);
}

/// The kernel's verifier accepts the programs (the tests run as root).
#[test]
fn the_kernel_loads_the_programs() {
    for spec in [containerd_default(), vec![], vec![rule(true, LinuxDeviceType::A, None, None, "rwm")]] {
        let program = program(&rules(&spec).expect("rules")).expect("program");
        load(&program).unwrap_or_else(|e| panic!("{e}"));
    }
}
