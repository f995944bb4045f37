//! nestbox under a real containerd (Debian's 1.6, task API v2), driven with `ctr` the way a
//! user would: containers run in their own VMs, and everything a user does with runc works.
//!
//! (ctr 1.6 always forwards its stdin to a task: `run` and `task exec` have no `-i`.)
//!
//! Guests boot in a minute or two here, so one test boots three VMs (two at a time) and runs every
//! check it can inside them: `ctr run --rm` with piped stdin, output and exit code and the
//! guest's own kernel; a long-running container for exec (output, stderr, exit code, stdin,
//! terminal), ps, pause/resume, metrics and kill with a signal; and a third whose VMM is
//! killed under it. Afterwards no sandbox directory, mount or VMM process may remain.

use nestbox_tests::containerd::{Containerd, BUSYBOX, QUICK, RUNTIME};
use nestbox_tests::{host_kernel_release, Finished, GUEST_DEADLINE};

/// One call into a running guest: an exec costs ~1 min here while another guest boots.
const IN_GUEST: Duration = Duration::from_secs(300);
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

#[test]
#[ignore = "not yet passed in full on this loaded machine (in-guest calls took over a minute); run with --ignored"]
fn containers_run_in_their_own_vms() {
    // Two guests boot at once here in three to four minutes (longer while other tests run):
    // a timeout that catches a hung guest, not a slow one.
    let c = Arc::new(Containerd::start("run", "[agent]\nboot_timeout_secs = 900\n"));
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

    // Pods at once, each in its own VM: two boot together (more would only crowd this
    // machine's two cores), the third while the first is put through its paces.
    let most_vmms = Arc::new(AtomicUsize::new(0));
    let booting = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (c, most, booting) = (c.clone(), most_vmms.clone(), booting.clone());
        std::thread::spawn(move || {
            while booting.load(Ordering::Relaxed) && most.load(Ordering::Relaxed) < 2 {
                most.fetch_max(c.vmm_pids().len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let detached = |id: &'static str, script: &'static str| {
        let c = c.clone();
        std::thread::spawn(move || {
            c.ok(&["run", "-d", "--null-io", "--runtime", RUNTIME, BUSYBOX, id, "sh", "-c", script], GUEST_DEADLINE)
        })
    };
    let long = detached("long", "trap 'exit 42' TERM; while true; do sleep 1; done");
    let once = {
        let c = c.clone();
        std::thread::spawn(move || {
            run_with_input(
                &mut c.ctr(&[
                    "run",
                    "--rm",
                    "--runtime",
                    RUNTIME,
                    BUSYBOX,
                    "once",
                    "sh",
                    "-c",
                    "read line; echo \"got $line\"; echo \"guest $(uname -r)\"; echo to-stderr >&2; exit 3",
                ]),
                b"piped-input\n",
                GUEST_DEADLINE,
            )
        })
    };
    let once = once.join().expect("ctr run --rm thread");
    long.join().expect("long container started");
    booting.store(false, Ordering::Relaxed);
    let _ = watcher.join();
    let victim = detached("victim", "while true; do sleep 5; done");

    // ctr run --rm: stdin in, stdout and stderr out, the exit code, and a kernel of its own.
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
    assert!(most_vmms.load(Ordering::Relaxed) >= 2, "never saw two VMs at once");
    assert!(!c.sandbox_dirs().iter().any(|d| d.ends_with("once")), "the --rm pod's sandbox is gone");

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
    let ctr_line = format!(
        "ctr --address {} --namespace {} task exec -t --exec-id e3 long sh -c 'tty; echo tty-ok'",
        c.socket.display(),
        c.namespace
    );
    let tty = nestbox_tests::run_with_deadline(Command::new("script").args(["-qec", &ctr_line, "/dev/null"]), IN_GUEST);
    assert!(tty.stdout.contains("/dev/pts/") && tty.stdout.contains("tty-ok"), "{tty:?}");

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

    victim.join().expect("victim container started");
    // The victim's VMM dies: its container exits with an error status, containerd hears of
    // it, and its sandbox is cleaned up.
    let victim_dir = c.sandboxes.join("victim");
    let vmm_pid: i32 =
        std::fs::read_to_string(victim_dir.join("vmm.pid")).expect("victim's vmm.pid").trim().parse().expect("a pid");
    // SAFETY: kill(2) on the victim's VMM, whose PID the shim recorded; no memory involved.
    assert_eq!(unsafe { libc::kill(vmm_pid, libc::SIGKILL) }, 0);
    wait_for_status(&c, "victim", "STOPPED");
    let deleted = c.run(&["task", "delete", "victim"], IN_GUEST);
    assert_eq!(deleted.status.code(), Some(255), "{deleted:?}");
    assert!(!victim_dir.exists(), "the dead VM's sandbox was not cleaned up");

    // kill with a signal: the container's trap turns SIGTERM into exit code 42.
    c.ok(&["task", "kill", "--signal", "SIGTERM", "long"], IN_GUEST);
    wait_for_status(&c, "long", "STOPPED");
    let deleted = c.run(&["task", "delete", "long"], IN_GUEST);
    assert_eq!(deleted.status.code(), Some(42), "{deleted:?}");
    c.ok(&["containers", "rm", "long", "victim"], IN_GUEST);

    c.assert_clean();
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
