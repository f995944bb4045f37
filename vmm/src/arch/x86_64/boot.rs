//! Loading a guest for PVH boot: the ELF vmlinux at its physical addresses, the
//! initramfs under the MMIO gap, the command line, the PVH start info with its memory
//! map, the MP table and the boot GDT.

use super::cpuid::CpuTemplate;
use super::layout::{self, MemoryKind};
use super::mptable;
use super::regs::boot_gdt;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Parameters every nestbox guest gets: console on the first serial port, reboot through
/// the keyboard controller (the VMM's i8042 turns it into a clean exit), reboot at once
/// on panic, and no probing of hardware a microVM does not have.
pub const BASE_KERNEL_PARAMS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Magic value of the PVH start info (Xen's `XEN_HVM_START_MAGIC_VALUE`).
const PVH_START_MAGIC: u32 = 0x336e_c578;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    KernelOpen { path: PathBuf, source: std::io::Error },
    #[error("kernel {path} is not an ELF vmlinux ({found}); give the uncompressed vmlinux, not a bzImage")]
    KernelNotElf { path: PathBuf, found: &'static str },
    #[error("kernel {path} could not be loaded: {source}")]
    KernelLoad { path: PathBuf, source: linux_loader::loader::Error },
    #[error("kernel {path} has no PVH entry point (build it with CONFIG_PVH=y)")]
    KernelNoPvh { path: PathBuf },
    #[error("initramfs {path}: {source}")]
    InitramfsOpen { path: PathBuf, source: std::io::Error },
    #[error(
        "initramfs {path} ({size} bytes) does not fit in guest memory after the kernel; give the guest more memory"
    )]
    InitramfsTooLarge { path: PathBuf, size: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("writing boot data to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("writing PVH boot parameters: {0}")]
    BootParams(#[from] linux_loader::configurator::Error),
    #[error("MP table: {0}")]
    MpTable(#[from] mptable::MpTableError),
}

/// The complete kernel command line: nestbox's base parameters, those the CPU template
/// needs, the device declarations (`virtio_mmio.device=...`), then the user's.
pub fn kernel_cmdline(template: CpuTemplate, devices: &[String], extra: &str) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE)?;
    let parts = [BASE_KERNEL_PARAMS, template.kernel_params()].into_iter().chain(devices.iter().map(String::as_str));
    for part in parts.chain([extra.trim()]) {
        if !part.is_empty() {
            cmdline.insert_str(part)?;
        }
    }
    Ok(cmdline)
}

/// Where the loaded guest starts.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry_point: u64,
}

fn describe_non_elf(header: &[u8]) -> &'static str {
    if header.len() >= 0x206 && &header[0x202..0x206] == b"HdrS" {
        "it is a bzImage"
    } else if header.starts_with(&[0x1f, 0x8b]) {
        "it is gzip-compressed"
    } else if header.len() < 4 {
        "it is too short"
    } else {
        "no ELF header"
    }
}

/// Loads kernel, initramfs and boot tables into `mem`, which holds `mem_size` bytes of RAM.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &Path,
    initramfs: &Path,
    cmdline: &Cmdline,
    num_cpus: u8,
) -> Result<BootEntry, BootError> {
    let mut kernel_file = File::open(kernel).map_err(|source| BootError::KernelOpen { path: kernel.into(), source })?;
    let mut header = Vec::with_capacity(0x206);
    (&mut kernel_file)
        .take(0x206)
        .read_to_end(&mut header)
        .map_err(|source| BootError::KernelOpen { path: kernel.into(), source })?;
    if !header.starts_with(b"\x7fELF") {
        return Err(BootError::KernelNotElf { path: kernel.into(), found: describe_non_elf(&header) });
    }
    let loaded = Elf::load(mem, None, &mut kernel_file, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(|source| BootError::KernelLoad { path: kernel.into(), source })?;
    let entry_point = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => return Err(BootError::KernelNoPvh { path: kernel.into() }),
    };

    let mut initramfs_file =
        File::open(initramfs).map_err(|source| BootError::InitramfsOpen { path: initramfs.into(), source })?;
    let initramfs_size =
        initramfs_file.metadata().map_err(|source| BootError::InitramfsOpen { path: initramfs.into(), source })?.len();
    let initramfs_addr = layout::initramfs_address(mem_size, initramfs_size, loaded.kernel_end)
        .ok_or_else(|| BootError::InitramfsTooLarge { path: initramfs.into(), size: initramfs_size })?;
    mem.read_exact_volatile_from(GuestAddress(initramfs_addr), &mut initramfs_file, initramfs_size as usize)?;

    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline)
        .map_err(|source| BootError::KernelLoad { path: kernel.into(), source })?;

    write_pvh_start_info(mem, mem_size, initramfs_addr, initramfs_size)?;
    mem.write_slice(&mptable::build(layout::MPTABLE_START, num_cpus)?, GuestAddress(layout::MPTABLE_START))?;
    for (i, entry) in boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))?;
    Ok(BootEntry { entry_point })
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    initramfs_addr: u64,
    initramfs_size: u64,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout::memory_map(mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: match e.kind {
                MemoryKind::Ram => MemoryKind::Ram as u32,
                MemoryKind::Reserved => MemoryKind::Reserved as u32,
            },
            reserved: 0,
        })
        .collect();
    let modules = [hvm_modlist_entry { paddr: initramfs_addr, size: initramfs_size, ..Default::default() }];
    let start_info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: layout::MODLIST_START,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(layout::MEMMAP_START));
    params.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(layout::MODLIST_START));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_base_then_template_then_user() {
        let devices = ["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        let c = kernel_cmdline(CpuTemplate::Pvm, &devices, "  nestbox.selftest quiet ").unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert!(s.starts_with(BASE_KERNEL_PARAMS), "{s}");
        let template_at = s.find("noxsave").unwrap();
        let device_at = s.find("virtio_mmio.device=4K@0xd0000000:5").unwrap();
        let user_at = s.find("nestbox.selftest").unwrap();
        assert!(BASE_KERNEL_PARAMS.len() < template_at && template_at < device_at && device_at < user_at, "{s}");
        assert!(s.ends_with("quiet"));
    }

    #[test]
    fn cmdline_without_template_or_extra() {
        let c = kernel_cmdline(CpuTemplate::None, &[], "").unwrap();
        assert_eq!(c.as_cstring().unwrap().to_str().unwrap(), BASE_KERNEL_PARAMS);
    }

    #[test]
    fn cmdline_too_long_is_an_error() {
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(matches!(kernel_cmdline(CpuTemplate::None, &[], &long), Err(BootError::Cmdline(_))));
    }

    #[test]
    fn non_elf_kernels_are_named() {
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(describe_non_elf(&bz), "it is a bzImage");
        assert_eq!(describe_non_elf(&[0x1f, 0x8b, 8, 0]), "it is gzip-compressed");
        assert_eq!(describe_non_elf(b"ab"), "it is too short");
        assert_eq!(describe_non_elf(b"hello world"), "no ELF header");
    }
}
