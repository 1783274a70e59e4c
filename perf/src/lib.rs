//! keyfort-perf: in-process CPU profiling for keyfort's binaries (`keyfortd --profile-svg FILE`,
//! `keyfort restore --profile-svg FILE`), written as a flamegraph SVG. `perf/README.md` has how
//! to profile, both this way and with `perf/flamegraph.sh` (`perf record`), and the committed
//! flamegraphs under `perf/results/`.
//!
//! Sampling is the `pprof` crate's: a process-wide `ITIMER_PROF` at [`SAMPLE_HZ`] of CPU time
//! delivers SIGPROF to whichever thread is on a CPU, and the handler unwinds that thread's stack
//! with the DWARF unwind tables (`.eh_frame`, present because the workspace builds with
//! `panic = "unwind"`; no frame pointers needed, so SoftHSM's and libc's frames unwind too).
//! Symbols are resolved only when an SVG is written, from the release profile's `debug = 1`
//! line tables.

use pprof::{ProfilerGuard, ProfilerGuardBuilder};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Samples per second of CPU time asked for (all threads together: `ITIMER_PROF` counts the
/// process's CPU time). The kernel checks process CPU timers once per tick, so what arrives is
/// at most `CONFIG_HZ` samples per busy CPU-second (250 on the VM of perf/README.md): 999 asks
/// for that ceiling wherever the tick allows more, and an odd rate keeps clear of periodic work
/// (timers, raft ticks) it could beat against. Each sample is one DWARF unwind in the handler
/// (a few µs). `perf/flamegraph.sh` samples at a true 999 Hz when more resolution is needed.
pub const SAMPLE_HZ: i32 = 999;

/// Shared objects in which a sample is dropped rather than unwound: the unwinder (`libgcc_s`)
/// takes a lock of its own, so a sample taken while the thread is inside it (a panic, a C++
/// exception in the card's library) could deadlock in the handler; the dynamic loader likewise.
/// Everything else, libc's allocator included, is sampled.
pub const BLOCKLIST: &[&str] = &["libgcc_s", "ld-linux"];

/// A running in-process profile that writes a flamegraph SVG to one file.
pub struct Profile {
    guard: Mutex<Option<ProfilerGuard<'static>>>,
    out: PathBuf,
    title: String,
    started: Instant,
}

/// What one SVG write held.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// Samples in the flamegraph.
    pub samples: u64,
    /// Seconds since the profile started.
    pub seconds: f64,
}

impl Profile {
    /// Starts sampling the whole process at [`SAMPLE_HZ`]; `title` heads the flamegraph.
    pub fn start(out: impl Into<PathBuf>, title: &str) -> Result<Arc<Profile>, String> {
        let out = out.into();
        // Fail now, not at shutdown, if the file cannot be written.
        File::create(&out).map_err(|e| format!("profile svg {}: {e}", out.display()))?;
        let guard = ProfilerGuardBuilder::default()
            .frequency(SAMPLE_HZ)
            .blocklist(BLOCKLIST)
            .build()
            .map_err(|e| format!("starting the profiler: {e}"))?;
        Ok(Arc::new(Profile {
            guard: Mutex::new(Some(guard)),
            out,
            title: title.to_string(),
            started: Instant::now(),
        }))
    }

    /// The SVG's path.
    pub fn path(&self) -> &Path {
        &self.out
    }

    /// Writes the flamegraph of every sample so far (sampling goes on), through a temporary
    /// file renamed over the SVG so a reader never sees half of one.
    pub fn write_svg(&self) -> Result<Written, String> {
        let guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        let Some(guard) = guard.as_ref() else {
            return Err("the profile was already finished".into());
        };
        let report = guard
            .report()
            .build()
            .map_err(|e| format!("building the profile report: {e}"))?;
        let samples: u64 = report.data.values().map(|&c| c as u64).sum();
        let seconds = self.started.elapsed().as_secs_f64();
        let mut options = pprof::flamegraph::Options::default();
        options.title = format!(
            "{} — {samples} samples at {SAMPLE_HZ} Hz over {seconds:.1} s",
            self.title
        );
        options.count_name = "samples".into();
        let tmp = self.out.with_extension("svg.tmp");
        let file = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        report
            .flamegraph_with_options(&mut w, &mut options)
            .map_err(|e| format!("writing the flamegraph: {e}"))?;
        w.flush().map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &self.out)
            .map_err(|e| format!("{} -> {}: {e}", tmp.display(), self.out.display()))?;
        Ok(Written { samples, seconds })
    }

    /// Writes the SVG and stops sampling.
    pub fn finish(&self) -> Result<Written, String> {
        let written = self.write_svg();
        drop(self.guard.lock().unwrap_or_else(|p| p.into_inner()).take());
        written
    }

    /// Starts a thread that writes the SVG (the profile so far) whenever the process receives
    /// SIGUSR2. The signal's handler (signal-hook's) only writes to a pipe; the thread does
    /// the symbol resolution and the file, off every executor.
    pub fn write_on_sigusr2(self: &Arc<Self>, who: &'static str) -> Result<(), String> {
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGUSR2])
            .map_err(|e| format!("SIGUSR2 handler: {e}"))?;
        let profile = Arc::clone(self);
        std::thread::Builder::new()
            .name("profile-sigusr2".into())
            .spawn(move || {
                for _ in signals.forever() {
                    report(who, &profile, profile.write_svg());
                }
            })
            .map_err(|e| format!("profile thread: {e}"))?;
        Ok(())
    }
}

/// Prints what a write did (or why it failed) on stderr, as `who: ...`.
pub fn report(who: &str, profile: &Profile, written: Result<Written, String>) {
    match written {
        Ok(w) => eprintln!(
            "{who}: profile written to {} ({} samples, {:.1} s)",
            profile.path().display(),
            w.samples,
            w.seconds
        ),
        Err(e) => eprintln!("{who}: profile {}: {e}", profile.path().display()),
    }
}

/// Runs `f` profiled when `svg` is given: sampling starts before it, the SVG is written on
/// SIGUSR2 (`on_sigusr2`) and once `f` returns. Without `svg`, just runs `f`. An error starting
/// the profile is returned instead of running `f`.
pub fn run_profiled<T>(
    who: &'static str,
    svg: Option<&Path>,
    on_sigusr2: bool,
    f: impl FnOnce() -> T,
) -> Result<T, String> {
    let Some(svg) = svg else {
        return Ok(f());
    };
    let profile = Profile::start(svg, who)?;
    if on_sigusr2 {
        profile.write_on_sigusr2(who)?;
    }
    let out = f();
    report(who, &profile, profile.finish());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(ms: u64) -> u64 {
        let end = Instant::now() + std::time::Duration::from_millis(ms);
        let mut x = 0u64;
        while Instant::now() < end {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        x
    }

    #[test]
    fn writes_a_flamegraph_on_finish_and_on_sigusr2() {
        let dir = std::env::temp_dir().join(format!("keyfort-perf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = dir.join("p.svg");
        let out = run_profiled("perf-test", Some(&svg), true, || {
            spin(300);
            // SAFETY: raising a signal whose handler signal-hook installed.
            unsafe { libc::raise(libc::SIGUSR2) };
            spin(300)
        })
        .unwrap();
        std::hint::black_box(out);
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            text.starts_with("<?xml"),
            "{}",
            &text[..text.len().min(200)]
        );
        assert!(text.contains("spin"), "the busy function is in the graph");
        assert!(!dir.join("p.svg.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
