//! Every fuzz target as a plain test: its committed corpus (`corpus/<target>/`, the seeds
//! and what long runs found worth keeping), then random mutations of it for a bounded
//! time (`NESTBOX_FUZZ_TEST_SECONDS`, default 2 per target; the generator's seed is
//! printed and `NESTBOX_FUZZ_TEST_SEED` replays it). This is what CI runs: no libFuzzer,
//! no instrumented build.

use nestbox_fuzz::{Target, TARGETS};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The input being run, for the panic hook: (target, bytes).
static CURRENT: Mutex<(&str, Vec<u8>)> = Mutex::new(("", Vec::new()));

/// Any panic, on any thread (a device thread's included, which its owner would only see
/// as a failed join), ends the process as under libFuzzer: the message and a backtrace
/// on stdout, the input saved in `fuzz/artifacts/<target>/`.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        println!("panic: {info}\n{}", std::backtrace::Backtrace::force_capture());
        if let Ok(current) = CURRENT.try_lock() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("artifacts").join(current.0);
            let path = dir.join(format!("test-crash-{}", std::process::id()));
            if std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &current.1)).is_ok() {
                println!(
                    "the input is in {} (replay: fuzz/target/.../{} {})",
                    path.display(),
                    current.0,
                    path.display()
                );
            }
        }
        std::process::abort();
    }));
}

/// The devices log what a guest did wrong to stderr (a few lines per device, so many per
/// second here): stderr goes to /dev/null unless NESTBOX_FUZZ_TEST_STDERR is set.
fn quiet_stderr() {
    if std::env::var_os("NESTBOX_FUZZ_TEST_STDERR").is_some() {
        return;
    }
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").expect("/dev/null");
    // SAFETY: dup2 onto descriptor 2, which std only ever writes to.
    unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 2) };
}

fn run_one(target: &Target, input: &[u8]) {
    {
        let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        current.0 = target.name;
        current.1.clear();
        current.1.extend_from_slice(input);
    }
    (target.run)(input);
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target)
}

fn corpus(target: &Target) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target.name);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let inputs: Vec<Vec<u8>> =
        entries.map(|e| std::fs::read(e.expect("corpus entry").path()).expect("corpus file")).collect();
    assert!(!inputs.is_empty(), "corpus {} is empty", dir.display());
    inputs
}

/// xorshift64*: small, and the same sequence for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A few libFuzzer-like mutations of a corpus input.
fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let at = rng.below(data.len() + 1);
        match rng.below(6) {
            0 if at < data.len() => data[at] ^= 1 << rng.below(8),
            1 if at < data.len() => data[at] = rng.next() as u8,
            2 => data.insert(at, rng.next() as u8),
            3 if at < data.len() => {
                data.remove(at);
            }
            4 => data.truncate(at),
            _ => {
                let other = &corpus[rng.below(corpus.len())];
                let from = rng.below(other.len());
                let n = rng.below(64).min(other.len() - from.min(other.len()));
                let piece = other[from..from + n].to_vec();
                data.splice(at..at, piece);
            }
        }
    }
    data
}

fn exercise(target: &Target) {
    let corpus = corpus(target);
    for input in &corpus {
        run_one(target, input);
    }
    for (_, seed) in (target.seeds)() {
        run_one(target, &seed);
    }
    let seconds = std::env::var("NESTBOX_FUZZ_TEST_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let seed = std::env::var("NESTBOX_FUZZ_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    println!("{}: NESTBOX_FUZZ_TEST_SEED={seed}", target.name);
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut runs = 0u64;
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &corpus);
        run_one(target, &input);
        runs += 1;
    }
    println!("{}: {} corpus inputs, {runs} random inputs", target.name, corpus.len());
}

/// The targets' scratch files on a small tmpfs of their own, in a mount namespace of this
/// process (made while it is still single-threaded): the virtio-fs target lets the
/// guest create, grow and fallocate files. Without root, the temporary directory and the
/// virtio-fs target's file size limit do.
fn private_scratch() -> Option<std::path::PathBuf> {
    // SAFETY: unshare and mount with valid, NUL-terminated arguments.
    let private = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if !private {
        println!(
            "no private mount namespace ({}): scratch files in the temporary directory",
            std::io::Error::last_os_error()
        );
        return None;
    }
    let dir = std::env::temp_dir().join(format!("nestbox-fuzz-scratch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch mount point");
    let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path without NUL");
    // SAFETY: as above.
    let mounted = unsafe {
        libc::mount(
            c"nestbox-fuzz".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"size=256m,mode=0700".as_ptr().cast(),
        )
    };
    assert_eq!(mounted, 0, "tmpfs on {}: {}", dir.display(), std::io::Error::last_os_error());
    std::env::set_var("NESTBOX_FUZZ_SCRATCH", &dir);
    Some(dir)
}

/// `targets [name...]`: every target (or those named) in turn. A plain `main`, not
/// libtest, so that the mount namespace is made before any thread exists, and so that
/// the targets run one at a time in this process, as they do under libFuzzer.
fn main() {
    let names: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    for name in &names {
        assert!(TARGETS.iter().any(|t| t.name == name), "unknown target {name}");
    }
    if std::env::args().any(|a| a == "--write-seed-corpus") {
        return write_seed_corpus();
    }
    let tmpfs = private_scratch();
    install_panic_hook();
    quiet_stderr();
    for target in TARGETS.iter().filter(|t| names.is_empty() || names.iter().any(|n| n == t.name)) {
        exercise(target);
    }
    nestbox_fuzz::scratch::remove();
    if let Some(dir) = tmpfs {
        let target = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path without NUL");
        // SAFETY: umount of the tmpfs this process mounted.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&dir);
    }
}

/// Writes every target's seeds into its corpus directory (`cargo test --test targets --
/// --write-seed-corpus` after changing an input format).
fn write_seed_corpus() {
    for target in TARGETS {
        let dir = corpus_dir(target.name);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (name, data) in (target.seeds)() {
            std::fs::write(dir.join(format!("seed-{name}")), data).expect("writing a seed");
        }
    }
}
