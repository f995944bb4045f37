#!/usr/bin/env bash
# Builds the nestbox guest image and installs it where nestbox-vmm looks by default:
#   vmlinux         Debian's linux-source 6.1 + kernel.config (on allnoconfig) + patches/
#   initramfs.cpio  uncompressed newc cpio with the static nestbox-agent as /init
#
# Both are cached outside the repository, keyed by a hash of their inputs, so an
# unchanged rebuild only hashes and copies.
#
# Usage: guest-image/build.sh [kernel|initramfs|all]   (default: all)
# Environment:
#   NESTBOX_CACHE_DIR  cache of built artifacts and kernel trees (default /var/cache/nestbox)
#   NESTBOX_GUEST_DIR  install directory                        (default /usr/local/share/nestbox)
#   NESTBOX_AGENT      a prebuilt static agent to pack instead of building one
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache=${NESTBOX_CACHE_DIR:-/var/cache/nestbox}
guest_dir=${NESTBOX_GUEST_DIR:-/usr/local/share/nestbox}
what=${1:-all}
kernel_pkg=linux-source-6.1
kernel_tar=/usr/src/linux-source-6.1.tar.xz

log() { echo "guest-image: $*" >&2; }
die() { echo "guest-image: error: $*" >&2; exit 1; }
hash_of() { sha256sum "$@" | sha256sum | cut -c1-16; }

install_file() { # src dst: atomic replace, so a running VMM never reads half a file
    # An identical file stays as it is: the shim keys its warm-start templates by the image
    # files' identity (inode, mtime), so replacing it would throw away every good template.
    if cmp -s "$1" "$2"; then return 0; fi
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"
}

build_kernel() {
    [ -f "$kernel_tar" ] || die "$kernel_tar not found: install Debian's $kernel_pkg package"
    local version patches_hash key tree out
    version=$(dpkg-query -W -f='${Version}' "$kernel_pkg")
    patches_hash=$(cd "$here" && hash_of patches/*.patch)
    key=$( (echo "$kernel_pkg $version"; cd "$here" && cat kernel.config patches/*.patch build.sh) | sha256sum | cut -c1-16)
    out="$cache/kernel-$key/vmlinux"
    if [ -f "$out" ]; then
        log "kernel $version ($key) cached: $out"
    else
        # The patched tree is kept (keyed by source version and patches), so a config
        # change rebuilds incrementally in seconds instead of minutes.
        tree="$cache/src/linux-$version-$patches_hash"
        if [ ! -f "$tree/.nestbox-patched" ]; then
            log "unpacking $kernel_tar into $tree"
            rm -rf "$tree" && mkdir -p "$tree"
            tar -xf "$kernel_tar" -C "$tree" --strip-components=1
            for p in "$here"/patches/*.patch; do
                log "applying $(basename "$p")"
                patch -d "$tree" -p1 --quiet --forward < "$p" || die "patch $p does not apply to $kernel_pkg $version"
            done
            touch "$tree/.nestbox-patched"
        fi
        log "configuring kernel (allnoconfig + kernel.config)"
        (cd "$tree" && ARCH=x86_64 scripts/kconfig/merge_config.sh -n "$here/kernel.config" >/dev/null \
            && make ARCH=x86_64 olddefconfig >/dev/null)
        # merge_config only warns when a requested option did not survive; a silently
        # missing option (say VIRTIO_VSOCKETS) would surface as a guest that never answers.
        local missing=0 line name
        while IFS= read -r line; do
            case "$line" in
                CONFIG_*=*)
                    grep -qxF "$line" "$tree/.config" || { log "option not applied: $line"; missing=1; } ;;
                "# CONFIG_"*" is not set")
                    name=${line#"# "}; name=${name%" is not set"}
                    ! grep -q "^$name=" "$tree/.config" || { log "option still enabled: $name"; missing=1; } ;;
            esac
        done < "$here/kernel.config"
        [ "$missing" = 0 ] || die "kernel.config asks for options the kernel did not accept (see above)"
        log "building vmlinux with $(nproc) jobs (minutes on a cold tree)"
        (cd "$tree" && make ARCH=x86_64 -j"$(nproc)" vmlinux >"$tree/build.log" 2>&1) \
            || { tail -30 "$tree/build.log" >&2; die "kernel build failed; full log: $tree/build.log"; }
        mkdir -p "$(dirname "$out")"
        cp "$tree/vmlinux" "$out.tmp" && mv "$out.tmp" "$out"
        cp "$tree/.config" "$(dirname "$out")/config"
        log "kernel built: $out"
    fi
    install_file "$out" "$guest_dir/vmlinux"
}

build_initramfs() {
    local agent=${NESTBOX_AGENT:-}
    if [ -z "$agent" ]; then
        log "building the static agent (x86_64-unknown-linux-musl)"
        # The size-optimised profile (Cargo.toml's [profile.agent]): every MB costs boot time.
        (cd "$repo" && cargo build --quiet --profile agent -p nestbox-agent --target x86_64-unknown-linux-musl) \
            || die "agent build failed (is the target installed? rustup target add x86_64-unknown-linux-musl)"
        agent="$repo/target/x86_64-unknown-linux-musl/agent/nestbox-agent"
    fi
    [ -x "$agent" ] || die "agent binary $agent missing or not executable"
    file -b "$agent" 2>/dev/null | grep -q "statically linked\|static-pie" \
        || die "agent $agent is not statically linked; it runs as PID 1 with no libraries"
    local key out
    key=$(hash_of "$agent" "$here/mkcpio.py")
    out="$cache/initramfs-$key.cpio"
    if [ -f "$out" ]; then
        log "initramfs ($key) cached: $out"
    else
        python3 "$here/mkcpio.py" "$out.tmp" --agent "$agent" && mv "$out.tmp" "$out"
        log "initramfs built: $out ($(stat -c %s "$out") bytes)"
    fi
    install_file "$out" "$guest_dir/initramfs.cpio"
}

case "$what" in
    kernel) build_kernel ;;
    initramfs) build_initramfs ;;
    all) build_kernel; build_initramfs ;;
    *) die "unknown target '$what' (kernel, initramfs or all)" ;;
esac
log "installed in $guest_dir"
