//! keyfortd's Prometheus metrics (text exposition format 0.0.4) on a separate loopback port
//! (`metrics_listen` in the node config; docs/operations.md "Metrics").
//!
//! [`render`] is a pure function from a [`Values`] snapshot to the exposition text;
//! [`Sources::values`] takes that snapshot from the node's live state when a scrape arrives
//! (nothing runs between scrapes). [`serve`] is a small HTTP/1.1 responder on the node's glommio
//! executor: `GET /metrics` (or `HEAD`) is answered with the exposition, another path `404`,
//! another method `405`; a request is its request line and headers only, at most
//! [`MAX_REQUEST_BYTES`], read within [`REQUEST_TIMEOUT`]; every answer carries
//! `Connection: close` and the connection closes after it (a scrape every few seconds does not
//! need keep-alive). At most [`MAX_SCRAPE_CONNECTIONS`] are served at once; more are closed
//! unanswered.
//!
//! Only loopback addresses are accepted ([`check_listen`]): the metrics reveal key-operation
//! rates per opcode, and the endpoint has no authentication.

use crate::archive::ArchiveStatus;
use crate::backup::BackupStatus;
use crate::cluster_cmd::shard_wbl_dir;
use crate::recovery_report::Tier;
use crate::service::Service;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use keyfort_engine::raft::Replica;
use keyfort_net::server::{
    op_name, ClientServer, OpLatency, RequestMetrics, ServerStats, LATENCY_BUCKETS_US,
};
use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// Most bytes of one request (request line and headers); a longer one is answered `431`.
pub const MAX_REQUEST_BYTES: usize = 8 << 10;
/// Time a connection has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Most scrape connections served at once.
pub const MAX_SCRAPE_CONNECTIONS: usize = 8;
/// The exposition's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The only path served.
pub const METRICS_PATH: &str = "/metrics";

/// One shard as this node sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardValues {
    pub shard: u32,
    pub commit: u64,
    pub applied: u64,
    pub term: u64,
    pub leader: bool,
    pub wbl_first_lsn: u64,
    /// Bytes of the files in the shard's WBL directory.
    pub wbl_bytes: u64,
    /// The snapshot under the shard's state (None: none yet).
    pub snapshot: Option<SnapshotValues>,
    /// With a durable store configured.
    pub archive: Option<ArchiveValues>,
    /// Durable log writes slower than `SLOW_PERSIST` (100 ms).
    pub slow_persists: u64,
    /// Raft ticks later than `LATE_TICK` (100 ms) past their interval.
    pub late_ticks: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotValues {
    pub lsn: u64,
    pub bytes: u64,
    /// Now minus the file's modification time (None: the time was unreadable).
    pub age_s: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ArchiveValues {
    /// The archive watermark this node applied.
    pub archived_lsn: u64,
    /// On the shard's leader: how long the oldest committed record not yet archived has
    /// waited (0 elsewhere, or when nothing waits).
    pub rpo_s: f64,
    pub ranges: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RecoveryValues {
    pub tier: Tier,
    /// Seconds of fetch, verify, open, replay, catch_up ([`PHASES`]); None: still running.
    pub phases: [Option<f64>; 5],
}

/// The recovery phases, in [`RecoveryValues::phases`] order.
pub const PHASES: [&str; 5] = ["fetch", "verify", "open", "replay", "catch_up"];
/// Every tier, each a sample of `keyfort_recovery_tier`.
pub const TIERS: [Tier; 3] = [Tier::Local, Tier::Peer, Tier::Durable];

#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackupValues {
    /// The newest manifest this node wrote: (sequence, upload time in Unix seconds).
    pub last: Option<(u64, f64)>,
    pub rounds: u64,
    pub bytes_uploaded: u64,
    pub fetched_from_peers: u64,
    pub failing: bool,
    pub fenced: bool,
}

/// Everything one scrape shows.
#[derive(Clone, Debug, Default)]
pub struct Values {
    pub node: u64,
    /// With a client listener.
    pub client: Option<(ServerStats, RequestMetrics)>,
    pub shards: Vec<ShardValues>,
    /// The key-operation card session's handle cache: (hits, misses).
    pub card_cache: Option<(u64, u64)>,
    pub recovery: Option<RecoveryValues>,
    /// With a durable store configured.
    pub backup: Option<BackupValues>,
}

/// Escapes a label value (backslash, double quote, newline).
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Escapes HELP text (backslash, newline).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A float as the exposition writes it.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

/// A sample's value: integers as written (LSNs and bytes stay exact beyond 2^53), floats as
/// the exposition writes them.
trait Value {
    fn text(&self) -> String;
}

impl Value for u64 {
    fn text(&self) -> String {
        self.to_string()
    }
}

impl Value for f64 {
    fn text(&self) -> String {
        float(*self)
    }
}

/// The exposition being written: a family's HELP and TYPE, then its samples.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn int(&mut self, name: &str, labels: &[(&str, &str)], v: u64) {
        self.sample(name, labels, &v.to_string());
    }

    fn float(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.sample(name, labels, &float(v));
    }

    /// A family with one unlabelled integer sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, v: u64) {
        self.family(name, kind, help);
        self.int(name, &[], v);
    }

    /// A family with one sample per shard that has a value.
    fn per_shard<T: Value>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        shards: &[ShardValues],
        v: impl Fn(&ShardValues) -> Option<T>,
    ) {
        self.family(name, kind, help);
        for s in shards {
            if let Some(x) = v(s) {
                self.sample(name, &[("shard", &s.shard.to_string())], &x.text());
            }
        }
    }

    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &OpLatency) {
        let bucket = format!("{name}_bucket");
        let bucket_sample = |o: &mut Out, le: &str, n: u64| {
            let mut with_le = labels.to_vec();
            with_le.push(("le", le));
            o.int(&bucket, &with_le, n);
        };
        let mut cumulative = 0;
        for (bound_us, n) in LATENCY_BUCKETS_US.iter().zip(h.buckets) {
            cumulative += n;
            bucket_sample(self, &float(*bound_us as f64 / 1e6), cumulative);
        }
        bucket_sample(self, "+Inf", h.count);
        self.float(&format!("{name}_sum"), labels, h.sum_ns as f64 / 1e9);
        self.int(&format!("{name}_count"), labels, h.count);
    }
}

/// The exposition of `v`.
pub fn render(v: &Values) -> String {
    let mut o = Out(String::new());
    o.single("keyfort_node_id", "gauge", "This node's raft id.", v.node);
    if let Some((stats, req)) = &v.client {
        render_client(&mut o, stats, req);
    }
    render_shards(&mut o, &v.shards);
    if let Some((hits, misses)) = v.card_cache {
        let what = "the node's key-operation card session";
        o.single(
            "keyfort_card_cache_hits_total",
            "counter",
            &format!("Key handle cache hits of {what} (a masked key already unwrapped)."),
            hits,
        );
        o.single(
            "keyfort_card_cache_misses_total",
            "counter",
            &format!("Key handle cache misses of {what} (the masked key was unwrapped)."),
            misses,
        );
        o.family(
            "keyfort_card_cache_hit_ratio",
            "gauge",
            "hits / (hits + misses) since the node started; absent before the first lookup.",
        );
        if hits + misses > 0 {
            o.float(
                "keyfort_card_cache_hit_ratio",
                &[],
                hits as f64 / (hits + misses) as f64,
            );
        }
    }
    if let Some(r) = &v.recovery {
        o.family(
            "keyfort_recovery_tier",
            "gauge",
            "How this node's last start recovered: 1 for its tier (local: own log and \
             snapshots; peer: joined as a new member; durable: restored from the durable store), \
             0 for the others.",
        );
        for t in TIERS {
            o.int(
                "keyfort_recovery_tier",
                &[("tier", t.name())],
                u64::from(t == r.tier),
            );
        }
        o.family(
            "keyfort_recovery_phase_seconds",
            "gauge",
            "Duration of each phase of this node's last recovery; a phase still running is \
             absent (catch_up until every shard has caught up).",
        );
        for (phase, d) in PHASES.iter().zip(r.phases) {
            if let Some(d) = d {
                o.float("keyfort_recovery_phase_seconds", &[("phase", phase)], d);
            }
        }
    }
    if let Some(b) = &v.backup {
        render_backup(&mut o, b);
    }
    o.0
}

fn render_client(o: &mut Out, stats: &ServerStats, req: &RequestMetrics) {
    let name = "keyfort_client_request_duration_seconds";
    o.family(
        name,
        "histogram",
        "Client requests, from the request's decode to its answer being queued, by operation \
         (only operations seen since the node started).",
    );
    for (opcode, h) in &req.latency {
        if h.count > 0 {
            o.histogram(name, &[("op", op_name(*opcode))], h);
        }
    }
    o.family(
        "keyfort_client_errors_total",
        "counter",
        "Error answers to clients by operation and error code (op=\"none\": a framing error).",
    );
    for ((opcode, code), n) in &req.errors {
        o.int(
            "keyfort_client_errors_total",
            &[("op", op_name(*opcode)), ("code", &format!("{code:?}"))],
            *n,
        );
    }
    for (name, kind, help, v) in [
        (
            "keyfort_client_requests_total",
            "counter",
            "Request frames received on authenticated client connections (decodable or not).",
            stats.requests,
        ),
        (
            "keyfort_client_connections",
            "gauge",
            "Client connections open now.",
            stats.connections as u64,
        ),
        (
            "keyfort_client_connections_accepted_total",
            "counter",
            "Client connections accepted.",
            stats.accepted,
        ),
        (
            "keyfort_client_connections_refused_total",
            "counter",
            "Client connections refused (too many open).",
            stats.refused_connections,
        ),
        (
            "keyfort_client_auth_failures_total",
            "counter",
            "Client authentications that failed (no hello, a wrong proof).",
            stats.auth_failures,
        ),
        (
            "keyfort_client_bad_frames_total",
            "counter",
            "Client connections closed on a bad frame (magic, crc, version, size).",
            stats.bad_frames,
        ),
        (
            "keyfort_client_tls_failures_total",
            "counter",
            "Client connections whose TLS handshake failed (plaintext to the TLS port, TLS 1.2, \
             a client certificate of another CA, expired or revoked).",
            stats.tls_failures,
        ),
        (
            "keyfort_client_overloaded_total",
            "counter",
            "Client requests answered Overloaded (too many in flight).",
            stats.overloaded,
        ),
    ] {
        o.single(name, kind, help, v);
    }
}

fn render_shards(o: &mut Out, shards: &[ShardValues]) {
    o.per_shard(
        "keyfort_shard_commit_lsn",
        "gauge",
        "The shard's commit index as this node knows it.",
        shards,
        |s| Some(s.commit),
    );
    o.per_shard(
        "keyfort_shard_applied_lsn",
        "gauge",
        "The last LSN this node applied to the shard's state.",
        shards,
        |s| Some(s.applied),
    );
    o.per_shard(
        "keyfort_shard_term",
        "gauge",
        "The shard's raft term on this node.",
        shards,
        |s| Some(s.term),
    );
    o.per_shard(
        "keyfort_shard_is_leader",
        "gauge",
        "1 while this node leads the shard, else 0.",
        shards,
        |s| Some(u64::from(s.leader)),
    );
    o.per_shard(
        "keyfort_raft_slow_persists_total",
        "counter",
        "Durable writes of the shard's raft log slower than 100 ms (append answers and \
         commits waited for them).",
        shards,
        |s| Some(s.slow_persists),
    );
    o.per_shard(
        "keyfort_raft_late_ticks_total",
        "counter",
        "Raft ticks more than 100 ms late (the executor did not run: CPU starvation or a \
         blocking call); elections follow when they add up to an election timeout.",
        shards,
        |s| Some(s.late_ticks),
    );
    o.per_shard(
        "keyfort_wbl_first_lsn",
        "gauge",
        "The first LSN the shard's write-behind log still holds.",
        shards,
        |s| Some(s.wbl_first_lsn),
    );
    o.per_shard(
        "keyfort_wbl_bytes",
        "gauge",
        "Bytes of the files in the shard's WBL directory.",
        shards,
        |s| Some(s.wbl_bytes),
    );
    o.per_shard(
        "keyfort_snapshot_lsn",
        "gauge",
        "LSN of the snapshot under the shard's state (absent: none yet).",
        shards,
        |s| s.snapshot.as_ref().map(|x| x.lsn),
    );
    o.per_shard(
        "keyfort_snapshot_bytes",
        "gauge",
        "Bytes of the snapshot file under the shard's state.",
        shards,
        |s| s.snapshot.as_ref().map(|x| x.bytes),
    );
    o.per_shard(
        "keyfort_snapshot_age_seconds",
        "gauge",
        "Seconds since the snapshot file under the shard's state was written (its mtime).",
        shards,
        |s| s.snapshot.as_ref().and_then(|x| x.age_s),
    );
    o.per_shard(
        "keyfort_archive_lsn",
        "gauge",
        "The log archive watermark this node applied (durable store configured).",
        shards,
        |s| s.archive.as_ref().map(|a| a.archived_lsn),
    );
    o.per_shard(
        "keyfort_archive_rpo_seconds",
        "gauge",
        "On the shard's leader: age of the oldest committed record not yet archived (the \
         shard's RPO now); 0 on followers and when nothing waits.",
        shards,
        |s| s.archive.as_ref().map(|a| a.rpo_s),
    );
    o.per_shard(
        "keyfort_archive_ranges_total",
        "counter",
        "Log ranges this node uploaded to the durable store while leading the shard.",
        shards,
        |s| s.archive.as_ref().map(|a| a.ranges),
    );
    o.per_shard(
        "keyfort_archive_bytes_total",
        "counter",
        "Payload bytes of the log ranges this node uploaded for the shard.",
        shards,
        |s| s.archive.as_ref().map(|a| a.bytes),
    );
}

fn render_backup(o: &mut Out, b: &BackupValues) {
    o.family(
        "keyfort_backup_manifest_seq",
        "gauge",
        "Sequence number of the newest manifest this node wrote (absent: none yet).",
    );
    if let Some((seq, _)) = b.last {
        o.int("keyfort_backup_manifest_seq", &[], seq);
    }
    o.family(
        "keyfort_backup_last_upload_timestamp_seconds",
        "gauge",
        "Unix time of the newest manifest this node wrote (absent: none yet).",
    );
    if let Some((_, t)) = b.last {
        o.float("keyfort_backup_last_upload_timestamp_seconds", &[], t);
    }
    for (name, kind, help, v) in [
        (
            "keyfort_backup_rounds_total",
            "counter",
            "Snapshot manager rounds this node ran (while it led shard 0).",
            b.rounds,
        ),
        (
            "keyfort_backup_uploaded_bytes_total",
            "counter",
            "Bytes the snapshot manager uploaded (snapshots and manifests).",
            b.bytes_uploaded,
        ),
        (
            "keyfort_backup_fetched_from_peers_total",
            "counter",
            "Snapshots the manager fetched from other nodes (newer than this node's).",
            b.fetched_from_peers,
        ),
        (
            "keyfort_backup_failing",
            "gauge",
            "1 when the manager's last round failed.",
            u64::from(b.failing),
        ),
        (
            "keyfort_backup_fenced",
            "gauge",
            "1 when the backup root holds a fence for this cluster (a restore replaced it).",
            u64::from(b.fenced),
        ),
    ] {
        o.single(name, kind, help, v);
    }
}

/// What a scrape reads: the node's live state.
pub struct Sources {
    pub node: u64,
    pub data_dir: PathBuf,
    pub replicas: Rc<RefCell<Vec<Rc<Replica>>>>,
    pub server: Option<Rc<ClientServer>>,
    /// Its key-operation card session, recovery report and archive statuses.
    pub service: Rc<Service>,
    /// With a durable store configured.
    pub backup: Option<Rc<RefCell<BackupStatus>>>,
}

/// Bytes of the files directly in `dir` (0 when unreadable).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn age_s(path: &Path) -> Option<f64> {
    let m = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(
        SystemTime::now()
            .duration_since(m)
            .unwrap_or_default()
            .as_secs_f64(),
    )
}

impl Sources {
    /// The values now. The WBL and snapshot file sizes and times are a directory listing and
    /// a `stat` per shard, made here on the executor (a few microseconds each).
    pub fn values(&self) -> Values {
        let archives = self.service.archives.borrow().clone();
        let replicas = self.replicas.borrow().clone();
        let shards = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let stalls = r.stalls();
                let (mut s, snap) = r.with_core(|c| {
                    let s = ShardValues {
                        shard: c.shard(),
                        commit: c.commit_index(),
                        applied: c.applied(),
                        term: c.term(),
                        leader: c.is_leader(),
                        wbl_first_lsn: c.store().wbl().first_lsn(),
                        slow_persists: stalls.slow_persists,
                        late_ticks: stalls.late_ticks,
                        ..ShardValues::default()
                    };
                    let snap = c
                        .state_machine()
                        .base()
                        .map(|b| (b.lsn(), b.file_bytes(), b.path().to_path_buf()));
                    (s, snap)
                });
                s.wbl_bytes = dir_bytes(&shard_wbl_dir(&self.data_dir, s.shard));
                s.snapshot = snap.map(|(lsn, bytes, path)| SnapshotValues {
                    lsn,
                    bytes,
                    age_s: age_s(&path),
                });
                s.archive = archives.get(i).map(|a| archive_values(&a.borrow()));
                s
            })
            .collect();
        let recovery = self.service.recovery.borrow().clone().map(|r| {
            let r = r.borrow();
            let s = |d: Duration| Some(d.as_secs_f64());
            RecoveryValues {
                tier: r.tier,
                phases: [
                    s(r.fetch),
                    s(r.verify),
                    s(r.open),
                    s(r.replay),
                    r.catch_up.and_then(s),
                ],
            }
        });
        Values {
            node: self.node,
            client: self
                .server
                .as_ref()
                .map(|s| (s.stats(), s.request_metrics())),
            shards,
            // Busy (borrowed across a card call of another task): not shown this scrape.
            card_cache: self.service.card.try_borrow().ok().map(|c| c.cache_stats()),
            recovery,
            backup: self.backup.as_ref().map(|b| backup_values(&b.borrow())),
        }
    }
}

fn archive_values(a: &ArchiveStatus) -> ArchiveValues {
    ArchiveValues {
        archived_lsn: a.archived_lsn,
        rpo_s: a.pending_since.map_or(0.0, |t| t.elapsed().as_secs_f64()),
        ranges: a.ranges,
        bytes: a.bytes,
    }
}

fn backup_values(b: &BackupStatus) -> BackupValues {
    BackupValues {
        last: b.last.as_ref().map(|w| (w.seq, w.unix_ms as f64 / 1e3)),
        rounds: b.rounds,
        bytes_uploaded: b.bytes_uploaded,
        fetched_from_peers: b.fetched_from_peers,
        failing: b.error.is_some(),
        fenced: b.fenced,
    }
}

/// Refuses a metrics listener that is not on a loopback address.
pub fn check_listen(addr: Option<SocketAddr>) -> Result<(), String> {
    match addr {
        Some(a) if !a.ip().is_loopback() => Err(format!(
            "metrics_listen {a}: not a loopback address; the metrics endpoint has no \
             authentication and shows key-operation rates, so keyfortd serves it on loopback \
             only (127.0.0.1 or [::1]; scrape through a local agent or a tunnel)"
        )),
        _ => Ok(()),
    }
}

/// Binds `addr` (loopback only) and answers scrapes on the current executor until the process
/// ends. Returns the bound address.
pub fn serve(addr: SocketAddr, sources: Rc<Sources>) -> Result<SocketAddr, String> {
    check_listen(Some(addr))?;
    let listener = TcpListener::bind(addr).map_err(|e| format!("metrics listener {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("metrics listener {addr}: {e}"))?;
    glommio::spawn_local(accept_loop(listener, sources)).detach();
    Ok(bound)
}

async fn accept_loop(listener: TcpListener, sources: Rc<Sources>) {
    let live = Rc::new(Cell::new(0usize));
    loop {
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if live.get() >= MAX_SCRAPE_CONNECTIONS {
            drop(stream);
            continue;
        }
        live.set(live.get() + 1);
        let (sources, live) = (sources.clone(), live.clone());
        glommio::spawn_local(async move {
            scrape(stream, &sources).await;
            live.set(live.get() - 1);
        })
        .detach();
    }
}

/// What was read of a request.
enum Read {
    /// The request line and headers (up to the blank line).
    Head(Vec<u8>),
    /// [`MAX_REQUEST_BYTES`] read without the blank line.
    TooLarge,
    /// The peer closed, or timed out, first.
    Gone,
}

async fn read_head(stream: &mut TcpStream) -> Read {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&buf) {
            buf.truncate(end);
            return Read::Head(buf);
        }
        if buf.len() >= MAX_REQUEST_BYTES {
            return Read::TooLarge;
        }
        let want = chunk.len().min(MAX_REQUEST_BYTES - buf.len());
        match stream.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return Read::Gone,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Where the head ends (after its blank line), if it does.
fn head_end(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn scrape(mut stream: TcpStream, sources: &Sources) {
    let head = futures_lite::future::or(read_head(&mut stream), async {
        glommio::timer::sleep(REQUEST_TIMEOUT).await;
        Read::Gone
    })
    .await;
    let answer = match head {
        Read::Head(h) => respond(&h, || render(&sources.values())),
        Read::TooLarge => status(431, "Request Header Fields Too Large", &[]),
        Read::Gone => return,
    };
    let _ = futures_lite::future::or(
        async {
            let _ = stream.write_all(&answer).await;
            let _ = stream.flush().await;
        },
        glommio::timer::sleep(REQUEST_TIMEOUT),
    )
    .await;
    let _ = stream.close().await;
}

/// A bodyless (but for its reason) answer.
fn status(code: u16, reason: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let body = format!("{code} {reason}\n");
    let mut h = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        let _ = write!(h, "{k}: {v}\r\n");
    }
    h.push_str("\r\n");
    h.push_str(&body);
    h.into_bytes()
}

/// The answer to a request head: the exposition (`body`, made only for `GET`/`HEAD /metrics`),
/// or an error status.
pub fn respond(head: &[u8], body: impl FnOnce() -> String) -> Vec<u8> {
    let line = head
        .split(|&b| b == b'\n')
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .unwrap_or("")
        .trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return status(400, "Bad Request", &[]);
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return status(400, "Bad Request", &[]);
    }
    if method != "GET" && method != "HEAD" {
        return status(405, "Method Not Allowed", &[("Allow", "GET, HEAD")]);
    }
    let path = target.split('?').next().unwrap_or("");
    if path != METRICS_PATH {
        return status(404, "Not Found", &[]);
    }
    let body = body();
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method == "GET" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfort_net::client_proto::{op, ErrorCode};
    use std::collections::{BTreeMap, HashMap};

    fn sample_values() -> Values {
        let mut create = OpLatency::default();
        create.record(Duration::from_micros(40));
        create.record(Duration::from_millis(3));
        create.record(Duration::from_millis(3));
        create.record(Duration::from_secs(12));
        let mut encrypt = OpLatency::default();
        encrypt.record(Duration::from_micros(120));
        Values {
            node: 2,
            client: Some((
                ServerStats {
                    connections: 3,
                    accepted: 4,
                    requests: 9,
                    ..ServerStats::default()
                },
                RequestMetrics {
                    latency: op::ALL
                        .iter()
                        .map(|&o| match o {
                            op::KEY_CREATE => (o, create),
                            op::ENCRYPT => (o, encrypt),
                            _ => (o, OpLatency::default()),
                        })
                        .collect(),
                    errors: vec![
                        ((op::KEY_CREATE, ErrorCode::Retry), 2),
                        ((0, ErrorCode::BadRequest), 1),
                    ],
                },
            )),
            shards: vec![
                ShardValues {
                    shard: 0,
                    commit: 12,
                    applied: 12,
                    term: 3,
                    leader: true,
                    wbl_first_lsn: 1,
                    wbl_bytes: 4096,
                    snapshot: Some(SnapshotValues {
                        lsn: 10,
                        bytes: 8192,
                        age_s: Some(1.5),
                    }),
                    archive: Some(ArchiveValues {
                        archived_lsn: 11,
                        rpo_s: 0.25,
                        ranges: 1,
                        bytes: 100,
                    }),
                    slow_persists: 2,
                    late_ticks: 1,
                },
                ShardValues {
                    shard: 1,
                    commit: (1 << 60) + 1,
                    applied: 7,
                    term: 3,
                    ..ShardValues::default()
                },
            ],
            card_cache: Some((3, 1)),
            recovery: Some(RecoveryValues {
                tier: Tier::Local,
                phases: [Some(0.0), Some(0.012), Some(0.003), Some(0.5), None],
            }),
            backup: Some(BackupValues {
                last: Some((7, 1795770120.0)),
                rounds: 5,
                bytes_uploaded: 1 << 20,
                ..BackupValues::default()
            }),
        }
    }

    /// A sample line: (name, labels, value).
    fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, String) {
        let (series, value) = line.rsplit_once(' ').expect("value");
        let Some((name, rest)) = series.split_once('{') else {
            return (series.to_string(), BTreeMap::new(), value.to_string());
        };
        let body = rest.strip_suffix('}').expect("closing brace");
        let mut labels = BTreeMap::new();
        let mut chars = body.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "{line}");
            let mut v = String::new();
            loop {
                match chars.next().expect("unterminated label value") {
                    '\\' => match chars.next().expect("escape") {
                        'n' => v.push('\n'),
                        c @ ('\\' | '"') => v.push(c),
                        c => panic!("bad escape \\{c} in {line}"),
                    },
                    '"' => break,
                    c => v.push(c),
                }
            }
            labels.insert(key, v);
            if chars.peek() == Some(&',') {
                chars.next();
            }
        }
        (name.to_string(), labels, value.to_string())
    }

    /// Checks the exposition's rules that matter to a scraper; returns the samples.
    fn check(text: &str) -> Vec<(String, BTreeMap<String, String>, String)> {
        let mut types: HashMap<String, String> = HashMap::new();
        let mut helped = HashMap::new();
        let mut done = Vec::new();
        let mut current = String::new();
        let mut samples = Vec::new();
        assert!(text.ends_with('\n'));
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(
                    helped.insert(name.clone(), ()).is_none(),
                    "two HELP for {name}"
                );
                assert!(!done.contains(&name), "{name} split");
                done.push(current.clone());
                current = name;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name, current, "TYPE right after its HELP");
                assert!(["counter", "gauge", "histogram"].contains(&kind));
                assert!(types.insert(name.into(), kind.into()).is_none());
            } else {
                let (name, labels, value) = parse_sample(line);
                let family = match types.get(&current).map(String::as_str) {
                    Some("histogram") => ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| name.strip_suffix(s))
                        .unwrap_or(&name)
                        .to_string(),
                    _ => name.clone(),
                };
                assert_eq!(family, current, "{line}: not under its HELP/TYPE");
                assert!(name.starts_with("keyfort_"));
                assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                if types[&family] == "counter" {
                    assert!(name.ends_with("_total"), "{name}");
                }
                assert!(
                    value == "+Inf" || value == "NaN" || value.parse::<f64>().is_ok(),
                    "{line}"
                );
                samples.push((name, labels, value));
            }
        }
        samples
    }

    #[test]
    fn every_sample_has_its_family_help_and_type() {
        let text = render(&sample_values());
        let samples = check(&text);
        let names: Vec<&str> = samples.iter().map(|s| s.0.as_str()).collect();
        for want in [
            "keyfort_client_request_duration_seconds_bucket",
            "keyfort_client_errors_total",
            "keyfort_shard_commit_lsn",
            "keyfort_shard_applied_lsn",
            "keyfort_shard_term",
            "keyfort_shard_is_leader",
            "keyfort_wbl_first_lsn",
            "keyfort_wbl_bytes",
            "keyfort_snapshot_lsn",
            "keyfort_snapshot_bytes",
            "keyfort_snapshot_age_seconds",
            "keyfort_archive_lsn",
            "keyfort_archive_rpo_seconds",
            "keyfort_card_cache_hits_total",
            "keyfort_card_cache_misses_total",
            "keyfort_card_cache_hit_ratio",
            "keyfort_recovery_tier",
            "keyfort_recovery_phase_seconds",
            "keyfort_backup_manifest_seq",
            "keyfort_backup_last_upload_timestamp_seconds",
            "keyfort_backup_rounds_total",
            "keyfort_backup_uploaded_bytes_total",
        ] {
            assert!(names.contains(&want), "{want} missing:\n{text}");
        }
        // LSNs stay exact beyond 2^53.
        assert!(text.contains(&format!(
            "keyfort_shard_commit_lsn{{shard=\"1\"}} {}\n",
            (1u64 << 60) + 1
        )));
        assert!(text.contains("keyfort_recovery_tier{tier=\"local\"} 1\n"));
        assert!(text.contains("keyfort_recovery_tier{tier=\"peer\"} 0\n"));
        assert!(text.contains("keyfort_recovery_phase_seconds{phase=\"replay\"} 0.5\n"));
        assert!(!text.contains("phase=\"catch_up\""));
        assert!(text.contains("keyfort_card_cache_hit_ratio 0.75\n"));
        assert!(text.contains("keyfort_client_errors_total{op=\"key_create\",code=\"Retry\"} 2\n"));
        assert!(text.contains("keyfort_client_errors_total{op=\"none\",code=\"BadRequest\"} 1\n"));
        assert!(text.contains("keyfort_backup_manifest_seq 7\n"));
        assert!(text.contains("keyfort_snapshot_age_seconds{shard=\"0\"} 1.5\n"));
        // Shard 1 has no snapshot: no sample, not a zero.
        assert!(!text.contains("keyfort_snapshot_lsn{shard=\"1\"}"));
        // Operations never seen are not shown.
        assert!(!text.contains("op=\"decrypt\""));
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf_equal_to_count() {
        let text = render(&sample_values());
        let samples = check(&text);
        let name = "keyfort_client_request_duration_seconds";
        for opname in ["key_create", "encrypt"] {
            let of = |suffix: &str| {
                samples
                    .iter()
                    .filter(|(n, l, _)| *n == format!("{name}{suffix}") && l["op"] == opname)
                    .collect::<Vec<_>>()
            };
            let buckets = of("_bucket");
            assert_eq!(buckets.len(), LATENCY_BUCKETS_US.len() + 1);
            let mut last_le = 0.0;
            let mut last = 0u64;
            for (_, l, v) in &buckets[..buckets.len() - 1] {
                let le: f64 = l["le"].parse().unwrap();
                assert!(le > last_le);
                last_le = le;
                let v: u64 = v.parse().unwrap();
                assert!(v >= last, "{opname}: buckets not cumulative");
                last = v;
            }
            let (_, l, inf) = buckets.last().unwrap();
            assert_eq!(l["le"], "+Inf");
            let count = &of("_count")[0].2;
            assert_eq!(inf, count);
            assert!(inf.parse::<u64>().unwrap() >= last);
            assert_eq!(of("_sum").len(), 1);
        }
        assert!(text.contains(&format!(
            "{name}_bucket{{op=\"key_create\",le=\"0.00005\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "{name}_bucket{{op=\"key_create\",le=\"0.005\"}} 3\n"
        )));
        assert!(text.contains(&format!("{name}_bucket{{op=\"key_create\",le=\"10\"}} 3\n")));
        assert!(text.contains(&format!(
            "{name}_bucket{{op=\"key_create\",le=\"+Inf\"}} 4\n"
        )));
        assert!(text.contains(&format!("{name}_count{{op=\"key_create\"}} 4\n")));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_label("plain"), "plain");
        let mut o = Out(String::new());
        o.family("keyfort_x", "gauge", "help with \\ and\nnewline");
        o.int("keyfort_x", &[("v", "q\"\\\n")], 1);
        let samples = check(&o.0);
        assert_eq!(samples[0].1["v"], "q\"\\\n");
        assert!(o
            .0
            .starts_with("# HELP keyfort_x help with \\\\ and\\nnewline\n"));
    }

    #[test]
    fn a_node_without_clients_backup_or_snapshots_renders_valid_text() {
        let v = Values {
            node: 1,
            shards: vec![ShardValues::default()],
            ..Values::default()
        };
        let text = render(&v);
        check(&text);
        assert!(!text.contains("keyfort_client_"));
        assert!(!text.contains("keyfort_backup_"));
        // An empty cache shows no ratio.
        let v = Values {
            card_cache: Some((0, 0)),
            ..v
        };
        let text = render(&v);
        check(&text);
        assert!(!text.contains("\nkeyfort_card_cache_hit_ratio "));
        // A backup with no manifest yet: families without samples are still valid.
        let v = Values {
            backup: Some(BackupValues::default()),
            ..v
        };
        let text = render(&v);
        check(&text);
        assert!(!text.contains("\nkeyfort_backup_manifest_seq "));
    }

    fn status_of(answer: &[u8]) -> (u16, String) {
        let text = String::from_utf8(answer.to_vec()).unwrap();
        let code = text[9..12].parse().unwrap();
        (code, text)
    }

    #[test]
    fn http_answers() {
        let body = || "keyfort_node_id 1\n".to_string();
        let (code, text) = status_of(&respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", body));
        assert_eq!(code, 200);
        assert!(text.contains(CONTENT_TYPE));
        assert!(text.contains("Content-Length: 18\r\n"));
        assert!(text.ends_with("\r\n\r\nkeyfort_node_id 1\n"));
        let (code, _) = status_of(&respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", body));
        assert_eq!(code, 200);
        let (code, text) = status_of(&respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", body));
        assert_eq!(code, 200);
        assert!(text.ends_with("\r\n\r\n"));
        let (code, _) = status_of(&respond(b"GET / HTTP/1.1\r\n\r\n", || unreachable!()));
        assert_eq!(code, 404);
        let (code, text) = status_of(&respond(
            b"POST /metrics HTTP/1.1\r\n\r\n",
            || unreachable!(),
        ));
        assert_eq!(code, 405);
        assert!(text.contains("Allow: GET, HEAD\r\n"));
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"\xff\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics SPDY/3\r\n\r\n",
        ] {
            let (code, _) = status_of(&respond(bad, || unreachable!()));
            assert_eq!(code, 400, "{bad:?}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\n"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn only_loopback_listeners() {
        assert!(check_listen(None).is_ok());
        assert!(check_listen(Some("127.0.0.1:9100".parse().unwrap())).is_ok());
        assert!(check_listen(Some("[::1]:9100".parse().unwrap())).is_ok());
        let e = check_listen(Some("0.0.0.0:9100".parse().unwrap())).unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        assert!(check_listen(Some("10.0.0.1:9100".parse().unwrap())).is_err());
    }
}
