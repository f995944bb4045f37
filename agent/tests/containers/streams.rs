//! Standard I/O: output and exit codes, a terminal and its size, stdin EOF.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nestbox_protocols::agent::{CloseStdinRequest, TtyWinResizeRequest};
use nestbox_protocols::stdio::StreamKind;
use nestbox_protocols::ttrpc;
use nestbox_protocols::types::Stdio;
use serde_json::json;

use crate::harness::{ctx, expect_code, join, read_all, Agent, CALL_TIMEOUT};

#[test]
fn output_exit_codes_pid_namespace_and_hostname() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    // Output written just before exit (here 50000 lines, then exit at once) is all there.
    let script = "echo out; echo err >&2; echo pid=$$; hostname; seq 1 50000; exit 3";
    let (status, out, err) = agent.run("c1", &agent.spec(&rootfs, &["sh", "-c", script]));
    assert_eq!(status, 3);
    assert_eq!(err, "err\n");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..3], &["out", "pid=1", "box"], "own PID namespace and hostname");
    assert_eq!(lines.len(), 3 + 50000, "every line of output arrives");
    assert_eq!(lines.last(), Some(&"50000"));

    // A program that is not there: the create fails and says so (bad_input_... has more).
    expect_code(
        agent.create("c2", &agent.spec(&rootfs, &["no-such-program"]), Stdio::default()),
        ttrpc::Code::FAILED_PRECONDITION,
        "\"no-such-program\" not found",
    );
}

#[test]
fn terminal_with_resize() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let mut spec = agent.spec(&rootfs, &["sh", "-c", "stty size; [ -t 0 ] && echo is-a-tty; read line; stty size"]);
    spec["process"]["terminal"] = json!(true);
    spec["process"]["consoleSize"] = json!({"height": 24, "width": 80});
    agent.create("t", &spec, Stdio { terminal: true, ..Default::default() }).expect("create");
    let tty = agent.stream(StreamKind::Tty, "t", "");
    let mut input = tty.try_clone().expect("clone");
    let output = Arc::new(Mutex::new(String::new()));
    let reader = {
        let output = output.clone();
        let mut tty = tty;
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = tty.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    agent.start_container("t").expect("start");
    let wait_for = |text: &str| {
        let start = Instant::now();
        while !output.lock().unwrap().contains(text) {
            assert!(start.elapsed() < CALL_TIMEOUT, "no {text:?} in {:?}", output.lock().unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("24 80");
    wait_for("is-a-tty");
    let resize = TtyWinResizeRequest { container_id: "t".into(), rows: 40, columns: 100, ..Default::default() };
    agent.client.tty_win_resize(ctx(), &resize).expect("resize");
    input.write_all(b"go\n").expect("typing");
    wait_for("40 100");
    assert_eq!(agent.wait("t", "").expect("wait"), 0);
    reader.join().expect("reader");
    // Resizing a process without a terminal is refused.
    agent.create("p", &agent.spec(&rootfs, &["true"]), Stdio::default()).expect("create");
    let resize = TtyWinResizeRequest { container_id: "p".into(), rows: 1, columns: 1, ..Default::default() };
    expect_code(agent.client.tty_win_resize(ctx(), &resize), ttrpc::Code::FAILED_PRECONDITION, "no terminal");
    agent.remove("p").expect("remove");
    agent.remove("t").expect("remove");
}

#[test]
fn stdin_eof_by_close_stdin_and_by_half_close() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let with_stdin = Stdio { stdin: true, stdout: true, ..Default::default() };
    agent.create("c", &agent.spec(&rootfs, &["sh", "-c", "cat; echo done"]), with_stdin.clone()).expect("create");
    let mut input = agent.stream(StreamKind::Stdin, "c", "");
    let out = read_all(agent.stream(StreamKind::Stdout, "c", ""));
    agent.start_container("c").expect("start");
    input.write_all(b"hello\n").expect("writing stdin");
    let close = CloseStdinRequest { container_id: "c".into(), ..Default::default() };
    agent.client.close_stdin(ctx(), &close).expect("CloseStdin");
    assert_eq!(agent.wait("c", "").expect("wait"), 0);
    assert_eq!(join(out), "hello\ndone\n");
    agent.remove("c").expect("remove");

    agent.create("d", &agent.spec(&rootfs, &["sh", "-c", "wc -c"]), with_stdin).expect("create");
    let mut input = agent.stream(StreamKind::Stdin, "d", "");
    let out = read_all(agent.stream(StreamKind::Stdout, "d", ""));
    agent.start_container("d").expect("start");
    input.write_all(&[b'x'; 100_000]).expect("writing stdin");
    input.shutdown(std::net::Shutdown::Write).expect("half-close");
    assert_eq!(agent.wait("d", "").expect("wait"), 0);
    assert_eq!(join(out).trim(), "100000");
    agent.remove("d").expect("remove");
}
