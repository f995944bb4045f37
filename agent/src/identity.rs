//! The guest's identity after a restore: every VM restored from one template wakes with
//! the template's kernel random state and clock. The host hands each sandbox fresh random
//! bytes and the time at CreateSandbox; this module makes them the guest's.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])`: add bytes to the input pool, crediting entropy.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the ChaCha generator from the input pool now (Linux 5.18+).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Most bytes taken (the kernel's own cap for one RNDADDENTROPY is far higher; 64 is plenty
/// for a 256-bit reseed with margin).
const MAX_SEED: usize = 64;

/// Mixes `seed` into the kernel's input pool, credits it as entropy, and forces the
/// generator to reseed, so what the guest reads from /dev/urandom from now on depends on
/// these bytes and not only on the state every restored copy shares.
pub fn reseed_rng(seed: &[u8]) -> std::io::Result<()> {
    if seed.is_empty() {
        return Ok(());
    }
    let seed = &seed[..seed.len().min(MAX_SEED)];
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in a
    // u32 array so the header and buffer are laid out as the kernel reads them.
    let words = seed.len().div_ceil(4);
    let mut info = vec![0u32; 2 + words];
    info[0] = (seed.len() * 8) as u32; // entropy credited, in bits
    info[1] = seed.len() as u32; // bytes in buf
                                 // SAFETY: `info` has room for 2 + words u32s, i.e. 8 + 4*words >= 8 + seed.len() bytes;
                                 // the copy writes seed.len() bytes starting after the two header words.
    unsafe {
        std::ptr::copy_nonoverlapping(seed.as_ptr(), info.as_mut_ptr().add(2).cast::<u8>(), seed.len());
    }
    let random = OpenOptions::new().write(true).open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow the header;
    // `info` holds exactly that and outlives the call.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets CLOCK_REALTIME to `ns` nanoseconds since the epoch (0: leave the clock alone).
pub fn set_realtime(ns: i64) -> std::io::Result<()> {
    if ns <= 0 {
        return Ok(());
    }
    let ts = libc::timespec { tv_sec: ns / 1_000_000_000, tv_nsec: ns % 1_000_000_000 };
    // SAFETY: clock_settime reads the timespec we pass, nothing else.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctls accept what is built (a wrong layout is EINVAL). Mixing bytes into the
    /// host's pool is harmless; the clock is not touched here (it is the host's).
    #[test]
    fn reseed_is_accepted_by_the_kernel() {
        assert!(nix::unistd::geteuid().is_root(), "RNDADDENTROPY needs CAP_SYS_ADMIN: run this test as root");
        reseed_rng(&[0x5a; 32]).expect("reseed");
        reseed_rng(&[1, 2, 3]).expect("a length that is not a multiple of 4");
        reseed_rng(&[7; 200]).expect("more than MAX_SEED is cut");
        reseed_rng(&[]).expect("nothing to mix is fine");
        set_realtime(0).expect("0 leaves the clock alone");
    }
}
