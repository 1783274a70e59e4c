//! What a starting node reports about its recovery (DESIGN.md "Recovery tiers"): its tier and
//! each phase's duration, in its log, in `status.json` and in `keyfort cluster status`.
//!
//! | tier | how the node knows | fetch | verify | open | replay |
//! |---|---|---|---|---|---|
//! | local | its data dir held its identity | — | newest snapshot checked (crc, chain, digest, MAC) | log scanned | log replayed to the commit |
//! | peer | it joined (no identity) | join + snapshot streams (slowest shard) | fetched snapshot checked | log scanned | log replayed |
//! | durable | `keyfort restore` left [`RESTORE_MARKER`] | the restore's fetch of snapshots and ranges | the restore's checks + the node's own | log scanned | archived records and restore record replayed |
//!
//! Catch-up runs from the process start until every shard knows its leader and has applied
//! everything it knows committed (polled every [`CATCH_UP_POLL`]).

use keyfort_engine::raft::Replica;
use keyfort_net::client_proto::{RecoveryStatus, RECOVERY_PENDING};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Written by `keyfort restore` into every data dir it makes: the restore's own phases. The
/// node reads it at its first start and renames it to [`RESTORE_MARKER_REPORTED`].
pub const RESTORE_MARKER: &str = "restored.json";
pub const RESTORE_MARKER_REPORTED: &str = "restored.reported.json";
/// How often catch-up is checked.
pub const CATCH_UP_POLL: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Tier {
    Local = 1,
    Peer = 2,
    Durable = 3,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Local => "local",
            Tier::Peer => "peer",
            Tier::Durable => "durable",
        }
    }
}

/// The name of a wire tier code (`RecoveryStatus::tier`).
pub fn tier_name(code: u8) -> &'static str {
    match code {
        1 => "local",
        2 => "peer",
        3 => "durable",
        _ => "unknown",
    }
}

#[derive(Clone, Debug)]
pub struct Recovery {
    pub tier: Tier,
    pub fetch: Duration,
    pub verify: Duration,
    pub open: Duration,
    pub replay: Duration,
    /// None while catching up.
    pub catch_up: Option<Duration>,
}

fn ms(d: Duration) -> u32 {
    d.as_millis().min(u128::from(RECOVERY_PENDING - 1)) as u32
}

impl Recovery {
    pub fn to_wire(&self) -> RecoveryStatus {
        RecoveryStatus {
            tier: self.tier as u8,
            fetch_ms: ms(self.fetch),
            verify_ms: ms(self.verify),
            open_ms: ms(self.open),
            replay_ms: ms(self.replay),
            catch_up_ms: self.catch_up.map_or(RECOVERY_PENDING, ms),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let f = |d: Duration| d.as_secs_f64() * 1e3;
        serde_json::json!({
            "tier": self.tier.name(),
            "fetch_ms": f(self.fetch),
            "verify_ms": f(self.verify),
            "open_ms": f(self.open),
            "replay_ms": f(self.replay),
            "catch_up_ms": self.catch_up.map(f),
        })
    }
}

/// `keyfort restore`'s phases for the node: (fetch, verify).
pub fn write_marker(dir: &Path, fetch: Duration, verify: Duration) -> Result<(), String> {
    let v = serde_json::json!({
        "fetch_ms": fetch.as_secs_f64() * 1e3,
        "verify_ms": verify.as_secs_f64() * 1e3,
    });
    keyfort_engine::cluster::write_durable(dir, RESTORE_MARKER, v.to_string().as_bytes())
        .map_err(|e| e.to_string())
}

/// The restore's phases when this start is the first after a restore (the marker is then
/// renamed: a later start is a local one).
pub fn take_marker(dir: &Path) -> Option<(Duration, Duration)> {
    let path = dir.join(RESTORE_MARKER);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    let _ = std::fs::rename(&path, dir.join(RESTORE_MARKER_REPORTED));
    let d = |k: &str| Duration::from_secs_f64(v[k].as_f64().unwrap_or(0.0).max(0.0) / 1e3);
    Some((d("fetch_ms"), d("verify_ms")))
}

/// Waits until every replica caught up (see the module comment), then records the catch-up
/// time from `started` (and, on a peer start, the snapshot transfers the replicas made) and
/// logs the whole report.
pub async fn watch_catch_up(
    report: Rc<RefCell<Recovery>>,
    replicas: Vec<Rc<Replica>>,
    started: Instant,
) {
    loop {
        let caught_up = replicas.iter().all(|r| {
            r.with_core(|c| {
                c.leader_id().is_some() && c.commit_index() > 0 && c.applied() >= c.commit_index()
            })
        });
        if caught_up || replicas.iter().any(|r| r.failed().is_some()) {
            break;
        }
        glommio::timer::sleep(CATCH_UP_POLL).await;
    }
    let mut r = report.borrow_mut();
    if r.tier == Tier::Peer {
        let fetched = replicas.iter().filter_map(|x| x.last_snapshot_fetch());
        let (f, v) = fetched.fold((Duration::ZERO, Duration::ZERO), |(f, v), (a, b)| {
            (f.max(a), v.max(b))
        });
        r.fetch += f;
        r.verify += v;
    }
    r.catch_up = Some(started.elapsed());
    tracing::info!(
        tier = r.tier.name(),
        fetch_ms = r.fetch.as_secs_f64() * 1e3,
        verify_ms = r.verify.as_secs_f64() * 1e3,
        open_ms = r.open.as_secs_f64() * 1e3,
        replay_ms = r.replay.as_secs_f64() * 1e3,
        catch_up_ms = started.elapsed().as_secs_f64() * 1e3,
        "recovery done"
    );
}
