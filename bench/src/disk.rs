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

/// Sequential read bandwidth of `files` in GB/s (10^9 bytes/s): O_DIRECT through io_uring
/// (glommio's stream reader, `READ_BYTES` reads, `READ_AHEAD` in flight) — the deepest simple
/// sequential read this VM offers, so it bounds any scan. Note the VM's disk backend caches on
/// the host: a second read of recent data runs ~2x faster than the first, so callers compare
/// figures taken in the same cache state (see `wbl_bench`).
pub fn sequential_read_gb_per_s(files: &[std::path::PathBuf]) -> std::io::Result<f64> {
    use glommio::io::{DmaFile, DmaStreamReaderBuilder};
    const READ_BYTES: usize = 1 << 20;
    const READ_AHEAD: usize = 8;
    let dir = files
        .first()
        .and_then(|f| f.parent())
        .ok_or_else(|| std::io::Error::other("no files to read"))?
        .to_path_buf();
    let files = files.to_vec();
    keyfort_engine::exec::run_local(&dir, move |_q| async move {
        let start = Instant::now();
        let mut total = 0u64;
        for path in &files {
            let file = DmaFile::open(path).await?;
            let len = file.file_size().await?;
            let mut r = DmaStreamReaderBuilder::new(file)
                .with_buffer_size(READ_BYTES)
                .with_read_ahead(READ_AHEAD)
                .build();
            let mut n = 0u64;
            while n < len {
                let b = r.get_buffer_aligned(READ_BYTES as u64).await?;
                if b.is_empty() {
                    break;
                }
                n += b.len() as u64;
            }
            r.close().await?;
            total += n;
        }
        Ok(total as f64 / start.elapsed().as_secs_f64() / 1e9)
    })?
}

/// The same durable 4 KiB write as [`raw_write_fdatasync`], but the way an executor must issue
/// it: one O_DIRECT|O_DSYNC write through glommio's io_uring, awaited. The gap between the two
/// is what the ring costs on this machine (the kernel punts the write to a worker thread).
pub fn ring_dsync_write(dir: &Path, iters: usize) -> std::io::Result<LatencySummary> {
    use glommio::io::OpenOptions as RingOpen;
    const FILE_BYTES: u64 = 64 << 20;
    let path = dir.join("ring-dsync.ref");
    let d = dir.to_path_buf();
    let p = path.clone();
    let summary = keyfort_engine::exec::run_local(&d, move |_q| async move {
        let file = RingOpen::new()
            .create(true)
            .read(true)
            .write(true)
            .custom_flags(libc::O_DSYNC)
            .dma_open(&p)
            .await?;
        let mut off = 0;
        while off < FILE_BYTES {
            let mut b = file.alloc_dma_buffer(1 << 20);
            b.as_bytes_mut().fill(0);
            file.write_at(b, off).await?;
            off += 1 << 20;
        }
        let mut hist = latency_histogram();
        for i in 0..iters as u64 {
            let mut b = file.alloc_dma_buffer(BLOCK);
            b.as_bytes_mut().fill(0xA5);
            let start = Instant::now();
            file.write_at(b, (i * BLOCK as u64) % FILE_BYTES).await?;
            record_ns(&mut hist, start.elapsed().as_nanos() as u64);
        }
        file.close().await?;
        Ok::<_, std::io::Error>(LatencySummary::of(&hist))
    })??;
    std::fs::remove_file(&path)?;
    Ok(summary)
}
