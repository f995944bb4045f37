//! The pod's namespaces (`nestbox_protocols::pod`): network, IPC and UTS made at
//! CreateSandbox and shared by every container that names them, the PID namespace of the
//! first container that names it shared by the later ones, a new one for the others.

use nestbox_protocols::agent::{CreateSandboxRequest, DestroySandboxRequest};
use nestbox_protocols::pod::namespace_path;
use nestbox_protocols::ttrpc;
use nestbox_protocols::types::Stdio;
use serde_json::{json, Value};

use crate::harness::{ctx, expect_code, Agent};

/// A spec whose network, IPC and UTS namespaces are the pod's, and its PID namespace too
/// when `pod_pid`, as the shim rewrites CRI's specs; no hostname (the pause container
/// names the pod's, which is the UTS namespace's).
fn pod_spec(agent: &Agent, rootfs: &std::path::Path, args: &[&str], pod_pid: bool) -> Value {
    let mut spec = agent.spec(rootfs, args);
    spec.as_object_mut().expect("a spec is an object").remove("hostname");
    let pid = if pod_pid { json!({"type": "pid", "path": namespace_path("pid")}) } else { json!({"type": "pid"}) };
    spec["linux"]["namespaces"] = json!([
        pid,
        {"type": "ipc", "path": namespace_path("ipc")},
        {"type": "uts", "path": namespace_path("uts")},
        {"type": "network", "path": namespace_path("net")},
        {"type": "mount"}
    ]);
    spec
}

/// What a container sees of its namespaces: their identities, the hostname, PID 1's name
/// and the loopback's flags.
const SHOW: &str = "for n in net ipc uts pid; do readlink /proc/self/ns/$n; done; hostname; cat /proc/1/comm; \
                    cat /sys/class/net/lo/flags";

#[test]
fn containers_of_a_pod_share_its_namespaces() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let req = CreateSandboxRequest { sandbox_id: "pod".into(), hostname: "pod-host".into(), ..Default::default() };
    agent.client.create_sandbox(ctx(), &req).expect("CreateSandbox");

    // The pause container: it makes the pod's PID namespace and names the pod.
    let mut pause = pod_spec(&agent, &rootfs, &["sleep", "1000"], true);
    pause["hostname"] = json!("web-0");
    agent.create("pause", &pause, Stdio::default()).expect("create pause");
    agent.start_container("pause").expect("start pause");

    let shared = pod_spec(&agent, &rootfs, &["sh", "-c", SHOW], true);
    let (status, a, err) = agent.run("a", &shared);
    assert_eq!(status, 0, "{err}");
    let (status, b, err) = agent.run("b", &shared);
    assert_eq!(status, 0, "{err}");
    let own_pid = pod_spec(&agent, &rootfs, &["sh", "-c", SHOW], false);
    let (status, c, err) = agent.run("c", &own_pid);
    assert_eq!(status, 0, "{err}");

    let (a, b, c): (Vec<&str>, Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect(), c.lines().collect());
    assert_eq!(a.len(), 7, "{a:?}");
    assert_eq!(a, b, "two containers of the pod see the same namespaces, hostname and PID 1");
    assert_eq!(a[..3], c[..3], "network, IPC and UTS are the pod's whatever the PID namespace");
    assert_ne!(a[3], c[3], "a container without the pod's PID namespace has its own");
    assert_eq!((a[4], a[5], c[5]), ("web-0", "sleep", "sh"), "hostname from the pause spec; PID 1: {a:?} {c:?}");
    assert_eq!(a[6], "0x9", "the pod's loopback is up (IFF_UP | IFF_LOOPBACK)");
    let host_net = std::fs::read_link("/proc/self/ns/net").expect("own netns");
    assert_ne!(a[0], host_net.to_string_lossy(), "the pod's network namespace is not the agent's");

    // An exec joins the container's namespaces, the pod's PID namespace included.
    agent.create("d", &pod_spec(&agent, &rootfs, &["sleep", "1000"], true), Stdio::default()).expect("create d");
    agent.start_container("d").expect("start d");
    let exec = json!({"args": ["sh", "-c", SHOW], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]});
    let out = crate::harness::read_all(agent.stream(nestbox_protocols::stdio::StreamKind::Stdout, "d", "e"));
    agent.exec("d", "e", &exec, Stdio { stdout: true, ..Default::default() }).expect("exec");
    assert_eq!(agent.wait("d", "e").expect("wait exec"), 0);
    assert_eq!(crate::harness::join(out).lines().collect::<Vec<_>>(), a, "an exec sees what the pod's containers see");
    agent.remove("d").expect("remove d");

    // A path below the pod's folder must name the entry's own kind.
    let mut wrong = pod_spec(&agent, &rootfs, &["true"], false);
    wrong["linux"]["namespaces"][1]["path"] = json!(namespace_path("uts"));
    expect_code(agent.create("w", &wrong, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "pod's uts namespace");

    agent.remove("pause").expect("remove pause");
    agent.client.destroy_sandbox(ctx(), &DestroySandboxRequest::default()).expect("DestroySandbox");
    expect_code(
        agent.create("late", &pod_spec(&agent, &rootfs, &["true"], false), Stdio::default()),
        ttrpc::Code::FAILED_PRECONDITION,
        "no sandbox",
    );
}
