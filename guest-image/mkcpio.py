#!/usr/bin/env python3
"""Writes the guest initramfs: an uncompressed newc cpio archive holding the static
nestbox-agent as /init, the directories it mounts on, and /dev/console (so the kernel
can give init a console before devtmpfs is mounted).

Uncompressed because the guest unpacks it much faster (see docs/guest-kernel.md). The
archive is reproducible: fixed inode numbers, owners and times, so its hash depends only
on the agent binary.

Usage: mkcpio.py OUTPUT --agent PATH
"""
import argparse
import os
import stat
import sys

DIRS = ["dev", "proc", "sys", "run", "tmp"]


def entry(ino, name, mode, data=b"", rdev=(0, 0)):
    name_bytes = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
              rdev[0], rdev[1], len(name_bytes), 0]
    header = b"070701" + b"".join(b"%08x" % f for f in fields)
    out = header + name_bytes
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(data) % 4)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--agent", required=True, help="static nestbox-agent binary, packed as /init")
    args = parser.parse_args()
    with open(args.agent, "rb") as f:
        agent = f.read()
    if not agent.startswith(b"\x7fELF"):
        sys.exit(f"mkcpio: {args.agent} is not an ELF executable")

    parts = []
    ino = 1
    for d in DIRS:
        parts.append(entry(ino, d, stat.S_IFDIR | 0o755))
        ino += 1
    parts.append(entry(ino, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    ino += 1
    parts.append(entry(ino, "init", stat.S_IFREG | 0o755, agent))
    parts.append(entry(0, "TRAILER!!!", 0))
    with open(args.output, "wb") as f:
        f.write(b"".join(parts))


if __name__ == "__main__":
    main()
