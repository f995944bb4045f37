//! From a validated configuration to a running VM, in one readable pass:
//! KVM → guest memory → VM with irqchip and PIT → devices → guest loaded → vCPUs.

use crate::arch::x86_64::cpuid::{self, CpuTemplate};
use crate::arch::x86_64::{boot, layout};
use crate::config::{Console, VmConfig};
use crate::devices::bus::{Bus, SharedDevice};
use crate::devices::legacy::{i8042, serial, SerialConsole, I8042};
use crate::devices::virtio::fs::{FsDevice, FsError};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use crate::devices::virtio::vsock::{device::VsockError, VsockDevice};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::machine::{VmEvent, Vmm};
use crate::snapshot::{self, state::MicrovmState, SnapshotError};
use crate::vstate::vcpu::{install_kick_handler, Vcpu, VcpuError, VmExit};
use crate::vstate::{kvm, memory, vm};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{IoEventAddress, VmFd};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    #[error("vcpus = {requested}: this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("console {path}: {source}")]
    Console { path: PathBuf, source: std::io::Error },
    #[error("serial interrupt: {0}")]
    SerialIrq(std::io::Error),
    #[error(transparent)]
    Bus(#[from] crate::devices::bus::BusOverlap),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("virtio device setup: {0}")]
    Virtio(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    FileMemory(#[from] memory::FileMemoryError),
    #[error("control API socket {path}: {source}")]
    Api { path: PathBuf, source: std::io::Error },
    #[error("too many virtio devices: {} interrupt lines are available", layout::VIRTIO_IRQ_LAST - layout::VIRTIO_IRQ_FIRST + 1)]
    TooManyDevices,
}

/// Options that change how the VMM reports or is driven, not what the guest is.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Print CLOCK_MONOTONIC timestamps of start-up milestones to stderr (benchmarks).
    pub boot_timestamps: bool,
    /// Serve the control API (pause, resume, snapshot, shutdown) on this Unix socket.
    pub api_socket: Option<PathBuf>,
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes, unlike `Instant`.
pub fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn open_console(console: &Console) -> Result<Box<dyn Write + Send>, BuildError> {
    // A file descriptor, not the buffered `Stdout`: every byte the guest sends is out
    // at once, even when the VMM exits right after the guest's last line.
    let file = match console {
        Console::Stdout => std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .map_err(|source| BuildError::Console { path: "stdout".into(), source })?,
        Console::File(path) => {
            File::create(path).map_err(|source| BuildError::Console { path: path.clone(), source })?
        }
    };
    Ok(Box::new(file))
}

/// Builds the VM described by `config`, boots its kernel and starts its vCPUs.
pub fn build_and_start(config: &VmConfig, options: RunOptions) -> Result<Vmm, BuildError> {
    assemble(config, None, options)
}

/// Builds a VM from the snapshot in `dir`, whose state file holds `state` (devices as
/// `config` gives them: their host paths are the new sandbox's), and starts its vCPUs
/// where the snapshot stopped them.
pub fn restore_and_start(
    config: &VmConfig,
    dir: &Path,
    state: MicrovmState,
    options: RunOptions,
) -> Result<Vmm, BuildError> {
    let mismatch = |reason: String| SnapshotError::Mismatch { path: dir.to_path_buf(), reason };
    if state.vcpus.len() != usize::from(config.vcpus) {
        return Err(mismatch(format!("it has {} vCPUs, the configuration {}", state.vcpus.len(), config.vcpus)).into());
    }
    if state.memory_mib != config.memory_mib {
        return Err(
            mismatch(format!("it has {} MiB, the configuration {}", state.memory_mib, config.memory_mib)).into()
        );
    }
    assemble(config, Some((dir, state)), options)
}

fn assemble(
    config: &VmConfig,
    snapshot: Option<(&Path, MicrovmState)>,
    options: RunOptions,
) -> Result<Vmm, BuildError> {
    let kvm = kvm::open()?;
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(config.vcpus) > max_vcpus {
        return Err(BuildError::TooManyVcpus { requested: config.vcpus, max: max_vcpus });
    }
    let template: CpuTemplate = config.cpu_template.resolve();
    let supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(BuildError::SupportedCpuid)?;
    let vendor = format!("{:?}", cpuid::vendor(supported_cpuid.as_slice()));
    if let Some((dir, state)) = &snapshot {
        if state.cpu_vendor != vendor || state.cpu_template != template {
            let reason = format!(
                "taken on a {} CPU with template {:?}, this host is {vendor} with {template:?}",
                state.cpu_vendor, state.cpu_template
            );
            return Err(SnapshotError::Mismatch { path: dir.to_path_buf(), reason }.into());
        }
    }

    let guest_memory = match &snapshot {
        None => memory::create_guest_memory(config.memory_bytes())?,
        Some((dir, _)) => {
            let file = snapshot::open_memory(dir, config.memory_bytes())?;
            memory::map_guest_memory_from_file(config.memory_bytes(), &file)?
        }
    };
    let vm = vm::create(&kvm, &guest_memory)?;
    let (events_tx, events) = channel();

    // Legacy devices on port I/O.
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::SerialIrq)?;
    vm.register_irqfd(&serial_irq, serial::COM1_IRQ)
        .map_err(|e| BuildError::SerialIrq(std::io::Error::from_raw_os_error(e.errno())))?;
    let out = open_console(&config.console)?;
    let console = match &snapshot {
        None => SerialConsole::new(serial_irq, out),
        Some((_, state)) => SerialConsole::from_state(&state.serial, serial_irq, out).map_err(BuildError::SerialIrq)?,
    };
    let console = Arc::new(Mutex::new(console));
    let reset_tx = events_tx.clone();
    let i8042 = Arc::new(Mutex::new(I8042::new(move || {
        let _ = reset_tx.send(VmEvent::Exit(VmExit::Reset));
    })));
    let pio = Bus::new(vec![
        (serial::COM1_BASE, serial::COM1_PORTS, console.clone() as _),
        (i8042::I8042_BASE, i8042::I8042_PORTS, i8042 as _),
    ])?;

    // virtio devices on MMIO, declared to the guest on its command line.
    let mut virtio = VirtioDevices::default();
    let mut cleanup_paths = Vec::new();
    if let Some(socket) = &config.vsock_socket {
        let vsock = VsockDevice::new(config.vsock_cid, socket)?;
        cleanup_paths.push(vsock.uds_path().to_path_buf());
        virtio.attach(&vm, &guest_memory, Box::new(vsock))?;
    }
    if let Some(dir) = &config.shared_dir {
        virtio.attach(&vm, &guest_memory, Box::new(FsDevice::new(&config.fs_tag, dir)?))?;
    }
    let mmio = Bus::new(virtio.bus_entries)?;

    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    match &snapshot {
        None => {
            let cmdline = boot::kernel_cmdline(template, &virtio.kernel_params, &config.cmdline)?;
            let entry = boot::load_guest(
                &guest_memory,
                config.memory_bytes(),
                &config.kernel,
                &config.initramfs,
                &cmdline,
                config.vcpus,
            )?;
            for index in 0..config.vcpus {
                let vcpu = Vcpu::create(&vm, index)?;
                vcpu.configure(&supported_cpuid, config.vcpus, template, entry.entry_point)?;
                vcpus.push(vcpu);
            }
        }
        Some((dir, state)) => {
            let restore_err = |reason: String| SnapshotError::Mismatch { path: dir.to_path_buf(), reason };
            if state.virtio.len() != virtio.transports.len() {
                let reason = format!(
                    "it has {} virtio devices, the configuration {}",
                    state.virtio.len(),
                    virtio.transports.len()
                );
                return Err(restore_err(reason).into());
            }
            for (index, saved) in state.vcpus.iter().enumerate() {
                let vcpu = Vcpu::create(&vm, index as u8)?;
                let mut cpuid = supported_cpuid.clone();
                cpuid::normalize(cpuid.as_mut_slice(), index as u8, config.vcpus, template);
                vcpu.restore(&cpuid, saved)?;
                vcpus.push(vcpu);
            }
            vm::restore_state(&vm, &state.vm)
                .map_err(|e| restore_err(format!("interrupt controllers and clock: {e}")))?;
            for (transport, saved) in virtio.transports.iter().zip(&state.virtio) {
                lock(transport).restore_state(saved).map_err(restore_err)?;
            }
        }
    }

    install_kick_handler().map_err(BuildError::SerialIrq)?;
    let (paused_tx, paused) = channel();
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let first_run: Option<Box<dyn FnOnce() + Send>> = (options.boot_timestamps && vcpu.index() == 0)
            .then(|| Box::new(|| eprintln!("nestbox-vmm: timestamp first_kvm_run {}", monotonic_ns())) as _);
        handles.push(vcpu.start(pio.clone(), mmio.clone(), events_tx.clone(), paused_tx.clone(), first_run)?);
    }
    if let Some(path) = &options.api_socket {
        crate::api::serve(path, events_tx.clone()).map_err(|source| BuildError::Api { path: path.clone(), source })?;
        cleanup_paths.push(path.clone());
    }
    Ok(Vmm {
        kvm,
        vm,
        memory: guest_memory,
        memory_mib: config.memory_mib,
        cpu_vendor: vendor,
        cpu_template: template,
        vcpus: handles,
        paused,
        events,
        console,
        transports: virtio.transports,
        cleanup_paths,
    })
}

/// Locks a mutex, carrying on with the data if a panicking thread poisoned it: the VM is
/// going down anyway in that case, and the state is only read or replaced whole.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// virtio-mmio devices being placed: each gets the next register window and interrupt.
#[derive(Default)]
struct VirtioDevices {
    bus_entries: Vec<(u64, u64, SharedDevice)>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    kernel_params: Vec<String>,
}

impl VirtioDevices {
    fn attach(&mut self, vm: &VmFd, memory: &GuestMemoryMmap, device: Box<dyn VirtioDevice>) -> Result<(), BuildError> {
        let index = self.bus_entries.len() as u64;
        let irq = layout::VIRTIO_IRQ_FIRST + index as u32;
        if irq > layout::VIRTIO_IRQ_LAST {
            return Err(BuildError::TooManyDevices);
        }
        let base = layout::VIRTIO_MMIO_START + index * MMIO_WINDOW;
        let kvm_err = |what| move |e: kvm_ioctls::Error| BuildError::Virtio(format!("{what}: {e}"));
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Virtio(format!("irqfd: {e}")))?;
        vm.register_irqfd(&irqfd, irq).map_err(kvm_err("KVM_IRQFD"))?;
        let transport = MmioTransport::new(device, memory.clone(), Arc::new(Interrupt::new(irqfd)))
            .map_err(|e| BuildError::Virtio(e.to_string()))?;
        for (queue, event) in transport.queue_events().iter().enumerate() {
            // Notifications of queue `queue` become eventfd signals inside KVM: the vCPU
            // does not exit to the VMM for them.
            vm.register_ioevent(event, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), queue as u32)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.bus_entries.push((base, MMIO_WINDOW, transport.clone() as _));
        self.transports.push(transport);
        self.kernel_params.push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        Ok(())
    }
}
