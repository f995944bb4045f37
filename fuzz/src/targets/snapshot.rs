//! The snapshot reader: a state file (magic, version, length, bincode payload, checksum)
//! and a memory file, as hostile as a file can be, through the VMM's restore path up to
//! where KVM is needed: [`read_state`], the settings `main` derives from it
//! ([`MicrovmState::apply_devices`], [`VmConfig::build`]), [`MicrovmState::check_fits`],
//! the memory file ([`open_memory`], [`map_guest_memory_from_file`]), the serial
//! console's state, and each virtio transport's saved registers and queues restored onto
//! a device of its type over that memory (which starts the device when the state says it
//! ran). vCPU and interrupt-controller states go to KVM ioctls, which check them; they
//! are decoded here but not applied.
//!
//! Mostly the payload comes from the input and the framing is made valid (the checksum
//! would stop everything else); a first byte of 2 or more gives the file as it is.

use crate::input::Input;
use nestbox_vmm::config::{FileConfig, VmConfig};
use nestbox_vmm::devices::bus::BusDevice;
use nestbox_vmm::devices::legacy::serial::SerialConsole;
use nestbox_vmm::devices::virtio::fs::FsDevice;
use nestbox_vmm::devices::virtio::mmio::MmioTransport;
use nestbox_vmm::devices::virtio::net::persist::NetState;
use nestbox_vmm::devices::virtio::net::{MacAddr, NetDevice};
use nestbox_vmm::devices::virtio::vsock::VsockDevice;
use nestbox_vmm::devices::virtio::{VirtioDevice, TYPE_FS, TYPE_VSOCK};
use nestbox_vmm::snapshot::{open_memory, read_state, MachineShape, MicrovmState, MEMORY_FILE, STATE_FILE};
use nestbox_vmm::vstate::memory::map_guest_memory_from_file;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::GuestMemoryMmap;

/// Bounds the guest memory a fuzzed state may ask for (the host's RAM in the VMM).
const HOST_MEMORY_MIB: u64 = 4096;

fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// A state file around `payload`, as `write_state` frames it.
pub fn frame(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = b"NBXSNAP\0".to_vec();
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes.extend_from_slice(&fnv64(payload).to_le_bytes());
    bytes
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let (mode, memory_flags) = (input.u8(), input.u8());
    let rings_len = usize::from(input.u16() % 0x4000);
    let rings = input.bytes(rings_len);
    let file = match mode {
        0 => frame(2, input.rest()),
        1 => frame(1, input.rest()),
        _ => input.rest().to_vec(),
    };
    let dir = crate::scratch::dir("snapshot");
    std::fs::write(dir.join(STATE_FILE), &file).expect("writing the state file");
    let Ok(state) = read_state(&dir) else { return };

    // What main does with a state before restoring.
    let mut settings = FileConfig {
        vcpus: Some(state.vcpus.len().try_into().unwrap_or(u8::MAX)),
        memory_mib: Some(state.memory_mib),
        net_tap_fd: (memory_flags & 4 != 0).then_some(7),
        ..Default::default()
    };
    if state.apply_devices(&dir, &mut settings).is_err() {
        return;
    }
    let Ok(config) = VmConfig::build(settings, HOST_MEMORY_MIB) else { return };
    let vendor = if memory_flags & 8 != 0 { "GenuineIntel" } else { state.cpu_vendor.as_str() };
    let shape = MachineShape {
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        cpu_vendor: vendor,
        cpu_template: state.cpu_template,
    };
    if state.check_fits(&dir, shape).is_err() {
        return;
    }
    let _ = SerialConsole::from_state(&state.serial, super::eventfd(), Box::new(std::io::sink())).map(|mut serial| {
        let mut byte = [0u8];
        for offset in 0..8 {
            serial.read(offset, &mut byte);
        }
    });

    // The memory file: the right length unless the input says otherwise, holding the
    // input's bytes where the rings of the restored queues are likely to point.
    let memory_path = dir.join(MEMORY_FILE);
    let memory_file = std::fs::File::create(&memory_path).expect("creating the memory file");
    let len = if memory_flags & 1 != 0 { u64::from(memory_flags >> 4) << 20 } else { config.memory_bytes() };
    // (Without a tmpfs for the scratch files, the virtio-fs target may have limited
    // the size of this process's files.)
    if memory_file.set_len(len).and_then(|()| memory_file.write_all_at(rings, 0)).is_err() {
        return;
    }
    let Ok(file) = open_memory(&dir, config.memory_bytes()) else { return };
    let memory =
        map_guest_memory_from_file(config.memory_bytes(), &file).expect("mapping a memory file of the right size");
    restore_transports(&state, &dir, &memory);
}

fn restore_transports(state: &MicrovmState, dir: &Path, memory: &GuestMemoryMmap) {
    let share = dir.join("share");
    std::fs::create_dir_all(&share).expect("scratch share");
    for saved in &state.virtio {
        let device: Box<dyn VirtioDevice> = match saved.device_type {
            TYPE_VSOCK => match VsockDevice::new(3, &dir.join("v.sock")) {
                Ok(device) => Box::new(device),
                Err(e) => panic!("vsock device in the scratch dir: {e}"),
            },
            TYPE_FS => Box::new(FsDevice::new("fuzz", &share).expect("virtio-fs over the scratch share")),
            _ => {
                let net = state.net.clone().unwrap_or(NetState { mac: MacAddr([2, 0, 0, 0, 0, 1]), acked_features: 0 });
                Box::new(NetDevice::from_state(&net, None))
            }
        };
        let mut t = MmioTransport::new(device, memory.clone(), super::interrupt()).expect("transport");
        let _ = t.restore_state(saved);
        // A reset stops a device the restore started.
        t.write(0x70, &0u32.to_le_bytes());
    }
}

/// A state as a VMM saves it: no vCPUs (KVM's structures are decoded the same for any
/// count), a running net device whose queues sit at the fuzz driver's ring addresses.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use nestbox_vmm::arch::x86_64::cpuid::CpuTemplate;
    use nestbox_vmm::devices::virtio::mmio::persist::{QueueState, TransportState};
    use nestbox_vmm::vstate::vm::persist::VmState;
    let queue = |q: usize| QueueState {
        max_size: 256,
        size: 16,
        ready: true,
        desc_table: crate::guest::queue_base(q),
        avail_ring: crate::guest::queue_base(q) + 0x1000,
        used_ring: crate::guest::queue_base(q) + 0x2000,
        event_idx: false,
    };
    let net = TransportState {
        device_type: 1,
        status: 0xf,
        acked_features: 1 << 32,
        active: true,
        queues: vec![queue(0), queue(1)],
        ..Default::default()
    };
    let vsock = TransportState { device_type: TYPE_VSOCK, queues: vec![Default::default(); 3], ..Default::default() };
    let state = MicrovmState {
        memory_mib: 128,
        cpu_vendor: "GenuineIntel".into(),
        cpu_template: CpuTemplate::Pvm,
        vcpus: Vec::new(),
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial: Default::default(),
        virtio: vec![vsock, net],
        net: Some(NetState { mac: MacAddr([2, 0, 0, 0, 0, 9]), acked_features: 1 << 32 }),
    };
    let dir = crate::scratch::dir("snapshot-seed");
    nestbox_vmm::snapshot::write_state(&dir, &state).expect("writing a seed state");
    let file = std::fs::read(dir.join(STATE_FILE)).expect("reading the seed state");
    let _ = std::fs::remove_dir_all(&dir);
    let payload = &file[20..file.len() - 8];
    let with = |mode: u8, flags: u8, body: &[u8]| {
        let mut e = crate::input::Encoder::default();
        e.u8(mode).u8(flags).u16(0);
        e.bytes(body);
        e.0
    };
    vec![
        ("state-v2", with(0, 0, payload)),
        ("state-v2-short-memory", with(0, 1 | 0x10, payload)),
        ("raw-file", with(2, 0, &file)),
    ]
}
