//! Thread-per-core executors: one glommio `LocalExecutor` per core, each with a foreground
//! (latency) and a background task queue, and the one place where the glommio iopoll probe
//! workaround lives.
//!
//! glommio registers `io_memory` bytes of DMA buffers with io_uring, which needs locked memory:
//! root here has `CAP_IPC_LOCK`; elsewhere lower [`ExecConfig::io_memory`] or raise
//! `ulimit -l` (memlock).

use glommio::{
    executor, Latency, LocalExecutor, LocalExecutorBuilder, Placement, PoolPlacement, Shares,
    TaskQueueHandle,
};
use std::future::Future;
use std::path::{Path, PathBuf};

/// Shares of the foreground queue (client requests, raft, WBL writer).
pub const FOREGROUND_SHARES: usize = 1000;
/// Shares of the background queue (segment preparation, compaction, streaming).
pub const BACKGROUND_SHARES: usize = 100;
/// Name of the probe file written in the data directory.
pub const IO_PROBE_FILE: &str = "io-probe";
/// Threads of each executor's blocking pool (snapshot writes and verifying opens), unpinned.
pub const BLOCKING_THREADS: usize = 1;
/// Nice value of background work on the blocking pool (snapshot merges, writes, verifying
/// opens, unlinks): under CPU contention the kernel runs the executors first.
pub const BACKGROUND_NICE: i32 = 10;
/// DMA memory registered per executor by default.
pub const IO_MEMORY_DEFAULT: usize = 10 << 20;

/// The task queues of one executor.
#[derive(Clone, Copy, Debug)]
pub struct Queues {
    pub foreground: TaskQueueHandle,
    pub background: TaskQueueHandle,
}

#[derive(Clone, Debug)]
pub struct ExecConfig {
    /// `Some(core)` pins the executor; `None` (several nodes on one machine) leaves it unbound.
    pub core: Option<usize>,
    pub name: String,
    /// Directory holding the io probe file (the node's data directory).
    pub data_dir: PathBuf,
    pub io_memory: usize,
}

impl ExecConfig {
    pub fn new(core: Option<usize>, data_dir: impl Into<PathBuf>) -> ExecConfig {
        let name = core.map_or("keyfort".to_string(), |c| format!("keyfort-{c}"));
        ExecConfig {
            core,
            name,
            data_dir: data_dir.into(),
            io_memory: IO_MEMORY_DEFAULT,
        }
    }

    fn builder(&self) -> LocalExecutorBuilder {
        let placement = self.core.map_or(Placement::Unbound, Placement::Fixed);
        // glommio pins the blocking pool to the executor's own core by default, and an
        // unbound pool thread would inherit the executor's affinity; ours runs snapshot merges
        // and verification and must not take the core from the foreground: fence it to every
        // online CPU so the kernel places it.
        let pool = match glommio::CpuSet::online() {
            Ok(all) => PoolPlacement::Fenced(BLOCKING_THREADS, all),
            Err(_) => PoolPlacement::Unbound(BLOCKING_THREADS),
        };
        LocalExecutorBuilder::new(placement)
            .name(&self.name)
            .io_memory(self.io_memory)
            .blocking_thread_pool_placement(pool)
    }
}

/// Creates the two task queues on the current executor.
///
/// Both queues are `Latency::NotImportant`; the foreground's priority comes from its shares
/// alone. glommio 0.9.0 loses a wakeup with a `Latency::Matters` queue: a direct write issued
/// from such a queue (the WBL writer) now and then never resumes, and the executor sleeps with
/// nothing in flight. It showed as 11 stalls in 300 runs of `exec_executors` with
/// `Latency::Matters(1 ms)` and none in 300 without (see docs/operations.md,
/// "Executor stalls"). Re-enable only with that test looping clean.
pub fn make_queues() -> Queues {
    let ex = executor();
    let foreground = ex.create_task_queue(
        Shares::Static(FOREGROUND_SHARES),
        Latency::NotImportant,
        "foreground",
    );
    let background = ex.create_task_queue(
        Shares::Static(BACKGROUND_SHARES),
        Latency::NotImportant,
        "background",
    );
    Queues {
        foreground,
        background,
    }
}

/// glommio 0.9.0 decides whether a device supports iopoll by reading offset 0 of the first
/// DMA file opened on it; when that file is empty the probe wrongly enables polling and every
/// later read fails with EOPNOTSUPP (upstream issues #605 and #670). So each executor first
/// opens and reads a known non-empty file, before any other DMA file.
pub async fn probe_iopoll(dir: &Path) -> std::io::Result<()> {
    let path = ensure_probe_file(dir)?;
    probe_file(&path).await
}

/// The probe on an existing non-empty file, for read-only tools that must not write.
pub async fn probe_file(path: &Path) -> std::io::Result<()> {
    let f = glommio::io::DmaFile::open(path).await?;
    f.read_at_aligned(0, 4096).await?;
    f.close().await?;
    Ok(())
}

fn ensure_probe_file(dir: &Path) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(IO_PROBE_FILE);
    let ok = std::fs::metadata(&path).is_ok_and(|m| m.len() >= 4096);
    if !ok {
        // Buffered on purpose: opening it with DMA first is exactly what the probe must avoid.
        // Several executors (threads or processes) may create it at once: private temp names.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{IO_PROBE_FILE}.{}.{n}.tmp", std::process::id()));
        std::fs::write(&tmp, vec![0x4bu8; 4096])?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(path)
}

/// Spawns one executor thread running `f(queues)` after the probe.
pub fn spawn_executor<F, Fut, T>(
    cfg: ExecConfig,
    f: F,
) -> std::io::Result<glommio::ExecutorJoinHandle<std::io::Result<T>>>
where
    F: FnOnce(Queues) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let dir = cfg.data_dir.clone();
    let h = cfg.builder().spawn(move || async move {
        probe_iopoll(&dir).await?;
        let q = make_queues();
        Ok(f(q).await)
    });
    h.map_err(std::io::Error::from)
}

/// One executor per listed core (or unbound executors when `cores` holds `None`s).
pub fn spawn_per_core<F, Fut, T>(
    cores: &[Option<usize>],
    data_dir: &Path,
    f: F,
) -> std::io::Result<Vec<glommio::ExecutorJoinHandle<std::io::Result<T>>>>
where
    F: Fn(usize, Queues) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    let mut v = Vec::with_capacity(cores.len());
    for (i, core) in cores.iter().enumerate() {
        let f = f.clone();
        v.push(spawn_executor(
            ExecConfig::new(*core, data_dir),
            move |q| f(i, q),
        )?);
    }
    Ok(v)
}

/// Runs `f` to completion on a fresh unbound executor in the calling thread (tools, tests).
pub fn run_local<F, Fut, T>(data_dir: &Path, f: F) -> std::io::Result<T>
where
    F: FnOnce(Queues) -> Fut,
    Fut: Future<Output = T>,
{
    let probe = ensure_probe_file(data_dir)?;
    run_local_probing(&probe, f)
}

/// Like [`run_local`], probing with an existing non-empty file and writing nothing.
pub fn run_local_probing<F, Fut, T>(probe: &Path, f: F) -> std::io::Result<T>
where
    F: FnOnce(Queues) -> Fut,
    Fut: Future<Output = T>,
{
    let dir = probe.parent().unwrap_or(Path::new("."));
    let ex: LocalExecutor = ExecConfig::new(None, dir).builder().make()?;
    ex.run(async move {
        probe_file(probe).await?;
        let q = make_queues();
        Ok(f(q).await)
    })
}

/// Runs `f` on this executor's blocking pool at background priority ([`BACKGROUND_NICE`]):
/// the home of snapshot merges, writes, verifying opens and unlinks, which must not take the
/// core from the foreground.
pub fn spawn_background_blocking<F, R>(f: F) -> impl Future<Output = R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    executor().spawn_blocking(move || {
        // SAFETY: gettid and setpriority on the calling thread only; no memory is passed.
        // Advisory: a failure changes nothing.
        unsafe {
            let tid = libc::gettid();
            let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE);
        }
        f()
    })
}
