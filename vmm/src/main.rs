//! `nestbox-vmm`: boots one microVM and exits when the guest does.

use anyhow::Context;
use clap::Parser;
use nestbox_vmm::arch::x86_64::cpuid::CpuTemplate;
use nestbox_vmm::config::{self, FileConfig, VmConfig};
use nestbox_vmm::jail::{self, JailArgs, JailPlan};
use nestbox_vmm::seccomp::{self, ThreadKind};
use nestbox_vmm::{api, build_and_start, restore_and_start, snapshot, RunOptions, VmExit};
use std::path::PathBuf;
use std::process::ExitCode;

/// Boots a nestbox microVM: KVM, PVH boot of an uncompressed vmlinux with an initramfs,
/// serial console. Exits 0 when the guest reboots or powers off, 1 on any error.
///
/// Every setting can come from a TOML file (`--config`) with the keys kernel, initramfs,
/// vcpus, memory_mib, cmdline, console, cpu_template, vsock_socket, vsock_cid,
/// shared_dir, fs_tag and net_mac; arguments override the file.
/// With no settings at all, the guest image installed by `guest-image/build.sh` boots
/// with 1 vCPU and 128 MiB.
#[derive(Parser, Debug)]
#[command(name = "nestbox-vmm", version, verbatim_doc_comment)]
struct Cli {
    /// TOML configuration file; unknown keys are errors.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Guest kernel: an uncompressed ELF vmlinux with PVH support.
    /// [default: $NESTBOX_GUEST_DIR/vmlinux, NESTBOX_GUEST_DIR defaults to /usr/local/share/nestbox]
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    kernel: Option<PathBuf>,
    /// Initramfs (cpio, uncompressed is fastest) whose /init is the guest's PID 1.
    /// [default: $NESTBOX_GUEST_DIR/initramfs.cpio]
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    initramfs: Option<PathBuf>,
    /// Number of vCPUs, 1 to 254. [default: 1]
    #[arg(long, value_name = "N")]
    vcpus: Option<u8>,
    /// Guest memory in MiB, at least 64 and at most the host's RAM. [default: 128]
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// Kernel parameters appended to nestbox's own (console, reboot, and those the CPU
    /// template needs). `nestbox.selftest` makes the agent reboot the VM once it is ready.
    #[arg(long, value_name = "PARAMS", verbatim_doc_comment)]
    cmdline: Option<String>,
    /// Where the serial console goes: `stdout` or a file path. [default: stdout]
    #[arg(long, value_name = "PATH")]
    console: Option<String>,
    /// CPU features to hide: `auto` picks `pvm` on software-nested KVM (kvm_pvm), which
    /// cannot run some instructions, and `none` elsewhere. [default: auto]
    #[arg(long, value_enum, value_name = "TEMPLATE", verbatim_doc_comment)]
    cpu_template: Option<CpuTemplate>,
    /// Host Unix socket of a hybrid vsock device: connect, write `CONNECT <port>\n`, read
    /// `OK <host-port>\n`, then talk to the guest's listener on <port>. Guest
    /// connections to CID 2 port P go to `<PATH>_P`. No vsock device without it.
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    vsock_socket: Option<PathBuf>,
    /// The guest's vsock CID. [default: 3]
    #[arg(long, value_name = "CID")]
    vsock_cid: Option<u64>,
    /// Host directory shared with the guest over virtio-fs (the guest mounts it with
    /// `mount -t virtiofs <tag> <dir>`). No virtio-fs device without it.
    #[arg(long, value_name = "DIR", verbatim_doc_comment)]
    shared_dir: Option<PathBuf>,
    /// The virtio-fs tag, 1 to 36 bytes. [default: nestbox]
    #[arg(long, value_name = "TAG")]
    fs_tag: Option<String>,
    /// A virtio-net device with this MAC (unicast, aa:bb:cc:dd:ee:ff), the guest's eth0.
    /// Detached (frames the guest sends are dropped) unless --net-tap-fd gives a tap.
    /// On --restore the device and MAC come from the snapshot.
    #[arg(long, value_name = "MAC", verbatim_doc_comment)]
    net_mac: Option<String>,
    /// An inherited tap descriptor for the net device: opened on /dev/net/tun with
    /// IFF_TAP | IFF_NO_PI | IFF_VNET_HDR (the VMM sets O_NONBLOCK, the 12-byte vnet
    /// header and the offloads the guest accepts). Needs --net-mac on boot; on
    /// --restore it attaches the tap to the snapshot's net device.
    #[arg(long, value_name = "FD", verbatim_doc_comment)]
    net_tap_fd: Option<i32>,
    /// Serve the control API on this Unix socket: one request line per connection
    /// (`pause`, `resume`, `snapshot DIR`, `shutdown`, `metrics`), answered `OK` (for
    /// `metrics`, `OK name=value ...`: the net device's counters) or `ERROR reason`.
    /// A snapshot ends the VMM once written.
    #[arg(long, value_name = "PATH", verbatim_doc_comment)]
    api_socket: Option<PathBuf>,
    /// Start from the snapshot in DIR instead of booting: vCPUs and memory come from the
    /// snapshot; devices (vsock socket, shared directory) from the other settings, and
    /// must be the same kinds as when it was taken. The net device and its MAC come
    /// from the snapshot; only its tap (--net-tap-fd) from the settings.
    #[arg(long, value_name = "DIR", verbatim_doc_comment)]
    restore: Option<PathBuf>,
    /// Print CLOCK_MONOTONIC timestamps of start-up milestones to stderr.
    #[arg(long)]
    boot_timestamps: bool,
    #[command(flatten)]
    jail: JailArgs,
}

impl Cli {
    fn settings(&self) -> FileConfig {
        FileConfig {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            cmdline: self.cmdline.clone(),
            console: self.console.clone(),
            cpu_template: self.cpu_template,
            vsock_socket: self.vsock_socket.clone(),
            vsock_cid: self.vsock_cid,
            shared_dir: self.shared_dir.clone(),
            fs_tag: self.fs_tag.clone(),
            net_mac: self.net_mac.clone(),
            net_tap_fd: self.net_tap_fd,
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<VmExit> {
    let file = match &cli.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let host_memory = config::host_memory_mib().context("reading the host's memory size")?;
    let mut settings = file.merge(cli.settings());
    let options = RunOptions { boot_timestamps: cli.boot_timestamps };
    let (mut config, state) = match &cli.restore {
        None => (VmConfig::build(settings, host_memory)?, None),
        Some(dir) => {
            let state = snapshot::read_state(dir)?;
            settings.vcpus.get_or_insert(state.vcpus.len().try_into().unwrap_or(u8::MAX));
            settings.memory_mib.get_or_insert(state.memory_mib);
            state.apply_devices(dir, &mut settings)?;
            (VmConfig::build(settings, host_memory)?, Some(state))
        }
    };
    if cli.jail.jail {
        // Whether KVM is software-nested is read from /sys, which the jail does not have.
        config.cpu_template = config.cpu_template.resolve();
        let plan = JailPlan::new(&cli.jail, &config, cli.restore.as_deref(), cli.api_socket.as_deref());
        // Before the jail: the diagnostic mode's log file is outside it.
        let mode = seccomp_mode()?;
        jail::enter(&plan)?;
        // From here on each thread installs its filter once set up.
        seccomp::enable(mode)?;
    }
    let mut vmm = match (&cli.restore, state) {
        (Some(dir), Some(state)) => restore_and_start(&config, dir, state, options)?,
        _ => build_and_start(&config, options)?,
    };
    if let Some(path) = &cli.api_socket {
        api::serve(path, vmm.control()).with_context(|| format!("control API socket {}", path.display()))?;
        vmm.remove_on_exit(path.clone());
    }
    seccomp::install(ThreadKind::Main)?;
    Ok(vmm.wait())
}

/// NESTBOX_VMM_SECCOMP=log: the diagnostic mode of the filters (seccomp::Mode::Log).
fn seccomp_mode() -> anyhow::Result<seccomp::Mode> {
    match std::env::var("NESTBOX_VMM_SECCOMP").as_deref() {
        Err(_) | Ok("") | Ok("kill") => Ok(seccomp::Mode::Kill),
        Ok("log") => {
            let file = match std::env::var_os("NESTBOX_VMM_SECCOMP_LOG") {
                None => None,
                Some(path) => Some(std::sync::Arc::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .with_context(|| format!("NESTBOX_VMM_SECCOMP_LOG {path:?}"))?,
                )),
            };
            Ok(seccomp::Mode::Log(file))
        }
        Ok(other) => anyhow::bail!("NESTBOX_VMM_SECCOMP={other:?}: expected kill or log"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(VmExit::Reset) | Ok(VmExit::PowerOff) | Ok(VmExit::Stopped) => ExitCode::SUCCESS,
        Ok(VmExit::TripleFault { vcpu }) => {
            eprintln!("nestbox-vmm: error: the guest crashed (triple fault on vCPU {vcpu})");
            ExitCode::FAILURE
        }
        Ok(VmExit::Error(reason)) => {
            eprintln!("nestbox-vmm: error: {reason}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("nestbox-vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
