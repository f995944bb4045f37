//! The devices both build paths give a VM: the serial console and i8042 on port I/O, and
//! the virtio-mmio devices the configuration asks for, each with its register window,
//! interrupt line and queue notifiers.

use super::error::BuildError;
use crate::arch::x86_64::layout;
use crate::config::{Console, VmConfig};
use crate::devices::bus::{Bus, SharedDevice};
use crate::devices::legacy::serial::capped::{CappedWriter, CONSOLE_LOG_MAX};
use crate::devices::legacy::serial::persist::SerialState;
use crate::devices::legacy::{i8042, serial, SerialConsole, I8042};
use crate::devices::virtio::fs::FsDevice;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use crate::devices::virtio::net::tap::{Backend, Tap};
use crate::devices::virtio::net::{NetDevice, NetHandle};
use crate::devices::virtio::vsock::VsockDevice;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::snapshot::MicrovmState;
use crate::vmm::{VmEvent, VmExit};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// A VM's devices, placed on their buses.
pub(super) struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub console: Arc<Mutex<SerialConsole>>,
    /// In the order they were attached, which is the order a snapshot saves them in.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// `virtio_mmio.device=` declarations for the guest's command line.
    pub kernel_params: Vec<String>,
    /// Host files the devices created (sockets), removed when the VMM ends.
    pub cleanup_paths: Vec<PathBuf>,
    /// The net device's MAC, counters and features, if the VM has one.
    pub net: Option<NetHandle>,
}

/// Creates the devices `config` describes on `vm`. The console and net device start from
/// `saved` when restoring; a guest write to the i8042 reset line sends `events` the reset
/// exit.
pub(super) fn assemble(
    config: &VmConfig,
    vm: &VmFd,
    memory: &GuestMemoryMmap,
    saved: Option<&MicrovmState>,
    events: Sender<VmEvent>,
) -> Result<Devices, BuildError> {
    let console = Arc::new(Mutex::new(serial_console(config, vm, saved.map(|s| &s.serial))?));
    let i8042 = Arc::new(Mutex::new(I8042::new(move || {
        let _ = events.send(VmEvent::Exit(VmExit::Reset));
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
        virtio.attach(vm, memory, Box::new(vsock))?;
    }
    if let Some(dir) = &config.shared_dir {
        virtio.attach(vm, memory, Box::new(FsDevice::new(&config.fs_tag, dir)?))?;
    }
    // Last, so the vsock and virtio-fs windows stay where they were before net existed.
    let mut net = None;
    if let Some(mac) = config.net_mac {
        let backend = match config.net_tap_fd {
            Some(fd) => Some(Arc::new(Tap::from_inherited_fd(fd)?) as Arc<dyn Backend>),
            None => None,
        };
        let device = match saved.and_then(|s| s.net.as_ref()) {
            Some(state) => NetDevice::from_state(state, backend),
            None => NetDevice::new(mac, backend),
        };
        net = Some(device.handle());
        virtio.attach(vm, memory, Box::new(device))?;
    }
    Ok(Devices {
        pio,
        mmio: Bus::new(virtio.bus_entries)?,
        console,
        transports: virtio.transports,
        kernel_params: virtio.kernel_params,
        cleanup_paths,
        net,
    })
}

/// The COM1 console, its interrupt an irqfd, its output where `config` says.
fn serial_console(config: &VmConfig, vm: &VmFd, saved: Option<&SerialState>) -> Result<SerialConsole, BuildError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::SerialIrq)?;
    vm.register_irqfd(&irq, serial::COM1_IRQ)
        .map_err(|e| BuildError::SerialIrq(std::io::Error::from_raw_os_error(e.errno())))?;
    let out = open_console(&config.console)?;
    Ok(match saved {
        None => SerialConsole::new(irq, out),
        Some(state) => SerialConsole::from_state(state, irq, out)?,
    })
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
            let file = File::create(path).map_err(|source| BuildError::Console { path: path.clone(), source })?;
            return Ok(Box::new(CappedWriter::new(file, CONSOLE_LOG_MAX)));
        }
    };
    Ok(Box::new(file))
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
        let device_type = device.device_type();
        let kvm_err = |what| move |source| BuildError::VirtioKvm { device_type, what, source };
        let irqfd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::VirtioIrqfd { device_type, source })?;
        vm.register_irqfd(&irqfd, irq).map_err(kvm_err("KVM_IRQFD"))?;
        let transport = MmioTransport::new(device, memory.clone(), Arc::new(Interrupt::new(irqfd)))
            .map_err(|source| BuildError::VirtioTransport { device_type, source })?;
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
