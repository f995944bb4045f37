//! `nestbox`: the host tool. `check` says whether this host can run sandboxes and why
//! not; `env` prints the configuration and paths in effect; `config` prints what registers
//! nestbox with containerd and Kubernetes; `template` makes the warm-start template of a
//! pod shape ahead of the first pod; `install` and `uninstall` put nestbox on a host (or a
//! node's root mounted elsewhere) and register it with containerd, and take it off again.

use clap::{Parser, Subcommand};
use nestbox_shim::check::{self, Outcome};
use nestbox_shim::config::{
    Config, VmSize, ANNOTATION_MEMORY_MIB, ANNOTATION_VCPUS, CONFIG_ENV, DEFAULT_CONFIG_PATH, DEFAULT_MEMORY_MIB,
};
use nestbox_shim::install::{self, Report, DEFAULT_CONTAINERD_CONFIG, DEFAULT_PREFIX};
use nestbox_shim::sandbox::template;
use nestbox_shim::shim::RUNTIME_ID;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

/// Per-pod host memory beside the guest's own: the shim and the VMM without its guest RAM
/// mapping. Measured by `cri_pod` on every run, which fails if they outgrow this: RSS of a
/// running CRI pod here about 10 MiB (shim) + 4 MiB (VMM), docs/shim.md "The RuntimeClass
/// overhead". Rounded up with room for the VMM's kernel-side memory (page tables, KVM),
/// which RSS does not show.
const POD_OVERHEAD_MIB: u64 = 32;

#[derive(Parser)]
#[command(name = "nestbox", version, about = "nestbox: every pod in its own KVM microVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this host can run nestbox sandboxes (exit 1 if it cannot).
    Check,
    /// Print the configuration and paths in effect.
    Env,
    /// Print the containerd configuration stanza and a Kubernetes RuntimeClass for nestbox.
    Config,
    /// Make the warm-start template for pods of this shape (boots a VM once and snapshots
    /// it; pods then start by restoring it). Without options: the configured default shape.
    Template {
        /// vCPUs of the pods (default: hypervisor.vcpus).
        #[arg(long)]
        vcpus: Option<u8>,
        /// Memory of the pods in MiB (default: hypervisor.memory_mib).
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Make it again even if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Install nestbox: the binaries in <prefix>/bin, the guest image in
    /// <prefix>/share/nestbox, the runtime in containerd's config (a backup kept, the rest of
    /// the file unchanged), a manifest in /var/lib/nestbox. A second run changes nothing.
    Install {
        /// The file system to install into (a node's root mounted elsewhere: /host).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Where the files go on that file system.
        #[arg(long, default_value = DEFAULT_PREFIX)]
        prefix: PathBuf,
        /// containerd's config file, as a path on that file system.
        #[arg(long, default_value = DEFAULT_CONTAINERD_CONFIG)]
        containerd_config: PathBuf,
        /// The folder holding containerd-shim-nestbox-v2, nestbox-vmm and nestbox
        /// [default: the folder of this nestbox].
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// The folder holding vmlinux and initramfs.cpio [default: the guest image the shim
        /// would use].
        #[arg(long)]
        guest_dir: Option<PathBuf>,
        /// Only register the runtime with containerd (the files are in place: the Debian package).
        #[arg(long)]
        config_only: bool,
    },
    /// Undo `nestbox install`: containerd's config back as it was (the original bytes if it
    /// was not edited since), the installed files and folders removed.
    Uninstall {
        /// The file system nestbox was installed into.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Check => check_host(),
        Command::Env => print_env(),
        Command::Config => print_registration(),
        Command::Template { vcpus, memory_mib, force } => make_template(vcpus, memory_mib, force),
        Command::Install { root, prefix, containerd_config, bin_dir, guest_dir, config_only } => {
            let mut options = install::Options::new();
            options.bin_dir = bin_dir.unwrap_or(options.bin_dir);
            options.guest_dir = guest_dir.unwrap_or(options.guest_dir);
            let options = install::Options { root, prefix, containerd_config, config_only, ..options };
            finish("install", &options.root.clone(), install::install(&options))
        }
        Command::Uninstall { root } => finish("uninstall", &root, install::uninstall(&root)),
    }
}

/// Prints what an install or uninstall did and, if containerd's config changed, how to make
/// containerd read it.
fn finish(what: &str, root: &std::path::Path, done: Result<Report, install::InstallError>) -> ExitCode {
    match done {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            if report.config_changed {
                let host = if root == std::path::Path::new("/") {
                    String::new()
                } else {
                    format!(" (on the host whose root is {})", root.display())
                };
                println!("\ncontainerd reads its config when it starts: restart it{host} to apply this:\n  systemctl restart containerd");
            } else {
                println!("\ncontainerd's config is unchanged: no restart needed");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nestbox: {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `nestbox check`: one line per finding; failure if any finding failed.
fn check_host() -> ExitCode {
    let findings = check::run(Config::load());
    let mut failed = false;
    for f in &findings {
        let mark = match f.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => {
                failed = true;
                "FAIL"
            }
        };
        println!("{mark}  {:<16} {}", f.what, f.detail);
    }
    if failed {
        println!("\nthis host cannot run nestbox sandboxes yet: fix the FAIL lines above");
        ExitCode::FAILURE
    } else {
        println!("\nthis host can run nestbox sandboxes");
        ExitCode::SUCCESS
    }
}

/// `nestbox env`: the configuration in effect and where a sandbox's files go.
fn print_env() -> ExitCode {
    let config = match Config::load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("nestbox: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("# nestbox {} (config file: ${CONFIG_ENV} or {DEFAULT_CONFIG_PATH})", env!("CARGO_PKG_VERSION"));
    print!("{}", config.describe());
    println!("\n# paths of a sandbox <id>");
    for (what, path) in [
        ("directory", "<id>/"),
        ("console log", "<id>/console.log"),
        ("VMM log", "<id>/vmm.log"),
        ("vsock socket", "<id>/vsock.sock"),
        ("shared dir", "<id>/shared/<container-id>/rootfs"),
    ] {
        println!("# {what:<13} {}/{path}", config.sandboxes_dir.display());
    }
    ExitCode::SUCCESS
}

/// `nestbox template`: makes (or with `force` remakes) the template of a pod shape.
fn make_template(vcpus: Option<u8>, memory_mib: Option<u64>, force: bool) -> ExitCode {
    let made = Config::load().map_err(|e| e.to_string()).and_then(|config| {
        // The shape as a pod would ask for it, so the same defaults and checks apply.
        let mut annotations = HashMap::new();
        if let Some(v) = vcpus {
            annotations.insert(ANNOTATION_VCPUS.to_string(), v.to_string());
        }
        if let Some(m) = memory_mib {
            annotations.insert(ANNOTATION_MEMORY_MIB.to_string(), m.to_string());
        }
        let size: VmSize = config.vm_size(&annotations).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let dir = template::prepare(&config, size, force).map_err(|e| e.to_string())?;
        Ok((dir, size, started.elapsed()))
    });
    match made {
        Ok((dir, size, took)) => {
            println!(
                "template for {} vCPU(s), {} MiB: {} ({:.1} s)",
                size.vcpus,
                size.memory_mib,
                dir.display(),
                took.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nestbox: template: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `nestbox config`: the containerd stanza and the Kubernetes RuntimeClass.
fn print_registration() -> ExitCode {
    let memory = Config::load().map(|c| c.memory_mib).unwrap_or(DEFAULT_MEMORY_MIB);
    print!(
        "# containerd (/etc/containerd/config.toml, version 2): containerd then starts\n\
         # containerd-shim-nestbox-v2 from its PATH for pods of runtime class \"nestbox\".\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.nestbox]\n\
         \x20 runtime_type = \"{RUNTIME_ID}\"\n\
         \x20 pod_annotations = [\"io.nestbox.*\"]\n\
         \x20 # A privileged pod gets the guest's devices, not the host's.\n\
         \x20 privileged_without_host_devices = true\n\
         \n\
         # Kubernetes: kubectl apply -f - (pods opt in with runtimeClassName: nestbox).\n\
         # overhead: the guest's memory ({memory} MiB, hypervisor.memory_mib) and the VMM and shim: \
         {POD_OVERHEAD_MIB} MiB.\n\
         # cpu: the VMM's and shim's own threads (the guest's vCPUs are sized from the pod's limits).\n\
         ---\n\
         apiVersion: node.k8s.io/v1\n\
         kind: RuntimeClass\n\
         metadata:\n\
         \x20 name: nestbox\n\
         handler: nestbox\n\
         overhead:\n\
         \x20 podFixed:\n\
         \x20   memory: \"{}Mi\"\n\
         \x20   cpu: \"250m\"\n",
        memory + POD_OVERHEAD_MIB
    );
    ExitCode::SUCCESS
}
