//! cgroup limits and controls: memory (OOM event), pids, pause/resume, statistics.

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nestbox_protocols::agent::{
    GetOOMEventRequest, PauseContainerRequest, ResumeContainerRequest, StatsContainerRequest,
};
use nestbox_protocols::stdio::StreamKind;
use nestbox_protocols::ttrpc;
use nestbox_protocols::types::Stdio;
use serde_json::json;

use crate::harness::{ctx, expect_code, Agent, CALL_TIMEOUT};

#[test]
fn memory_limit_triggers_an_oom_event() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let mut spec = agent.spec(&rootfs, &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
    spec["linux"]["resources"] = json!({"memory": {"limit": 16 << 20, "swap": 16 << 20}});
    agent.create("oom", &spec, Stdio::default()).expect("create");
    agent.start_container("oom").expect("start");
    assert_eq!(agent.wait("oom", "").expect("wait"), 137, "killed by the OOM killer");
    let event = agent
        .client
        .get_oom_event(ttrpc::context::with_timeout(10_000_000_000), &GetOOMEventRequest::new())
        .expect("an OOM event");
    assert_eq!(event.container_id, "oom");
    let stats = agent
        .client
        .stats_container(ctx(), &StatsContainerRequest { container_id: "oom".into(), ..Default::default() })
        .expect("stats");
    let memory = stats.cgroup_stats.memory.clone().unwrap_or_default();
    assert_eq!(memory.limit, 16 << 20);
    assert!(memory.oom_kill_events >= 1, "{memory:?}");
    agent.remove("oom").expect("remove");
}

#[test]
fn pids_limit_stops_forks() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let script = "for i in 1 2 3 4 5 6 7 8; do sleep 5 & done; echo started; kill $(jobs -p) 2>/dev/null; exit 0";
    let mut spec = agent.spec(&rootfs, &["sh", "-c", script]);
    spec["linux"]["resources"] = json!({"pids": {"limit": 4}});
    let (_, out, err) = agent.run("p", &spec);
    assert!(err.contains("fork") || err.contains("Resource temporarily unavailable"), "stderr {err:?}; stdout {out:?}");
}

#[test]
fn pause_freezes_resume_thaws_and_stats_report_usage() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let script = "i=0; while :; do i=$((i+1)); [ $((i % 2000)) = 0 ] && echo tick; done";
    agent
        .create("c", &agent.spec(&rootfs, &["sh", "-c", script]), Stdio { stdout: true, ..Default::default() })
        .expect("create");
    let mut stream = agent.stream(StreamKind::Stdout, "c", "");
    let ticks = Arc::new(Mutex::new(0usize));
    let counter = {
        let ticks = ticks.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                *ticks.lock().unwrap() += buf[..n].iter().filter(|b| **b == b'\n').count();
            }
        })
    };
    agent.start_container("c").expect("start");
    let count = || *ticks.lock().unwrap();
    let start = Instant::now();
    while count() < 3 {
        assert!(start.elapsed() < CALL_TIMEOUT, "no output");
        std::thread::sleep(Duration::from_millis(10));
    }
    let id = || "c".to_string();
    agent
        .client
        .pause_container(ctx(), &PauseContainerRequest { container_id: id(), ..Default::default() })
        .expect("pause");
    std::thread::sleep(Duration::from_millis(200));
    let frozen = count();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(count(), frozen, "output while paused");
    let t = json!({"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}});
    expect_code(agent.exec("c", "e", &t, Stdio::default()), ttrpc::Code::FAILED_PRECONDITION, "paused");
    agent
        .client
        .resume_container(ctx(), &ResumeContainerRequest { container_id: id(), ..Default::default() })
        .expect("resume");
    let resumed = Instant::now();
    while count() <= frozen {
        assert!(resumed.elapsed() < CALL_TIMEOUT, "no output after resume");
        std::thread::sleep(Duration::from_millis(10));
    }

    let stats = agent
        .client
        .stats_container(ctx(), &StatsContainerRequest { container_id: id(), ..Default::default() })
        .expect("stats");
    let (cpu, memory, pids) = (
        stats.cgroup_stats.cpu.clone().unwrap_or_default(),
        stats.cgroup_stats.memory.clone().unwrap_or_default(),
        stats.cgroup_stats.pids.clone().unwrap_or_default(),
    );
    assert!(cpu.usage_usec > 10_000, "a busy loop used CPU: {cpu:?}");
    assert!(memory.usage > 0, "{memory:?}");
    assert!(pids.current >= 1, "{pids:?}");
    agent.remove("c").expect("remove");
    counter.join().expect("counter");
}
