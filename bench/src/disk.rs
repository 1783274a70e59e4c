//! Physical disk references measured beside keyfort's own figures: what one durable 4 KiB write
//! costs and how fast the disk reads sequentially. Neither uses keyfort code, so they bound it.

use crate::{latency_histogram, record_ns, LatencySummary};
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Instant;

const BLOCK: usize = 4096;

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, BLOCK).expect("aligned layout");
        // SAFETY: len > 0 and the layout is valid; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation of {len} bytes failed");
        AlignedBuf { ptr, len }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, BLOCK).expect("aligned layout");
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

fn check(rc: isize, what: &str) -> std::io::Result<usize> {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc as usize)
}

/// The physical reference for one durable append: `iters` 4 KiB O_DIRECT writes, each followed by
/// fdatasync, cycling over a pre-zeroed 64 MiB file (the WBL's segments are zero-filled too).
pub fn raw_write_fdatasync(dir: &Path, iters: usize) -> std::io::Result<LatencySummary> {
    const FILE_BYTES: usize = 64 << 20;
    let path = dir.join("raw-fdatasync.ref");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)?;
    let fd = file.as_raw_fd();
    let zero = AlignedBuf::zeroed(1 << 20);
    for off in (0..FILE_BYTES).step_by(zero.len) {
        // SAFETY: the buffer is valid for zero.len bytes and aligned for O_DIRECT.
        check(
            unsafe { libc::pwrite(fd, zero.ptr.cast(), zero.len, off as i64) },
            "zero-fill",
        )?;
    }
    // SAFETY: fd is open.
    check(unsafe { libc::fsync(fd) } as isize, "fsync")?;
    let block = AlignedBuf::zeroed(BLOCK);
    // SAFETY: block is valid for BLOCK bytes.
    unsafe { std::ptr::write_bytes(block.ptr, 0xA5, BLOCK) };
    let mut hist = latency_histogram();
    for i in 0..iters {
        let off = ((i * BLOCK) % FILE_BYTES) as i64;
        let start = Instant::now();
        // SAFETY: as above.
        check(
            unsafe { libc::pwrite(fd, block.ptr.cast(), BLOCK, off) },
            "pwrite",
        )?;
        // SAFETY: fd is open.
        check(unsafe { libc::fdatasync(fd) } as isize, "fdatasync")?;
        record_ns(&mut hist, start.elapsed().as_nanos() as u64);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(LatencySummary::of(&hist))
}

/// Sequential read bandwidth of `files` in GB/s (10^9 bytes/s) with O_DIRECT, 1 MiB reads and
/// `QUEUE_DEPTH` reads in flight (one thread each over an interleaved range), bypassing the page
/// cache exactly as keyfort's recovery scan does.
pub fn sequential_read_gb_per_s(files: &[std::path::PathBuf]) -> std::io::Result<f64> {
    const READ_BYTES: usize = 1 << 20;
    const QUEUE_DEPTH: usize = 4;
    let start = Instant::now();
    let mut total = 0u64;
    for path in files {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let len = file.metadata()?.len() as usize;
        let fd = file.as_raw_fd();
        let chunks = len.div_ceil(READ_BYTES);
        let read = std::thread::scope(|s| -> std::io::Result<u64> {
            let workers: Vec<_> = (0..QUEUE_DEPTH)
                .map(|w| {
                    s.spawn(move || -> std::io::Result<u64> {
                        let buf = AlignedBuf::zeroed(READ_BYTES);
                        let mut n = 0u64;
                        for c in (w..chunks).step_by(QUEUE_DEPTH) {
                            let off = (c * READ_BYTES) as i64;
                            // SAFETY: buf is valid and aligned for READ_BYTES bytes.
                            let got = check(
                                unsafe { libc::pread(fd, buf.ptr.cast(), READ_BYTES, off) },
                                "pread",
                            )?;
                            n += got as u64;
                        }
                        Ok(n)
                    })
                })
                .collect();
            let mut n = 0;
            for w in workers {
                n += w.join().expect("reader thread panicked")?;
            }
            Ok(n)
        })?;
        total += read;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64() / 1e9)
}
