//! Processes: signals, exec into a running container, exit statuses and orphans.

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use nestbox_protocols::stdio::{self, StreamHeader, StreamKind};
use nestbox_protocols::ttrpc;
use nestbox_protocols::types::Stdio;
use serde_json::json;

use crate::harness::{expect_code, join, out_err, read_all, Agent};

#[test]
fn signals_reach_init_and_exec_processes() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    // A shell as PID 1 of its namespace only gets signals it handles (the kernel drops the
    // rest for a namespace's init), so the trap is what makes TERM count.
    let script = "trap 'echo got TERM; exit 42' TERM; echo ready; while :; do sleep 0.05; done";
    agent.create("c", &agent.spec(&rootfs, &["sh", "-c", script]), out_err()).expect("create");
    let mut out = BufReader::new(agent.stream(StreamKind::Stdout, "c", ""));
    let _err = agent.stream(StreamKind::Stderr, "c", "");
    agent.start_container("c").expect("start");
    let mut line = String::new();
    out.read_line(&mut line).expect("ready line");
    assert_eq!(line, "ready\n");

    let sleeper = json!({"args": ["sleep", "1000"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]});
    agent.exec("c", "e1", &sleeper, Stdio::default()).expect("exec");
    agent.signal("c", "e1", libc::SIGTERM).expect("TERM to the exec");
    assert_eq!(agent.wait("c", "e1").expect("wait exec"), 128 + libc::SIGTERM as u32);

    agent.signal("c", "", libc::SIGTERM).expect("TERM to init");
    assert_eq!(agent.wait("c", "").expect("wait"), 42);
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("rest of the output");
    assert_eq!(rest, "got TERM\n");
    // Asked twice, the same status; a signal now is refused.
    assert_eq!(agent.wait("c", "").expect("wait again"), 42);
    expect_code(agent.signal("c", "", libc::SIGKILL), ttrpc::Code::FAILED_PRECONDITION, "already exited");
    agent.remove("c").expect("remove");

    // SIGKILL: 128 + 9.
    agent.create("k", &agent.spec(&rootfs, &["sleep", "1000"]), Stdio::default()).expect("create");
    agent.start_container("k").expect("start");
    agent.signal("k", "", libc::SIGKILL).expect("KILL");
    assert_eq!(agent.wait("k", "").expect("wait"), 137);
    agent.remove("k").expect("remove");
}

#[test]
fn exec_into_a_running_container_sees_its_namespaces() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    agent.create("c", &agent.spec(&rootfs, &["sleep", "1000"]), Stdio::default()).expect("create");
    let init_pid = agent.start_container("c").expect("start");
    assert!(init_pid > 1);

    let process = json!({
        "args": ["sh", "-c", "echo pid=$$; tr '\\0' ' ' < /proc/1/cmdline; echo; hostname; ls /proc | grep -c '^[0-9]'; echo oops >&2; exit 7"],
        "cwd": "/tmp", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]
    });
    // ExecProcess starts the process once its streams are there: they are opened first
    // (or from another thread while the call waits).
    let out = read_all(agent.stream(StreamKind::Stdout, "c", "e1"));
    let err = read_all(agent.stream(StreamKind::Stderr, "c", "e1"));
    agent.exec("c", "e1", &process, out_err()).expect("exec");
    assert_eq!(agent.wait("c", "e1").expect("wait"), 7);
    let out = join(out);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("pid=") && lines[0] != "pid=1", "{out}");
    assert_eq!(lines[1].trim(), "sleep 1000", "the container's PID 1 is its init: {out}");
    assert_eq!(lines[2], "box");
    // Only the container's processes: init, the shell, and ls.
    assert!(lines[3].parse::<u32>().is_ok_and(|n| n <= 4), "{out}");
    assert_eq!(join(err), "oops\n");
    // Delivered once: the exec is gone afterwards.
    expect_code(agent.wait("c", "e1"), ttrpc::Code::NOT_FOUND, "no exec e1");

    // A stream opened while ExecProcess waits for it.
    let late = {
        let io_socket = agent.io_socket.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let header = StreamHeader::new(StreamKind::Stdout, "c", "e2");
            join(read_all(stdio::connect_unix(io_socket, &header).expect("opening a stream")))
        })
    };
    let echo = json!({"args": ["echo", "late"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    agent.exec("c", "e2", &echo, Stdio { stdout: true, ..Default::default() }).expect("exec");
    assert_eq!(agent.wait("c", "e2").expect("wait"), 0);
    assert_eq!(late.join().expect("reader"), "late\n");

    // A duplicate exec id while the first runs.
    let sleeper = json!({"args": ["sleep", "100"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    agent.exec("c", "e3", &sleeper, Stdio::default()).expect("exec");
    expect_code(agent.exec("c", "e3", &sleeper, Stdio::default()), ttrpc::Code::ALREADY_EXISTS, "exec e3 exists");
    // Removal kills every process, execs included.
    agent.remove("c").expect("remove");
    assert!(agent.children().is_empty(), "children left: {:?}", agent.children());
}

#[test]
fn every_exit_status_arrives_once_and_orphans_are_reaped() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    // No PID namespace: what a process leaves behind is re-parented to the agent (a
    // subreaper in host mode, PID 1 in a guest), which must reap it.
    let mut spec = agent.spec(&rootfs, &["sleep", "1000"]);
    spec["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]);
    agent.create("c", &spec, Stdio::default()).expect("create");
    agent.start_container("c").expect("start");

    // Many short processes at once, each with its own exit code, each leaving an orphan.
    std::thread::scope(|s| {
        for i in 0..16u32 {
            let agent = &agent;
            s.spawn(move || {
                let exec_id = format!("e{i}");
                let script = format!("sleep 0.3 & exit {}", i + 1);
                let process = json!({"args": ["sh", "-c", script], "cwd": "/", "user": {"uid": 0, "gid": 0}});
                agent.exec("c", &exec_id, &process, Stdio::default()).expect("exec");
                assert_eq!(agent.wait("c", &exec_id).expect("wait"), i + 1, "{exec_id}");
            });
        }
    });
    // The orphans end after 0.3 s and nothing of them stays: no zombie among the agent's
    // children, only the container's init.
    let start = Instant::now();
    loop {
        let zombies: Vec<i32> = agent
            .children()
            .into_iter()
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
            })
            .collect();
        let children = agent.children();
        if zombies.is_empty() && children.len() == 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "children {children:?}, zombies {zombies:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.remove("c").expect("remove");
    assert!(agent.children().is_empty(), "children left: {:?}", agent.children());
}
