//! SysV shared memory for the CRI tests, run inside containers (busybox has no ipcmk):
//! `sysv-shm make KEY` creates a 4 KiB segment with key KEY and prints its id;
//! `sysv-shm find KEY` prints the id of the segment with key KEY in the caller's IPC
//! namespace and exits 0, or says there is none and exits 1.
//!
//! Built for x86_64-unknown-linux-musl (static): it runs in any container image.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (mode, key) = match args.as_slice() {
        [_, mode, key] => (mode.as_str(), key),
        _ => usage(),
    };
    let Ok(key) = key.parse::<libc::key_t>() else { usage() };
    let flags = match mode {
        "make" => libc::IPC_CREAT | libc::IPC_EXCL | 0o600,
        "find" => 0,
        _ => usage(),
    };
    // SAFETY: shmget has no memory arguments.
    let id = unsafe { libc::shmget(key, 4096, flags) };
    if id < 0 {
        println!("no segment with key {key}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    println!("{id}");
}

fn usage() -> ! {
    eprintln!("usage: sysv-shm make|find KEY");
    std::process::exit(2)
}
