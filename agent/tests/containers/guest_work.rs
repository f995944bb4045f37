//! The guest-work lines (the agent's `guest_work`): with its log level at debug, every
//! container call logs what it cost, and one container's create, start, exec and stop show
//! the forks and mounts they are made of.
//!
//! By hand, the system calls of that same sequence: `NESTBOX_AGENT_WRAPPER="strace -f -c -o
//! /tmp/agent.strace" cargo test -p nestbox-agent --test containers guest_work` runs the agent
//! under that command (here: every thread and helper counted, the summary in the file); the
//! agent then runs without counting (whose /proc reads would be in the summary), and only the
//! calls are checked.

use std::collections::HashMap;
use std::process::Stdio as ProcStdio;

use nestbox_protocols::stdio::StreamKind;
use nestbox_protocols::types::Stdio;
use serde_json::json;

use crate::harness::*;

/// The calls' lines in the agent's log: call name to its fields.
fn work_lines(log: &str) -> Vec<(String, HashMap<String, String>)> {
    log.lines()
        .filter_map(|l| l.strip_prefix("nestbox-agent: guest work "))
        .map(|l| {
            let mut words = l.split_whitespace();
            let call = words.next().unwrap_or_default().to_string();
            let fields = words.filter_map(|w| w.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
            (call, fields)
        })
        .collect()
}

fn number(fields: &HashMap<String, String>, key: &str) -> i64 {
    let v = fields.get(key).unwrap_or_else(|| panic!("no {key} in {fields:?}"));
    v.trim_start_matches('+').parse().unwrap_or_else(|_| panic!("{key}={v} is not a number"))
}

#[test]
fn every_container_call_logs_its_guest_work() {
    root_only!();
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log_path = log_dir.path().join("agent.log");
    let wrapped = std::env::var("NESTBOX_AGENT_WRAPPER").ok();
    let wrapper: Vec<&str> = wrapped.as_deref().map(|w| w.split_whitespace().collect()).unwrap_or_default();
    let env: &[(&str, &str)] = if wrapped.is_some() { &[] } else { &[("NESTBOX_AGENT_LOG", "debug")] };
    let log = std::fs::File::create(&log_path).expect("agent log");
    let agent = Agent::launch(&wrapper, env, ProcStdio::from(log));

    let rootfs = agent.rootfs("rootfs");
    agent.create("c", &agent.spec(&rootfs, &["sleep", "1000"]), Stdio::default()).expect("create");
    agent.start_container("c").expect("start");
    let out = read_all(agent.stream(StreamKind::Stdout, "c", "e1"));
    let echo = json!({"args": ["echo", "hi"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    agent.exec("c", "e1", &echo, Stdio { stdout: true, ..Default::default() }).expect("exec");
    assert_eq!(agent.wait("c", "e1").expect("wait"), 0);
    assert_eq!(join(out), "hi\n");
    agent.signal("c", "", libc::SIGKILL).expect("kill");
    assert_eq!(agent.wait("c", "").expect("wait"), 128 + 9);
    agent.remove("c").expect("remove");
    // Shutdown rather than the harness's SIGTERM, which a wrapper (strace) would take.
    agent.client.shutdown(ctx(), &nestbox_protocols::agent::ShutdownRequest::new()).expect("shutdown");
    drop(agent);

    let log = std::fs::read_to_string(&log_path).expect("agent log");
    if wrapped.is_some() {
        return;
    }
    let lines = work_lines(&log);
    let calls: Vec<&str> = lines.iter().map(|(c, _)| c.as_str()).collect();
    let want = [
        "CreateContainer",
        "StartContainer",
        "ExecProcess",
        "WaitProcess",
        "SignalProcess",
        "WaitProcess",
        "RemoveContainer",
        "Shutdown",
    ];
    assert_eq!(calls, want, "{log}");
    let by_call: HashMap<&str, &HashMap<String, String>> = lines.iter().map(|(c, f)| (c.as_str(), f)).collect();
    for (call, fields) in &lines {
        for key in ["wall_ms", "cpu_ms", "pgfault", "pgmajfault", "ctxt"] {
            assert!(fields.contains_key(key), "{call} lacks {key}: {log}");
        }
        assert!(number(fields, "forks") >= 0, "{log}");
    }
    // Create clones the container's init (the helper), exec one process more.
    assert!(number(by_call["CreateContainer"], "forks") >= 1, "{log}");
    assert!(number(by_call["ExecProcess"], "forks") >= 1, "{log}");
    // The spec's seven mounts and the root are in the container's own namespace.
    assert!(number(by_call["CreateContainer"], "container_mounts") >= 8, "{log}");
    assert!(number(by_call["CreateContainer"], "pgfault") > 0, "{log}");
    assert_eq!(by_call["ExecProcess"]["id"], "\"c/e1\"");
    eprintln!("{}", log.lines().filter(|l| l.contains("guest work")).collect::<Vec<_>>().join("\n"));
}
