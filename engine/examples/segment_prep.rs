//! Measures what a segment's preparation buys: the cost of the first batch writes
//! (4 KiB aligned direct write + fdatasync) into a segment prepared by each method.
//!
//! `cargo run --release -p keyfort-engine --example segment_prep [DIR] [SAMPLES]`
//! DIR must be on the disk the log will use (default: the system temp dir).

use glommio::io::{DmaFile, OpenOptions};
use keyfort_engine::wbl::segment::{prepare_segment, PrepMethod};
use keyfort_engine::wbl::BLOCK;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Small segments keep preparation quick; only the first blocks are measured.
const SEGMENT_BYTES: u64 = 4 << 20;
/// Time between preparation and first use.
const PREPARED_AHEAD: Duration = Duration::from_millis(50);
/// Writes measured per prepared file (the first batches after activation).
const WRITES_PER_FILE: u64 = 8;

#[derive(Clone, Copy, Debug)]
enum Method {
    ZeroFilled,
    Recycled,
    Fallocated,
    Append,
}

async fn prepare(m: Method, path: &Path, old: &Path) -> std::io::Result<()> {
    match m {
        Method::ZeroFilled => {
            prepare_segment(path, SEGMENT_BYTES, PrepMethod::ZeroFill, false).await
        }
        Method::Fallocated => {
            prepare_segment(path, SEGMENT_BYTES, PrepMethod::Fallocate, false).await
        }
        Method::Append => prepare_segment(path, SEGMENT_BYTES, PrepMethod::Append, false).await,
        Method::Recycled => {
            // A released segment: every block written before (with old records), renamed.
            prepare_segment(old, SEGMENT_BYTES, PrepMethod::ZeroFill, false).await?;
            std::fs::rename(old, path)?;
            std::fs::File::open(path.parent().unwrap())?.sync_all()
        }
    }
}

/// Latencies of (the first write of each file, all writes).
async fn measure(
    m: Method,
    dir: &Path,
    samples: usize,
) -> std::io::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut lat = Vec::with_capacity(samples * WRITES_PER_FILE as usize);
    let mut first = Vec::with_capacity(samples);
    for i in 0..samples {
        let path = dir.join(format!("prep-{m:?}-{i}"));
        let old = dir.join(format!("old-{m:?}-{i}"));
        prepare(m, &path, &old).await?;
        // The log prepares the next segment well before it needs it; measure it that way.
        glommio::timer::sleep(PREPARED_AHEAD).await;
        let f: DmaFile = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(&path)
            .await?;
        for w in 0..WRITES_PER_FILE {
            let mut buf = f.alloc_dma_buffer(BLOCK);
            buf.as_bytes_mut().fill(0x5a);
            let t = Instant::now();
            f.write_at(buf, w * BLOCK as u64).await?;
            f.fdatasync().await?;
            lat.push(t.elapsed());
            if w == 0 {
                first.push(t.elapsed());
            }
        }
        f.close().await?;
        std::fs::remove_file(&path)?;
    }
    lat.sort();
    first.sort();
    Ok((first, lat))
}

fn pct(v: &[Duration], p: f64) -> u128 {
    v[((v.len() - 1) as f64 * p).round() as usize].as_micros()
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let base: PathBuf = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let samples: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100);
    let dir = tempfile::tempdir_in(&base)?;
    let d = dir.path().to_path_buf();
    keyfort_engine::exec::run_local(dir.path(), |_| async move {
        println!("4 KiB write + fdatasync into a freshly prepared segment: the first write, and the first {WRITES_PER_FILE}; {samples} segments per method");
        println!(
            "{:<12} {:>14} {:>14} {:>10} {:>10}",
            "method", "first_p50_us", "first_p99_us", "all_p50_us", "all_p99_us"
        );
        for m in [
            Method::ZeroFilled,
            Method::Recycled,
            Method::Fallocated,
            Method::Append,
        ] {
            let (first, all) = measure(m, &d, samples).await?;
            println!(
                "{:<12} {:>14} {:>14} {:>10} {:>10}",
                format!("{m:?}"),
                pct(&first, 0.5),
                pct(&first, 0.99),
                pct(&all, 0.5),
                pct(&all, 0.99)
            );
        }
        Ok(())
    })?
}
