//! Bad input: clear errors, and nothing left behind (no cgroup, no process).

use std::collections::HashSet;
use std::path::Path;

use nestbox_protocols::agent::{
    CloseStdinRequest, CreateContainerRequest, PauseContainerRequest, ResumeContainerRequest, StatsContainerRequest,
    TtyWinResizeRequest, UpdateContainerRequest,
};
use nestbox_protocols::ttrpc;
use nestbox_protocols::types::Stdio;
use serde_json::json;

use crate::harness::{ctx, expect_code, Agent};

#[test]
fn bad_input_gets_clear_errors_and_leaves_nothing_behind() {
    root_only!();
    let agent = Agent::start();
    let rootfs = agent.rootfs("rootfs");
    let before: HashSet<i32> = agent.children().into_iter().collect();

    refused_creates_leave_nothing_behind(&agent, &rootfs);
    calls_in_the_wrong_state_are_refused(&agent, &rootfs);
    calls_on_an_unknown_container_are_not_found(&agent);

    // No process of ours is left, zombie or not.
    let after: HashSet<i32> = agent.children().into_iter().collect();
    assert!(after.is_subset(&before), "children left: {:?}", after.difference(&before).collect::<Vec<_>>());
}

/// Creates refused before anything is made (INVALID_ARGUMENT) and inside the helper
/// (FAILED_PRECONDITION), each leaving no cgroup behind.
fn refused_creates_leave_nothing_behind(agent: &Agent, rootfs: &Path) {
    let missing = agent.spec(&agent.dir.path().join("no-rootfs"), &["true"]);
    expect_code(agent.create("c", &missing, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "does not exist");
    for dir in agent.cgroup_dirs("c") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    let req =
        CreateContainerRequest { container_id: "c".into(), oci_spec_json: b"{not json".to_vec(), ..Default::default() };
    expect_code(
        agent.client.create_container(ctx(), &req).map(drop),
        ttrpc::Code::INVALID_ARGUMENT,
        "invalid OCI spec JSON",
    );
    expect_code(
        agent.create("../x", &agent.spec(rootfs, &["true"]), Stdio::default()),
        ttrpc::Code::INVALID_ARGUMENT,
        "container id",
    );
    let mut no_args = agent.spec(rootfs, &[]);
    no_args["process"]["args"] = json!([]);
    expect_code(agent.create("c", &no_args, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "process.args is empty");
    let mut userns = agent.spec(rootfs, &["true"]);
    userns["linux"]["namespaces"].as_array_mut().unwrap().push(json!({"type": "user"}));
    expect_code(agent.create("c", &userns, Stdio::default()), ttrpc::Code::INVALID_ARGUMENT, "not supported");
    // A setup failure inside the helper (a bind mount of a missing source) is reported and undone.
    let mut bad_mount = agent.spec(rootfs, &["true"]);
    bad_mount["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["rbind"]}));
    expect_code(agent.create("c", &bad_mount, Stdio::default()), ttrpc::Code::FAILED_PRECONDITION, "/no/such/dir");
    for dir in agent.cgroup_dirs("c") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    // A program the rootfs does not have fails the create, as with runc, by path or by name.
    for missing in ["/no/such/program", "no-such-program"] {
        expect_code(
            agent.create("c", &agent.spec(rootfs, &[missing]), Stdio::default()),
            ttrpc::Code::FAILED_PRECONDITION,
            missing,
        );
    }
}

/// The id is reusable after the failures; calls that do not fit the container's state.
fn calls_in_the_wrong_state_are_refused(agent: &Agent, rootfs: &Path) {
    // The id is free again after every failure.
    agent.create("c", &agent.spec(rootfs, &["true"]), Stdio::default()).expect("create after failures");
    expect_code(
        agent.create("c", &agent.spec(rootfs, &["true"]), Stdio::default()),
        ttrpc::Code::ALREADY_EXISTS,
        "already exists",
    );
    expect_code(
        agent.exec("c", "e", &json!({"args": ["true"], "cwd": "/"}), Stdio::default()),
        ttrpc::Code::FAILED_PRECONDITION,
        "not started",
    );
    agent.start_container("c").expect("start");
    assert_eq!(agent.wait("c", "").expect("wait"), 0);
    expect_code(agent.start_container("c"), ttrpc::Code::FAILED_PRECONDITION, "already started");
    expect_code(
        agent.exec("c", "e", &json!({"args": ["true"], "cwd": "/"}), Stdio::default()),
        ttrpc::Code::FAILED_PRECONDITION,
        "not running",
    );
    expect_code(agent.signal("c", "", libc::SIGTERM), ttrpc::Code::FAILED_PRECONDITION, "already exited");
    expect_code(agent.signal("c", "nope", libc::SIGTERM), ttrpc::Code::NOT_FOUND, "no exec nope");
    expect_code(agent.wait("c", "nope"), ttrpc::Code::NOT_FOUND, "no exec nope");
    let close = CloseStdinRequest { container_id: "c".into(), exec_id: "nope".into(), ..Default::default() };
    expect_code(agent.client.close_stdin(ctx(), &close), ttrpc::Code::NOT_FOUND, "no exec nope");
    agent.remove("c").expect("remove");
    for dir in agent.cgroup_dirs("c") {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

fn calls_on_an_unknown_container_are_not_found(agent: &Agent) {
    // Every call on an unknown container.
    let c = &agent.client;
    let id = || "ghost".to_string();
    let nf = ttrpc::Code::NOT_FOUND;
    expect_code(agent.start_container("ghost"), nf, "no container ghost");
    expect_code(agent.exec("ghost", "e", &json!({"args": ["true"]}), Stdio::default()), nf, "no container ghost");
    expect_code(agent.signal("ghost", "", 9), nf, "no container ghost");
    expect_code(agent.wait("ghost", ""), nf, "no container ghost");
    expect_code(agent.remove("ghost"), nf, "no container ghost");
    expect_code(
        c.pause_container(ctx(), &PauseContainerRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(
        c.resume_container(ctx(), &ResumeContainerRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(
        c.update_container(ctx(), &UpdateContainerRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(
        c.stats_container(ctx(), &StatsContainerRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(
        c.tty_win_resize(ctx(), &TtyWinResizeRequest { container_id: id(), ..Default::default() }),
        nf,
        "ghost",
    );
    expect_code(c.close_stdin(ctx(), &CloseStdinRequest { container_id: id(), ..Default::default() }), nf, "ghost");
}
