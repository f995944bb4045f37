//! The foundation: nestbox-vmm boots the real guest kernel on real KVM, the agent runs
//! as PID 1 and reports ready, and the guest's reboot ends the VMM with exit code 0.
//! One boot per vCPU count; the two run in parallel.

use nestbox_tests::{host_kernel_release, run_with_deadline, vmm_command, GUEST_DEADLINE};

fn boot_selftest(vcpus: u8) {
    let run = run_with_deadline(
        vmm_command(None).args(["--vcpus", &vcpus.to_string(), "--memory-mib", "128", "--cmdline", "nestbox.selftest"]),
        GUEST_DEADLINE,
    );
    let console = &run.stdout;
    let ready = console
        .lines()
        .find_map(|l| l.split_once(": ready, guest kernel ").map(|(_, release)| release.trim().to_string()))
        .unwrap_or_else(|| panic!("no ready line from the agent.\nconsole:\n{console}\nstderr:\n{}", run.stderr));
    assert!(ready.ends_with("-nestbox"), "guest kernel {ready:?} is not nestbox's");
    assert_ne!(ready, host_kernel_release(), "the guest must run its own kernel");
    assert!(console.contains("boot self-test passed"), "{console}");
    // The guest saw exactly the vCPUs it was given.
    let cpus_line = format!("Brought up 1 node, {vcpus} CPU");
    assert!(console.contains(&cpus_line), "no {cpus_line:?} in console:\n{console}");
    assert!(run.status.success(), "VMM exit {:?} after guest reboot; stderr:\n{}", run.status, run.stderr);
    eprintln!("{vcpus} vCPU(s): guest {ready} ready and rebooted in {:?}", run.elapsed);
}

#[test]
fn boots_to_agent_with_one_vcpu() {
    boot_selftest(1);
}

#[test]
fn boots_to_agent_with_two_vcpus() {
    boot_selftest(2);
}
