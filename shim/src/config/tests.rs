//! The configuration file's keys, defaults and errors.

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Some(Path::new("/test/config.toml")))
}

#[test]
fn empty_file_gives_working_defaults() {
    let c = parse("").expect("defaults");
    assert_eq!((c.vcpus, c.memory_mib), (DEFAULT_VCPUS, DEFAULT_MEMORY_MIB));
    assert_eq!(c.sandboxes_dir, Path::new(DEFAULT_SANDBOXES_DIR));
    assert!(c.kernel.ends_with("vmlinux") && c.initramfs.ends_with("initramfs.cpio"));
    assert_eq!(c.boot_timeout, Duration::from_secs(DEFAULT_BOOT_TIMEOUT_SECS));
    assert!(c.vmm.ends_with(VMM_BINARY));
    assert!(c.warm_start);
    assert!(c.jail, "the jail is on by default");
    assert_eq!((c.cgroup_parent.as_str(), c.oom_score_adj), (DEFAULT_CGROUP_PARENT, None));
    assert_eq!(c.templates_dir, Path::new(DEFAULT_TEMPLATES_DIR));
    assert_eq!(c.concurrent_starts, u32::from(host_cpus()), "as many starts at once as the host has CPUs");
}

#[test]
fn every_key_is_read() {
    let c = parse(
        r#"
        [hypervisor]
        vmm = "/opt/vmm"
        kernel = "/k"
        initramfs = "/i"
        vcpus = 2
        memory_mib = 512
        max_vcpus = 3
        max_memory_mib = 2048
        kernel_params = "quiet"
        cpu_template = "none"
        jail = false
        cgroup_parent = "kubepods/nestbox"
        oom_score_adj = 500
        [agent]
        log_level = "debug"
        boot_timeout_secs = 5
        request_timeout_secs = 7
        [runtime]
        sandboxes_dir = "/tmp/sb"
        shared_fs = "virtio-fs"
        warm_start = false
        templates_dir = "/tmp/templates"
        concurrent_starts = 3
        "#,
    )
    .expect("valid");
    assert_eq!(c.vmm, Path::new("/opt/vmm"));
    assert_eq!((c.vcpus, c.memory_mib, c.kernel_params.as_str()), (2, 512, "quiet"));
    assert_eq!((c.max_vcpus, c.max_memory_mib), (3, 2048));
    assert_eq!((c.cpu_template.as_str(), c.agent_log_level.as_str()), ("none", "debug"));
    assert_eq!((c.jail, c.cgroup_parent.as_str(), c.oom_score_adj), (false, "kubepods/nestbox", Some(500)));
    assert_eq!((c.boot_timeout.as_secs(), c.request_timeout.as_secs()), (5, 7));
    assert_eq!(c.sandboxes_dir, Path::new("/tmp/sb"));
    assert_eq!((c.warm_start, c.templates_dir.as_path()), (false, Path::new("/tmp/templates")));
    assert_eq!(c.concurrent_starts, 3);
    // What `nestbox env` prints is itself a valid configuration with the same values.
    let again = parse(c.describe().as_str()).expect("describe() parses");
    assert_eq!(Config { source: c.source.clone(), ..again }, c);
}

#[test]
fn errors_name_the_key() {
    for (text, key) in [
        ("[hypervisor]\nvcpus = 0", "hypervisor.vcpus"),
        ("[hypervisor]\nvcpus = 300", "hypervisor.vcpus"),
        ("[hypervisor]\nmemory_mib = 10", "hypervisor.memory_mib"),
        ("[hypervisor]\ncpu_template = \"fast\"", "hypervisor.cpu_template"),
        ("[hypervisor]\nkernel = \"relative/vmlinux\"", "hypervisor.kernel"),
        ("[hypervisor]\ncgroup_parent = \"/abs\"", "hypervisor.cgroup_parent"),
        ("[hypervisor]\ncgroup_parent = \"a/../b\"", "hypervisor.cgroup_parent"),
        ("[hypervisor]\ncgroup_parent = \"\"", "hypervisor.cgroup_parent"),
        ("[hypervisor]\noom_score_adj = 1001", "hypervisor.oom_score_adj"),
        ("[agent]\nboot_timeout_secs = 0", "agent.boot_timeout_secs"),
        ("[agent]\nlog_level = \"loud\"", "agent.log_level"),
        ("[runtime]\nshared_fs = \"9p\"", "runtime.shared_fs"),
        ("[runtime]\ntemplates_dir = \"t\"", "runtime.templates_dir"),
        ("[runtime]\nconcurrent_starts = -1", "runtime.concurrent_starts"),
        ("[runtime]\nconcurrent_starts = 5000", "runtime.concurrent_starts"),
    ] {
        let err = parse(text).expect_err(text).to_string();
        assert!(err.contains(key), "{text:?} -> {err}");
    }
    // Unknown keys and wrong types: toml names the key and shows the line.
    let err = parse("[hypervisor]\nvcpu = 2").expect_err("unknown key").to_string();
    assert!(err.contains("vcpu") && err.contains("unknown field"), "{err}");
    let err = parse("[hypervisors]\n").expect_err("unknown table").to_string();
    assert!(err.contains("hypervisors"), "{err}");
    let err = parse("[hypervisor]\nvcpus = \"two\"").expect_err("bad type").to_string();
    assert!(err.contains("vcpus") && err.contains("/test/config.toml"), "{err}");
}

#[test]
fn annotations_override_size_and_unknown_ones_are_errors() {
    let c = parse("[hypervisor]\nvcpus = 2\nmemory_mib = 300").expect("valid");
    let ann = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(c.vm_size(&ann(&[("other.key", "x")])).expect("no override"), VmSize { vcpus: 2, memory_mib: 300 });
    assert_eq!(
        c.vm_size(&ann(&[(ANNOTATION_VCPUS, "1"), (ANNOTATION_MEMORY_MIB, "1024")])).expect("overrides"),
        VmSize { vcpus: 1, memory_mib: 1024 }
    );
    for (key, value) in [(ANNOTATION_VCPUS, "0"), (ANNOTATION_VCPUS, "x"), (ANNOTATION_MEMORY_MIB, "-1")] {
        let err = c.vm_size(&ann(&[(key, value)])).expect_err(value).to_string();
        assert!(err.contains(key), "{err}");
    }
    let err = c.vm_size(&ann(&[("io.nestbox.cpus", "2")])).expect_err("unknown").to_string();
    assert!(err.contains("io.nestbox.cpus") && err.contains("unknown"), "{err}");
}

#[test]
fn pod_resources_size_the_vm_within_bounds() {
    let c = parse("[hypervisor]\nvcpus = 1\nmemory_mib = 256\nmax_vcpus = 4\nmax_memory_mib = 1024").expect("valid");
    let ann = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let size = |pairs: &[(&str, &str)]| c.vm_size(&ann(pairs)).expect("valid");
    let (quota, period, memory) = (CRI_SANDBOX_CPU_QUOTA, CRI_SANDBOX_CPU_PERIOD, CRI_SANDBOX_MEMORY);
    // 1.5 CPUs round up to 2 more vCPUs; 300 MiB of limits add 300 MiB.
    let want = VmSize { vcpus: 3, memory_mib: 556 };
    assert_eq!(size(&[(quota, "150000"), (period, "100000"), (memory, "314572800")]), want);
    // No limits (containerd writes zeros, or -1 for an unlimited quota): the default shape.
    let default = VmSize { vcpus: 1, memory_mib: 256 };
    assert_eq!(size(&[(quota, "0"), (period, "100000"), (memory, "0")]), default);
    assert_eq!(size(&[(quota, "-1"), (period, "100000")]), default);
    // Capped at the configured maximum; an io.nestbox.* annotation still has the last word.
    assert_eq!(
        size(&[(quota, "900000"), (period, "100000"), (memory, "8589934592")]),
        VmSize { vcpus: 4, memory_mib: 1024 }
    );
    assert_eq!(size(&[(memory, "8589934592"), (ANNOTATION_MEMORY_MIB, "300")]).memory_mib, 300);
    let err = c.vm_size(&ann(&[(memory, "lots")])).expect_err("bad value").to_string();
    assert!(err.contains(CRI_SANDBOX_MEMORY) && err.contains("lots"), "{err}");
    let err = parse("[hypervisor]\nvcpus = 2\nmax_vcpus = 1").expect_err("max below").to_string();
    assert!(err.contains("hypervisor.max_vcpus"), "{err}");
}
