#!/bin/sh
# The entrypoint of nestbox's DaemonSet installer image (scripts/installer-image,
# deploy/nestbox-deploy.yaml; kata-deploy's model): installs nestbox on the node whose root
# file system is mounted at $NESTBOX_HOST_ROOT, restarts containerd through the host if its
# config changed, sleeps until the pod is deleted, and on SIGTERM uninstalls (containerd's
# config back as it was) and restarts containerd again.
#
# Environment:
#   NESTBOX_HOST_ROOT          the node's root file system (default /host)
#   NESTBOX_RESTART_CMD        how containerd is restarted (run by sh -c); default: systemd's
#                              systemctl in the host's namespaces, reached through PID 1 (the
#                              pod has hostPID):
#                              nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd
#   NESTBOX_CONTAINERD_CONFIG  containerd's config on the node (default /etc/containerd/config.toml)
#   NESTBOX_PREFIX             where the files go on the node (default /usr/local)
set -u
host=${NESTBOX_HOST_ROOT:-/host}
restart_cmd=${NESTBOX_RESTART_CMD:-nsenter --target 1 --mount --uts --ipc --net --pid -- systemctl restart containerd}
config=${NESTBOX_CONTAINERD_CONFIG:-/etc/containerd/config.toml}
prefix=${NESTBOX_PREFIX:-/usr/local}
before=/tmp/containerd-config.before

log() { echo "nestbox-installer: $*"; }

# Runs $1 (install or uninstall), then restarts containerd if its config changed.
run() {
    rm -f "$before"
    [ -f "$host$config" ] && cp "$host$config" "$before"
    "$@" || return 1
    if [ -f "$host$config" ] && [ -f "$before" ] && cmp -s "$before" "$host$config"; then
        log "containerd's config is unchanged: no restart"
    elif [ ! -f "$host$config" ] && [ ! -f "$before" ]; then
        log "there is no containerd config: no restart"
    else
        log "restarting containerd: $restart_cmd"
        sh -c "$restart_cmd" || log "the restart command failed (exit $?): restart containerd by hand"
    fi
}

uninstall() {
    log "terminating: uninstalling nestbox from $host"
    [ -n "${sleeper:-}" ] && kill "$sleeper" 2>/dev/null
    if run nestbox uninstall --root "$host"; then
        log "uninstalled"
        exit 0
    fi
    log "uninstall failed"
    exit 1
}

trap uninstall TERM INT
log "installing nestbox into $host (prefix $prefix, containerd config $config)"
if ! run nestbox install --root "$host" --prefix "$prefix" --containerd-config "$config"; then
    log "install failed"
    exit 1
fi
log "installed; waiting for SIGTERM to uninstall"
while :; do
    sleep 3600 &
    sleeper=$!
    wait "$sleeper"
done
