//! nestbox under a real containerd (Debian's 1.6, task API v2), driven with `ctr` the way a
//! user would: containers run in their own VMs, and everything a user does with runc works.
//!
//! (ctr 1.6 always forwards its stdin to a task: `run` and `task exec` have no `-i`.)
//!
//! Warm start is on (the default) with the test's own template directory, so the first pod
//! makes the template (one guest boot, a minute or two here) and every later pod is
//! restored from it in about a second. One start slot host-wide (`runtime.concurrent_starts`),
//! so the pods started together queue for it. One test runs every check it can: `ctr run --rm`
//! with piped stdin, output and exit code and the guest's own kernel; two restored pods
//! reading different random bytes and the host's time; a long-running container for exec
//! (output, stderr, exit code, stdin, terminal), ps, pause/resume, metrics and kill with a
//! signal; creates that fail before and after the VM is up; the VMM's jail (seccomp,
//! capabilities, mount namespace and root, cgroup); one whose VMM is killed under it by its
//! seccomp filter; the template made again after the kernel changes; a corrupt template falling back
//! to a cold boot. Afterwards no sandbox directory, mount or VMM process may remain, and
//! no start or stop may have waited for a safety-net bound (their warnings in the log).

use nestbox_tests::containerd::{Containerd, BUSYBOX, QUICK, RUNTIME};
use nestbox_tests::{host_kernel_release, Finished, GUEST_DEADLINE};

/// What the hostile rand2 container tries with the share mounted a second time: symlinks
/// where the host will mount (`<cid>/mounts/<n>`) or create, and a rename of the binds'
/// directory; each must fail (read-only), while the rootfs it runs from stays writable.
const HOSTILE_STEP: &str = "mkdir /hostile && mount -t virtiofs nestbox /hostile && echo share-mounted; \
    ln -s / /hostile/rand2/mounts/0 && echo made mounts/0 || echo refused mounts/0; \
    ln -s / /hostile/rand2/evil && echo made rand2/evil || echo refused rand2/evil; \
    ln -s / /hostile/evil && echo made /evil || echo refused /evil; \
    mv /hostile/rand2/mounts /hostile/rand2/m && echo made mv || echo refused mv; \
    touch /hostile/rand2/rootfs/ok && echo rootfs-writable";

/// One call into a running guest: generous, for a loaded machine.
const IN_GUEST: Duration = Duration::from_secs(300);

/// How every safety-net bound of the start, exec and stop paths begins its warning when
/// it is reached: the shim's `io::BOUND_WARNING` (output never closed after an exit) and
/// the agent's `serve::BOUND_WARNING` (calls still in flight at shutdown; the guest's
/// console reaches the shim's log). A normal run reaches none of them.
const BOUND_WARNING: &str = "safety-net bound reached";
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs `cmd` with `input` on its stdin (then EOF), within `deadline`.
fn run_with_input(cmd: &mut Command, input: &[u8], deadline: Duration) -> Finished {
    let start = Instant::now();
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).expect("writing stdin");
    drop(stdin);
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err = read(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Finished {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Polls `ctr task ls` until `id` shows `status`.
fn wait_for_status(c: &Containerd, id: &str, status: &str) {
    let deadline = Instant::now() + IN_GUEST;
    loop {
        let ls = c.ok(&["task", "ls"], QUICK);
        if ls.stdout.lines().any(|l| l.split_whitespace().next() == Some(id) && l.contains(status)) {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} never became {status}:\n{}", ls.stdout);
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The templates made so far (directories named by their key).
fn templates(c: &Containerd) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(&c.templates)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    found.retain(|p| p.is_dir() && p.join("state").is_file());
    found.sort();
    found
}

/// How many times containerd's log (which carries the shims' lines) contains `needle`.
fn log_count(c: &Containerd, needle: &str) -> usize {
    c.log().matches(needle).count()
}

/// Waits until containerd's log holds `needle` (a line the shim logs reaches it through
/// containerd's copy of the shim's log, after whatever the test saw happen), then returns
/// how often it is there.
fn log_count_once_seen(c: &Containerd, needle: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    while log_count(c, needle) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    log_count(c, needle)
}

/// A copy of the guest kernel the test can "rebuild" (rewrite) to change its identity.
fn copy_kernel(to: &Path) {
    let (installed, _) = nestbox_tests::guest_image();
    std::fs::copy(&installed, to).unwrap_or_else(|e| panic!("copying {}: {e}", installed.display()));
}

/// The capabilities a jailed VMM keeps (CHOWN, DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER,
/// FSETID, SETGID, SETUID: bits 0-4, 6 and 7).
const JAIL_CAPS: u64 = 0b1101_1111;

/// The VMM of a running pod is jailed (docs/jail.md): seccomp filter mode, no capability
/// outside the list, no_new_privs, its own mount namespace whose root has none of the
/// host's files, and its own cgroup with a memory limit.
fn assert_jailed(pid: i32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the VMM's status");
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or_else(|| panic!("{name} in {status}"))
    };
    assert_eq!(field("Seccomp:"), "2", "seccomp filter mode");
    assert_eq!(field("NoNewPrivs:"), "1");
    for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapInh:", "CapAmb:"] {
        let caps = u64::from_str_radix(field(set), 16).expect("hex capability set");
        assert_eq!(caps & !JAIL_CAPS, 0, "{set} {caps:#x} has capabilities outside {JAIL_CAPS:#x}");
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).expect("mount namespace");
    assert_ne!(ns(&pid.to_string()), ns("self"), "the VMM shares the host's mount namespace");
    // Its root holds /dev/kvm and its own files, not the host's: no host file to open.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert!(root.join("dev/kvm").exists(), "no /dev/kvm in the VMM's root");
    for host_file in ["etc/passwd", "etc/hostname", "usr/bin", "root"] {
        assert!(!root.join(host_file).exists(), "the VMM's root has the host's /{host_file}");
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("the VMM's cgroups");
    // cgroup v1's memory hierarchy where there is one (this host), else v2's.
    let (file, path) = match cgroups.lines().find_map(|l| l.split_once(":memory:")) {
        Some((_, path)) => ("memory/memory.limit_in_bytes", path.to_string()),
        None => ("memory.max", cgroups.lines().find_map(|l| l.strip_prefix("0::")).expect("a v2 cgroup").to_string()),
    };
    assert!(path.starts_with("/nestbox/"), "the VMM's cgroup: {cgroups}");
    let limit_file = match file.split_once('/') {
        Some((controller, name)) => format!("/sys/fs/cgroup/{controller}{path}/{name}"),
        None => format!("/sys/fs/cgroup{path}/{file}"),
    };
    let limit: u64 = std::fs::read_to_string(&limit_file).expect("memory limit").trim().parse().expect("a number");
    assert!(limit < 4 << 30, "{limit_file}: {limit}: no memory limit");
}

/// Makes the VMM of the sandbox in `dir` call what no seccomp filter allows (the control
/// API's hidden self-test), which kills it with SIGSYS.
fn kill_by_seccomp(dir: &Path) {
    let mut api = std::os::unix::net::UnixStream::connect(dir.join("api.sock")).expect("the VMM's API socket");
    api.write_all(b"selftest-seccomp\n").expect("request");
    let mut answer = String::new();
    // The VMM dies before answering: the connection just closes.
    let _ = api.read_to_string(&mut answer);
    assert!(answer.is_empty(), "the VMM survived its forbidden system call: {answer}");
}

#[test]
fn containers_run_in_their_own_vms() {
    let c = Arc::new(Containerd::start("run", ""));
    let kernel = c.dir.join("vmlinux");
    copy_kernel(&kernel);
    // One start slot host-wide, so the pods started together below queue for it.
    c.write_nestbox_config_with(
        "concurrent_starts = 1\n",
        &format!("kernel = \"{}\"\n[agent]\nboot_timeout_secs = 900\n", kernel.display()),
    );
    c.import_busybox();
    let host_release = host_kernel_release();

    // Every event containerd publishes, to check the shim's afterwards.
    let mut events = c.ctr(&["events"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("ctr events");
    let events_out = events.stdout.take().expect("events stdout");
    let events_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let mut out = events_out;
        let _ = out.read_to_string(&mut s);
        s
    });

    // The first pod makes the template, then is restored from it: stdin in, stdout and
    // stderr out, the exit code, a kernel of its own, loopback only.
    let once = run_with_input(
        &mut c.ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            BUSYBOX,
            "once",
            "sh",
            "-c",
            "read line; echo \"got $line\"; echo \"guest $(uname -r)\"; echo links $(ls /sys/class/net); \
             echo \"tunables=$GLIBC_TUNABLES\"; echo to-stderr >&2; exit 3",
        ]),
        b"piped-input\n",
        GUEST_DEADLINE,
    );
    assert_eq!(once.status.code(), Some(3), "{once:?}\n{}", c.log_tail(80));
    assert!(once.stdout.contains("got piped-input"), "{once:?}");
    assert!(once.stderr.contains("to-stderr"), "{once:?}");
    let guest_release = once
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("guest "))
        .unwrap_or_else(|| panic!("no kernel release in {once:?}"))
        .trim()
        .to_string();
    assert_ne!(guest_release, host_release, "the container must run on the guest's kernel");
    assert!(guest_release.ends_with("-nestbox"), "{guest_release}");
    // No CNI namespace (ctr): the container has its own network namespace in the guest
    // with loopback only; the VM's virtio-net device stays unused.
    assert!(once.stdout.lines().any(|l| l.trim() == "links lo"), "loopback only: {once:?}");
    // A software-nested host's guest (kvm_pvm: `noxsave`, the AVX registers unsaved across
    // guest task switches) keeps glibc programs off AVX through glibc's tunables; any
    // other host leaves the environment alone (agent/src/container/avx_quirk.rs).
    let tunables = once.stdout.lines().find_map(|l| l.strip_prefix("tunables=")).unwrap_or_default().trim();
    if Path::new("/sys/module/kvm_pvm").exists() {
        assert!(tunables.starts_with("glibc.cpu.hwcaps=-AVX,-AVX2,"), "AVX off for glibc: {once:?}");
    } else {
        assert_eq!(tunables, "", "the environment as the spec has it: {once:?}");
    }
    assert!(!c.sandbox_dirs().iter().any(|d| d.ends_with("once")), "the --rm pod's sandbox is gone");
    let first_templates = templates(&c);
    assert_eq!(first_templates.len(), 1, "one template made: {first_templates:?}\n{}", c.log_tail(60));
    assert_eq!(log_count(&c, "VM restored"), 1, "the first pod is restored from the new template");
    assert_eq!(log_count(&c, "VM booted"), 0, "no pod booted cold");

    // Restored pods, several at once: two long-running ones and two that read random bytes
    // and the clock. Restored copies of one guest must not share random state.
    let detached = |id: &'static str, script: &'static str| {
        let c = c.clone();
        std::thread::spawn(move || {
            c.ok(&["run", "-d", "--null-io", "--runtime", RUNTIME, BUSYBOX, id, "sh", "-c", script], GUEST_DEADLINE)
        })
    };
    let long = detached("long", "trap 'exit 42' TERM; while true; do sleep 1; done");
    let victim = detached("victim", "while true; do sleep 5; done");
    let random = |id: &'static str, hostile: &'static str| {
        let c = c.clone();
        std::thread::spawn(move || {
            let script = format!("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; {hostile}");
            let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
            if !hostile.is_empty() {
                args.push("--privileged");
            }
            args.extend([BUSYBOX, id, "sh", "-c", &script]);
            c.ok(&args, GUEST_DEADLINE)
        })
    };
    // rand2 also plays the hostile guest (root with the share mounted, as an escaped
    // container or the guest kernel would have it): the share's own directories, where the
    // host creates and mounts, are read-only to it; the container's rootfs stays writable.
    let (rand1, rand2) = (random("rand1", ""), random("rand2", HOSTILE_STEP));
    long.join().expect("long container started");
    victim.join().expect("victim container started");
    assert!(c.vmm_pids().len() >= 2, "two pods, two VMs: {:?}", c.vmm_pids());
    let long_vmm: i32 =
        std::fs::read_to_string(c.sandboxes.join("long/vmm.pid")).expect("pid").trim().parse().expect("pid");
    assert_jailed(long_vmm);
    let (rand1, rand2) = (rand1.join().expect("rand1"), rand2.join().expect("rand2"));
    let host_now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
    let mut seen = Vec::new();
    for r in [&rand1, &rand2] {
        let mut lines = r.stdout.lines();
        let bytes = lines.next().unwrap_or_default().trim().to_string();
        assert_eq!(bytes.len(), 64, "32 random bytes in hex: {r:?}");
        let guest_now: u64 = lines.next().and_then(|l| l.trim().parse().ok()).unwrap_or_else(|| panic!("{r:?}"));
        assert!(host_now.abs_diff(guest_now) < 120, "guest clock {guest_now} vs host {host_now}");
        seen.push(bytes);
    }
    assert_ne!(seen[0], seen[1], "two restored sandboxes read the same random bytes");
    let hostile = &rand2.stdout;
    assert!(hostile.contains("share-mounted") && hostile.contains("rootfs-writable"), "{rand2:?}");
    for target in ["mounts/0", "rand2/evil", "/evil", "mv"] {
        assert!(hostile.contains(&format!("refused {target}")), "{target} not refused: {rand2:?}");
    }
    assert!(!hostile.contains("made "), "the guest wrote into the share's directories: {rand2:?}");
    assert_eq!(log_count(&c, "VM restored"), 5, "every pod restored:\n{}", c.log_tail(60));
    // Four pods started together with one start slot: they queued for it (the VM starts
    // and container creates and starts), and every wait ended with the slot.
    let waited = log_count_once_seen(&c, "start slots of the host are taken");
    assert!(waited >= 1, "four starts at once and one slot, yet none waited:\n{}", c.log_tail(60));
    assert_eq!(log_count(&c, "got start slot"), waited, "a wait for a start slot did not end");
    assert_eq!(log_count(&c, "VM booted"), 0, "no pod booted cold");

    // exec: output, stderr and exit code.
    let exec = c.run(
        &["task", "exec", "--exec-id", "e1", "long", "sh", "-c", "echo exec-out; echo exec-err >&2; exit 5"],
        IN_GUEST,
    );
    assert_eq!(exec.status.code(), Some(5), "{exec:?}");
    assert!(exec.stdout.contains("exec-out") && exec.stderr.contains("exec-err"), "{exec:?}");

    // exec with stdin piped in.
    let stdin =
        run_with_input(&mut c.ctr(&["task", "exec", "--exec-id", "e2", "long", "wc", "-l"]), b"a\nb\nc\n", IN_GUEST);
    assert!(stdin.status.success() && stdin.stdout.trim() == "3", "{stdin:?}");

    // exec on a terminal (ctr needs a terminal of its own for -t: script gives it one).
    // (Not `tty`: the pty is the agent's, from the guest's devpts, which the container's own
    // devpts instance does not show, so ttyname() fails there; see docs/agent.md.)
    let ctr_line = format!(
        "ctr --address {} --namespace {} task exec -t --exec-id e3 long sh -c 'test -t 0 && test -t 1 && echo tty-ok'",
        c.socket.display(),
        c.namespace
    );
    let tty = nestbox_tests::run_with_deadline(Command::new("script").args(["-qec", &ctr_line, "/dev/null"]), IN_GUEST);
    assert!(tty.stdout.contains("tty-ok"), "{tty:?}");

    // ps lists the container's processes (guest PIDs).
    let ps = c.ok(&["task", "ps", "long"], IN_GUEST);
    let pids: Vec<u32> = ps.stdout.lines().skip(1).filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
    assert!(!pids.is_empty() && pids.iter().all(|p| *p > 0), "{ps:?}");

    // pause and resume.
    c.ok(&["task", "pause", "long"], IN_GUEST);
    wait_for_status(&c, "long", "PAUSED");
    c.ok(&["task", "resume", "long"], IN_GUEST);
    wait_for_status(&c, "long", "RUNNING");

    // metrics: the guest's cgroup figures.
    let metrics = c.ok(&["task", "metrics", "long"], IN_GUEST);
    assert!(metrics.stdout.contains("memory") || metrics.stdout.contains("pids"), "{metrics:?}");

    // Create fails halfway, before the VM (a bind mount of a missing host path) and after
    // it is up (a program the image does not have): each fails naming the problem, and the
    // pod's sandbox directory, mounts and VMM all go.
    let before = c.vmm_pids().len();
    let bad_bind = c.run(
        &[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--mount",
            "type=bind,src=/nonexistent-nbx-src,dst=/mnt,options=rbind:ro",
            BUSYBOX,
            "badbind",
            "true",
        ],
        GUEST_DEADLINE,
    );
    assert!(!bad_bind.status.success() && bad_bind.stderr.contains("/nonexistent-nbx-src"), "{bad_bind:?}");
    let bad_program =
        c.run(&["run", "--rm", "--runtime", RUNTIME, BUSYBOX, "badprog", "/no/such/program"], GUEST_DEADLINE);
    assert!(!bad_program.status.success() && bad_program.stderr.contains("/no/such/program"), "{bad_program:?}");
    let _ = c.run(&["containers", "rm", "badbind", "badprog"], QUICK);
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.sandbox_dirs().iter().any(|d| d.ends_with("badbind") || d.ends_with("badprog"))
        || c.vmm_pids().len() > before
    {
        assert!(Instant::now() < deadline, "failed creates left {:?}, VMMs {:?}", c.sandbox_dirs(), c.vmm_pids());
        std::thread::sleep(Duration::from_millis(200));
    }

    // The victim's VMM dies, killed by its seccomp filter: its container exits with an
    // error status, containerd hears of it, the shim says why, and its sandbox is cleaned up.
    let victim_dir = c.sandboxes.join("victim");
    kill_by_seccomp(&victim_dir);
    wait_for_status(&c, "victim", "STOPPED");
    assert_eq!(log_count_once_seen(&c, "killed by its seccomp filter (SIGSYS)"), 1, "{}", c.log_tail(40));
    let deleted = c.run(&["task", "delete", "victim"], IN_GUEST);
    // ctr 1.6 reports a task's non-zero exit status as a warning, and itself exits 0.
    assert!(deleted.status.success() && deleted.stderr.contains("exit code 255"), "{deleted:?}");
    assert!(!victim_dir.exists(), "the dead VM's sandbox was not cleaned up");

    // kill with a signal: the container's trap turns SIGTERM into exit code 42.
    c.ok(&["task", "kill", "--signal", "SIGTERM", "long"], IN_GUEST);
    wait_for_status(&c, "long", "STOPPED");
    let deleted = c.run(&["task", "delete", "long"], IN_GUEST);
    assert!(deleted.status.success() && deleted.stderr.contains("exit code 42"), "{deleted:?}");
    c.ok(&["containers", "rm", "long", "victim"], IN_GUEST);
    for pod in ["long", "victim"] {
        for hierarchy in ["", "memory/", "pids/", "cpu/"] {
            let cgroup = format!("/sys/fs/cgroup/{hierarchy}nestbox/{pod}");
            assert!(!Path::new(&cgroup).exists(), "the ended VMM's cgroup {cgroup} is left");
        }
    }

    // The kernel changes (rebuilt in place): the next pod makes a new template, and the old
    // one, which can never be used again, is deleted.
    std::thread::sleep(Duration::from_millis(50));
    copy_kernel(&kernel);
    let rebuilt = c.ok(&["run", "--rm", "--runtime", RUNTIME, BUSYBOX, "rebuilt", "uname", "-r"], GUEST_DEADLINE);
    assert!(rebuilt.stdout.trim().ends_with("-nestbox"), "{rebuilt:?}");
    let second_templates = templates(&c);
    assert_eq!(second_templates.len(), 1, "{second_templates:?}");
    assert_ne!(second_templates, first_templates, "the template was not made again after the kernel changed");
    assert_eq!(log_count(&c, "making template"), 2, "{}", c.log_tail(60));

    // A corrupt template (truncated state file): the restore is refused, the pod boots cold
    // with the reason logged, and the bad template is deleted so the next pod makes it again.
    let state = second_templates[0].join("state");
    let len = std::fs::metadata(&state).expect("state").len();
    std::fs::OpenOptions::new().write(true).open(&state).expect("open state").set_len(len / 2).expect("truncate");
    let cold = c.ok(&["run", "--rm", "--runtime", RUNTIME, BUSYBOX, "cold", "echo", "cold-ok"], GUEST_DEADLINE);
    assert!(cold.stdout.contains("cold-ok"), "{cold:?}");
    assert_eq!(log_count(&c, "booting cold"), 1, "{}", c.log_tail(60));
    assert_eq!(log_count(&c, "VM booted"), 1, "the pod booted cold");
    assert!(templates(&c).is_empty(), "the corrupt template was not deleted: {:?}", templates(&c));

    c.assert_clean();
    // Every start, exec and stop above ended on events (EOF, exits, the end of the long
    // polls), none by running into a bound.
    let bounded: Vec<String> = c.log().lines().filter(|l| l.contains(BOUND_WARNING)).map(String::from).collect();
    assert!(bounded.is_empty(), "a start or stop waited for a safety-net bound:\n{}", bounded.join("\n"));
    let _ = events.kill();
    let _ = events.wait();
    let events = events_reader.join().unwrap_or_default();
    // The shim's events, in order, for the long-running container.
    let order = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit",
        "/tasks/delete",
    ];
    let mut at = 0;
    for line in events.lines().filter(|l| l.contains("\"long\"") || l.contains("container_id\":\"long")) {
        if at < order.len() && line.contains(order[at]) {
            at += 1;
        }
    }
    assert_eq!(at, order.len(), "events of 'long' missing or out of order (reached {:?}):\n{events}", order.get(at));
    assert!(
        events.lines().any(|l| l.contains("/tasks/exit") && l.contains("victim")),
        "no exit event for the victim:\n{events}"
    );
}
