//! A CRI pod as kubelet drives one, under a private containerd with the CRI plugin, with
//! runc and with nestbox as the runtime handler: RunPodSandbox, CreateContainer and
//! StartContainer of a busybox container, ExecSync (output and exit codes),
//! ContainerStatus, StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox, and
//! then nothing left: no pod, no sandbox directory, no VMM.
//!
//! The pods have kubelet's default namespaces: a network namespace of the pod (CNI's bridge,
//! inside a network namespace of the test's own; a nestbox guest has only loopback until it
//! has networking), a pod IPC namespace and a PID namespace per container. The nestbox pod
//! is the first of its shape, so it makes the warm-start template (one guest boot, minutes
//! here) and is restored from it.

use nestbox_tests::containerd::{Containerd, Options, BUSYBOX};
use nestbox_tests::cri::{api::ContainerState, api::NamespaceMode, container_config, namespaces, pod_config};
use nestbox_tests::GUEST_DEADLINE;
use std::time::Duration;

/// One CRI call that does not start a VM.
const QUICK: Duration = Duration::from_secs(60);

fn pod_lifecycle(handler: &str, nestbox_config: &str, deadline: Duration) {
    let options = Options { cri: true, pod_network: true, ..Default::default() };
    let c = Containerd::start_with(&format!("cri-{handler}"), nestbox_config, options);
    c.import_busybox();
    let cri = c.cri();
    let logs = c.dir.join("pod-logs");
    std::fs::create_dir_all(&logs).expect("creating the pod's log folder");
    let ns = namespaces(NamespaceMode::Pod, NamespaceMode::Pod, NamespaceMode::Container);
    let sandbox = pod_config(&format!("smoke-{handler}"), &std::process::id().to_string(), &logs, ns.clone());
    let context = || format!("containerd log tail:\n{}", c.log_tail(60));

    let pod = cri.run_pod_sandbox(&sandbox, handler, deadline).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let config = container_config("work", BUSYBOX, &["/bin/sh", "-c", "echo started; exec sleep 3600"], "work.log", ns);
    let container =
        cri.create_container(&pod, &config, &sandbox, deadline).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    cri.start_container(&container, deadline).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let status = cri.container_status(&container, QUICK).expect("ContainerStatus");
    assert_eq!(status.state, ContainerState::ContainerRunning as i32, "{status:?}");

    let hi = cri.exec_sync(&container, &["echo", "hi"], 0, deadline).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    assert_eq!((hi.stdout.as_str(), hi.exit_code), ("hi\n", 0), "{hi:?}");
    let failing = cri.exec_sync(&container, &["sh", "-c", "echo oops >&2; exit 3"], 0, deadline).expect("ExecSync");
    assert_eq!((failing.stderr.as_str(), failing.exit_code), ("oops\n", 3), "{failing:?}");
    let listed = cri.list_containers(Some(&pod), QUICK).expect("ListContainers");
    assert_eq!(listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [container.as_str()]);

    cri.stop_container(&container, 10, deadline).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    let status = cri.container_status(&container, QUICK).expect("ContainerStatus");
    assert_eq!(status.state, ContainerState::ContainerExited as i32, "{status:?}");
    cri.remove_container(&container, deadline).expect("RemoveContainer");
    cri.stop_pod_sandbox(&pod, deadline).unwrap_or_else(|e| panic!("{e}\n{}", context()));
    cri.remove_pod_sandbox(&pod, deadline).expect("RemovePodSandbox");

    assert!(cri.list_pod_sandbox(QUICK).expect("ListPodSandbox").is_empty(), "pods left");
    assert!(cri.list_containers(None, QUICK).expect("ListContainers").is_empty(), "containers left");
    c.assert_clean();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !(c.shim_pids().is_empty() && c.shims_of("runc").is_empty()) {
        assert!(std::time::Instant::now() < deadline, "shims left: {:?} {:?}", c.shim_pids(), c.shims_of("runc"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn runc_pod_lifecycle() {
    pod_lifecycle("runc", "", QUICK);
}

#[test]
fn nestbox_pod_lifecycle() {
    pod_lifecycle("nestbox", "[agent]\nboot_timeout_secs = 900\n", GUEST_DEADLINE);
}
