use super::*;

#[test]
fn every_kind_builds_in_both_modes() {
    for kind in ThreadKind::ALL {
        for mode in [Mode::Kill, Mode::Log(None)] {
            let program = build(kind, &mode).unwrap_or_else(|e| panic!("{kind:?} {mode:?}: {e}"));
            assert!(!program.is_empty(), "{kind:?}");
        }
    }
}

#[test]
fn no_kind_allows_the_self_test_call_and_only_some_may_create_threads() {
    for kind in ThreadKind::ALL {
        let rules = syscalls::rules(kind).expect("rules");
        assert!(!rules.contains_key(&syscalls::FORBIDDEN), "{kind:?} allows the self-test's call");
        let spawns = rules.contains_key(&libc::SYS_clone3) || rules.contains_key(&libc::SYS_clone);
        assert_eq!(spawns, kind == ThreadKind::Launcher, "{kind:?}");
        // Nothing that would undo the jail.
        for nr in [libc::SYS_mount, libc::SYS_pivot_root, libc::SYS_unshare, libc::SYS_setns, libc::SYS_ptrace] {
            assert!(!rules.contains_key(&nr), "{kind:?} allows {nr}");
        }
        // CAP_DAC_READ_SEARCH is kept for virtio-fs: open_by_handle_at would reach any
        // file of a bound file system by its handle.
        assert!(!rules.contains_key(&libc::SYS_open_by_handle_at), "{kind:?}");
    }
    let vcpu = syscalls::rules(ThreadKind::Vcpu).expect("rules");
    assert!(!vcpu.contains_key(&libc::SYS_openat) && !vcpu.contains_key(&libc::SYS_socket), "vCPUs open nothing");
}

/// Runs `child` in a forked process and returns how it ended (its wait status).
fn in_child(child: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs only async-signal-safe calls (prctl, seccomp, syscall, _exit):
    // the filter is built in the parent, and applying it does not allocate.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork");
        if pid == 0 {
            libc::_exit(child());
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        status
    }
}

#[test]
fn a_forbidden_call_kills_the_process_with_sigsys() {
    let program = build(ThreadKind::Api, &Mode::Kill).expect("filter");
    let status = in_child(|| {
        if seccompiler::apply_filter(&program).is_err() {
            return 2;
        }
        // Allowed: getpid. Then the forbidden one, which must not return.
        // SAFETY: plain system calls without memory arguments.
        unsafe { libc::syscall(libc::SYS_getpid) };
        forbidden_syscall();
        3
    });
    assert!(libc::WIFSIGNALED(status), "the child ended with status {status:#x}, not a signal");
    assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
}

#[test]
fn kvm_ioctls_pass_the_vcpu_filter_and_others_do_not() {
    let program = build(ThreadKind::Vcpu, &Mode::Kill).expect("filter");
    let run = |request: u64| {
        in_child(|| {
            if seccompiler::apply_filter(&program).is_err() {
                return 2;
            }
            // SAFETY: an ioctl on a descriptor that is not open: EBADF if allowed.
            unsafe { libc::ioctl(-1, request as _, 0) };
            0
        })
    };
    assert_eq!(run(0xAE80), 0, "KVM_RUN passes");
    let tun = run(0x400454d0);
    assert!(libc::WIFSIGNALED(tun) && libc::WTERMSIG(tun) == libc::SIGSYS, "TUNSETOFFLOAD kills a vCPU: {tun:#x}");
}
