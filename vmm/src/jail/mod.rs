//! The jail a VMM puts itself in before it creates a thread or opens a device: a mount
//! namespace whose root holds only the files of this VM, a cgroup of its own with memory,
//! pids and CPU limits, an OOM score, no_new_privs and a capability set cut down to what
//! inline virtio-fs needs. Modelled on Firecracker's jailer, but run inside `nestbox-vmm`
//! itself (see docs/jail.md for why): `main` calls [`enter`] while the process is still
//! single-threaded, right after reading its settings.
//!
//! The root mirrors host paths: every file or directory the VM uses is bind-mounted at the
//! same path inside the new root, so the paths on the command line (and those the shim
//! hands over later, such as a snapshot directory inside the sandbox directory) mean the
//! same inside as outside, and the sockets the VMM creates appear where the shim expects
//! them.

mod cgroup;
mod error;
mod fs;

pub use cgroup::{Cgroup, CgroupLimits, CgroupVersion};
pub use error::JailError;
use error::{io_error, sys_error};
pub use fs::Bind;

use crate::config::{Console, VmConfig};
use caps::{CapSet, Capability, CapsHashSet};
use std::path::{Path, PathBuf};

/// Host memory the VMM process uses besides guest RAM (its binary, heap, thread stacks,
/// device buffers, page cache of the files it reads), added to the guest's size for the
/// cgroup's memory limit. Measured (docs/jail.md): the VMM's own memory is ~3 MiB beyond
/// the guest's pages, and the page cache it is charged for (kernel and initramfs at boot,
/// the template's memory file on restore) is reclaimable; whole cgroups of 256 MiB pods
/// peaked at 21-30 MiB while booting or restoring.
pub const VMM_OVERHEAD_MIB: u64 = 64;

/// Threads besides the vCPUs: main, the control API, one per device (vsock, virtio-fs,
/// net), with room for a device added later. A VMM never forks.
pub const NON_VCPU_THREADS: u32 = 8;

/// What inline virtio-fs needs (it creates files as the guest's users, changes owners and
/// modes, and reads files whatever their modes): every other capability is dropped from
/// all sets, the bounding set included.
pub const KEPT_CAPABILITIES: [Capability; 7] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
];

/// The jail's settings on the command line.
#[derive(clap::Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct JailArgs {
    /// Confine the VMM before it starts the VM: a mount namespace whose root holds only
    /// this VM's files (at their host paths) and /dev/kvm, no_new_privs, capabilities cut
    /// to CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER, FSETID, SETGID and SETUID, and a
    /// seccomp filter on every thread that kills the VMM on a system call it does not use.
    #[arg(long, verbatim_doc_comment)]
    pub jail: bool,
    /// With --jail: the VMM's cgroup, relative to the cgroup root (e.g. nestbox/<pod>).
    /// Created with a memory limit of guest memory + 64 MiB, --jail-pids-max and
    /// --jail-cpu-weight; removing it after the VMM has ended is up to the caller.
    /// cgroup v2 where /sys/fs/cgroup is cgroup2, else the v1 memory, pids and cpu
    /// controllers.
    #[arg(long, value_name = "PATH", requires = "jail", verbatim_doc_comment)]
    pub jail_cgroup: Option<String>,
    /// With --jail-cgroup: the most tasks (threads) the VMM may have. [default: vCPUs + 8]
    #[arg(long, value_name = "N", requires = "jail_cgroup")]
    pub jail_pids_max: Option<u32>,
    /// With --jail-cgroup: the cgroup v2 CPU weight, 1 to 10000 (on v1 the cpu.shares of
    /// the same proportion: 100 is 1024). [default: 100]
    #[arg(long, value_name = "WEIGHT", requires = "jail_cgroup", verbatim_doc_comment,
          value_parser = clap::value_parser!(u16).range(1..=10000))]
    pub jail_cpu_weight: Option<u16>,
    /// With --jail: the VMM's oom_score_adj, -1000 to 1000. Only raising works without
    /// CAP_SYS_RESOURCE: a value below the inherited one is an error.
    #[arg(long, value_name = "ADJ", requires = "jail", allow_negative_numbers = true, verbatim_doc_comment,
          value_parser = clap::value_parser!(i16).range(-1000..=1000))]
    pub jail_oom_score_adj: Option<i16>,
}

/// Everything [`enter`] does, worked out from the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPlan {
    pub binds: Vec<Bind>,
    pub cgroup: Option<Cgroup>,
    pub oom_score_adj: Option<i16>,
}

impl JailPlan {
    /// The jail of the VM `config` describes; `restore` is the snapshot it starts from,
    /// `api_socket` its control socket (whose directory also takes snapshots).
    pub fn new(args: &JailArgs, config: &VmConfig, restore: Option<&Path>, api_socket: Option<&Path>) -> JailPlan {
        let mut binds = vec![Bind::device(Path::new(crate::vstate::kvm::KVM_DEVICE))];
        match restore {
            Some(dir) => binds.push(Bind::read_only(dir)),
            None => binds.extend([Bind::read_only(&config.kernel), Bind::read_only(&config.initramfs)]),
        }
        // Sockets and the console log are created by the VMM: their directories are bound.
        let console = match &config.console {
            Console::File(path) => Some(path.as_path()),
            Console::Stdout => None,
        };
        for file in [console, config.vsock_socket.as_deref(), api_socket].into_iter().flatten() {
            binds.push(Bind::writable(&parent_of(file)));
        }
        if let Some(shared) = &config.shared_dir {
            binds.push(Bind::tree(shared));
        }
        let cgroup = args.jail_cgroup.as_ref().map(|path| Cgroup {
            path: path.clone(),
            limits: CgroupLimits {
                memory_bytes: (config.memory_mib + VMM_OVERHEAD_MIB) << 20,
                pids_max: args.jail_pids_max.unwrap_or(u32::from(config.vcpus) + NON_VCPU_THREADS),
                cpu_weight: args.jail_cpu_weight.unwrap_or(100),
            },
        });
        JailPlan { binds: fs::minimal(binds), cgroup, oom_score_adj: args.jail_oom_score_adj }
    }
}

fn parent_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Confines the calling process as `plan` says. Must run before any thread is started:
/// unshare(CLONE_NEWNS) and the capability sets apply to the calling thread only.
pub fn enter(plan: &JailPlan) -> Result<(), JailError> {
    if let Some(cgroup) = &plan.cgroup {
        cgroup.create_and_join(Path::new(cgroup::CGROUP_ROOT))?;
    }
    if let Some(adj) = plan.oom_score_adj {
        set_oom_score_adj(adj)?;
    }
    fs::pivot_into_new_root(&plan.binds)?;
    // Other processes of the same user and capabilities (another pod's VMM) must not
    // reach this one's memory or files through /proc/<pid> (the ptrace access check).
    nix::sys::prctl::set_dumpable(false).map_err(sys_error("PR_SET_DUMPABLE"))?;
    nix::sys::prctl::set_no_new_privs().map_err(sys_error("PR_SET_NO_NEW_PRIVS"))?;
    drop_capabilities()
}

fn set_oom_score_adj(adj: i16) -> Result<(), JailError> {
    const FILE: &str = "/proc/self/oom_score_adj";
    let current: i16 = std::fs::read_to_string(FILE)
        .map_err(io_error(FILE))?
        .trim()
        .parse()
        .map_err(|e| JailError::Invalid(format!("{FILE}: {e}")))?;
    if adj < current {
        return Err(JailError::Invalid(format!(
            "oom_score_adj {adj} is below the inherited {current}: lowering it needs CAP_SYS_RESOURCE"
        )));
    }
    std::fs::write(FILE, adj.to_string()).map_err(io_error(format!("writing {adj} to {FILE}")))
}

/// Drops every capability but [`KEPT_CAPABILITIES`] from the bounding, permitted,
/// effective, inheritable and ambient sets.
fn drop_capabilities() -> Result<(), JailError> {
    let kept: CapsHashSet = KEPT_CAPABILITIES.into_iter().collect();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    for cap in caps::read(None, CapSet::Bounding)? {
        if !kept.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    fn config(file: FileConfig) -> VmConfig {
        VmConfig::build(file, 4096).expect("valid config")
    }

    #[test]
    fn a_booted_vm_gets_its_kernel_read_only_and_its_socket_directories_writable() {
        let cfg = config(FileConfig {
            kernel: Some("/guest/vmlinux".into()),
            initramfs: Some("/guest/initramfs.cpio".into()),
            console: Some("/sb/pod/console.log".into()),
            vsock_socket: Some("/sb/pod/vsock.sock".into()),
            shared_dir: Some("/sb/pod/shared".into()),
            memory_mib: Some(256),
            vcpus: Some(2),
            ..FileConfig::default()
        });
        let args = JailArgs { jail: true, jail_cgroup: Some("nestbox/pod".into()), ..JailArgs::default() };
        let plan = JailPlan::new(&args, &cfg, None, Some(Path::new("/sb/pod/api.sock")));
        assert_eq!(
            plan.binds,
            vec![
                Bind::device(Path::new("/dev/kvm")),
                Bind::read_only(Path::new("/guest/initramfs.cpio")),
                Bind::read_only(Path::new("/guest/vmlinux")),
                // Without what is mounted in it (host-only trees), but with the shared one.
                Bind::writable(Path::new("/sb/pod")),
                Bind::tree(Path::new("/sb/pod/shared")),
            ]
        );
        let cgroup = plan.cgroup.expect("a cgroup");
        assert_eq!(cgroup.path, "nestbox/pod");
        assert_eq!(cgroup.limits, CgroupLimits { memory_bytes: (256 + 64) << 20, pids_max: 10, cpu_weight: 100 });
    }

    #[test]
    fn a_restored_vm_gets_its_snapshot_and_not_the_kernel() {
        let cfg = config(FileConfig { shared_dir: Some("/elsewhere/share".into()), ..FileConfig::default() });
        let plan = JailPlan::new(&JailArgs::default(), &cfg, Some(Path::new("/tpl/abc")), None);
        assert_eq!(
            plan.binds,
            vec![
                Bind::device(Path::new("/dev/kvm")),
                Bind::tree(Path::new("/elsewhere/share")),
                Bind::read_only(Path::new("/tpl/abc")),
            ]
        );
        assert_eq!(plan.cgroup, None);
    }
}
