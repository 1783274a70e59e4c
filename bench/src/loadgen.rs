//! An open-loop load generator over client [`Connection`]s.
//!
//! Request `i` has an intended send time `t0 + i / rate`. A sender thread sends it at (or as
//! soon as possible after) that time with [`Connection::start`], round-robin over the
//! connections (request `i` goes to `conns[i % conns.len()]`), and never waits for answers: a
//! slow system does not slow the arrivals, and when sending falls behind the lateness counts
//! in the latency. A completer thread waits on the answers in order and records
//! `latency = arrival instant (the reader thread's, [`Pending::wait_timed`]) − intended send
//! time` in an HDR histogram. Errors are counted by code, never recorded as latencies.
//! Requests intended before the warm-up ends are sent but not recorded. At most
//! [`MAX_OUTSTANDING`] answers are awaited at once; a request that would exceed it is counted
//! as dropped (overload) and not sent, so the schedule never blocks.

use crate::{latency_histogram, record_ns, LatencySummary};
use keyfort_net::client::{ClientError, Connection, Pending};
use keyfort_net::client_proto::{Request, Response};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Most answers awaited at once; beyond it a request is dropped (overload), not sent.
pub const MAX_OUTSTANDING: usize = 16_384;
/// Default wait for one answer, from its intended send time.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The sender sleeps when the next request is due further away than this, and otherwise
/// sends everything due (sleeping is coarse; batching what is due keeps the schedule).
const SLEEP_SLACK: Duration = Duration::from_micros(50);

/// One open-loop run.
#[derive(Clone, Debug)]
pub struct OpenLoop {
    /// Offered requests per second.
    pub rate: f64,
    /// Measured period (after the warm-up).
    pub duration: Duration,
    /// Period before it, loaded at the same rate, not recorded.
    pub warmup: Duration,
    /// Wait for one answer, from its intended send time.
    pub answer_timeout: Duration,
}

impl OpenLoop {
    pub fn new(rate: f64, duration: Duration, warmup: Duration) -> Self {
        OpenLoop {
            rate,
            duration,
            warmup,
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
        }
    }
}

/// What one open-loop run measured (the measured period only).
#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub offered_per_s: f64,
    /// Successful answers of measured requests per second, over the measured period or until
    /// the last of them arrived, whichever is longer.
    pub achieved_per_s: f64,
    /// Measured requests scheduled (sent, dropped or refused).
    pub scheduled: u64,
    /// Measured requests answered successfully (the latency sample count).
    pub ok: u64,
    /// Measured requests that failed, by error (server code name, `Timeout`, `Closed`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Measured requests not sent because [`MAX_OUTSTANDING`] answers were outstanding.
    pub dropped_overload: u64,
    /// Latency of successful answers, in ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// How late the sender got behind the schedule at worst (included in the latencies).
    pub max_send_lag_ms: f64,
    /// Most answers outstanding at once.
    pub max_outstanding: usize,
}

impl LoadResult {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum::<u64>() + self.dropped_overload
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a LoadResult serializes")
    }

    /// One line for the console.
    pub fn line(&self) -> String {
        format!(
            "offered {:>7.0}/s achieved {:>7.0}/s  p50 {:>8.3} ms  p99 {:>8.3} ms  p999 {:>8.3} ms  max {:>8.3} ms  ok {} errors {:?} dropped {} lag {:.1} ms",
            self.offered_per_s,
            self.achieved_per_s,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            self.ok,
            self.errors,
            self.dropped_overload,
            self.max_send_lag_ms,
        )
    }
}

/// The name an error is counted under.
pub fn error_name(e: &ClientError) -> String {
    match e {
        ClientError::Server(r) => format!("{:?}", r.code),
        ClientError::Timeout(_) => "Timeout".into(),
        ClientError::Io(_) => "Io".into(),
        ClientError::Protocol(_) => "Protocol".into(),
        ClientError::Credential(_) => "Credential".into(),
        ClientError::NoNodes => "NoNodes".into(),
        ClientError::Closed => "Closed".into(),
    }
}

/// What the sender hands the completer.
enum Sent {
    Pending {
        intended: Instant,
        measured: bool,
        pending: Pending,
    },
    /// Refused before it was sent (locally or by a closed connection).
    Refused { measured: bool, why: String },
}

/// Runs `cfg` over `conns`, request `i` made by `make(i)` and sent on `conns[i % n]`.
/// `check` decides whether an answer counts as a success (for instance that it is the
/// expected response kind); a `false` is counted as error `UnexpectedAnswer`.
pub fn run_open_loop<M, C>(
    conns: &[Arc<Connection>],
    cfg: &OpenLoop,
    make: M,
    check: C,
) -> LoadResult
where
    M: Fn(u64) -> Request + Send,
    C: Fn(&Response) -> bool + Send,
{
    assert!(!conns.is_empty(), "open loop over no connections");
    assert!(cfg.rate > 0.0, "open loop at rate 0");
    let interval = Duration::from_secs_f64(1.0 / cfg.rate);
    let total = ((cfg.warmup + cfg.duration).as_secs_f64() * cfg.rate).round() as u64;
    let outstanding = Arc::new(AtomicUsize::new(0));
    let (tx, rx) = mpsc::channel::<Sent>();
    // A little ahead, so both threads are running when the schedule starts.
    let t0 = Instant::now() + Duration::from_millis(20);
    let measure_from = t0 + cfg.warmup;
    let measure_to = measure_from + cfg.duration;
    let timeout = cfg.answer_timeout;

    std::thread::scope(|s| {
        let out = outstanding.clone();
        let sender = s.spawn(move || {
            let mut dropped = 0u64;
            let mut max_lag = Duration::ZERO;
            let mut max_out = 0usize;
            let mut i = 0u64;
            while i < total {
                let intended = t0 + interval.mul_f64(i as f64);
                let now = Instant::now();
                if intended > now + SLEEP_SLACK {
                    std::thread::sleep(intended - now);
                    continue;
                }
                max_lag = max_lag.max(now.saturating_duration_since(intended));
                let measured = intended >= measure_from;
                let o = out.load(Ordering::Relaxed);
                max_out = max_out.max(o);
                if o >= MAX_OUTSTANDING {
                    if measured {
                        dropped += 1;
                    }
                    i += 1;
                    continue;
                }
                let req = make(i);
                let conn = &conns[(i % conns.len() as u64) as usize];
                out.fetch_add(1, Ordering::Relaxed);
                let sent = match conn.start(&req) {
                    Ok(pending) => Sent::Pending {
                        intended,
                        measured,
                        pending,
                    },
                    Err(e) => Sent::Refused {
                        measured,
                        why: error_name(&e),
                    },
                };
                if tx.send(sent).is_err() {
                    break;
                }
                i += 1;
            }
            (dropped, max_lag, max_out)
        });
        let out = outstanding.clone();
        let completer = s.spawn(move || {
            let mut h = latency_histogram();
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut last_ok = measure_to;
            let mut scheduled = 0u64;
            for sent in rx {
                match sent {
                    Sent::Refused { measured, why } => {
                        out.fetch_sub(1, Ordering::Relaxed);
                        if measured {
                            scheduled += 1;
                            *errors.entry(why).or_default() += 1;
                        }
                    }
                    Sent::Pending {
                        intended,
                        measured,
                        pending,
                    } => {
                        let left = (intended + timeout).saturating_duration_since(Instant::now());
                        let (answer, at) = pending.wait_timed(left.max(Duration::from_micros(1)));
                        out.fetch_sub(1, Ordering::Relaxed);
                        if !measured {
                            continue;
                        }
                        scheduled += 1;
                        match answer {
                            Ok(r) if check(&r) => {
                                let at = at.unwrap_or_else(Instant::now);
                                record_ns(
                                    &mut h,
                                    at.saturating_duration_since(intended).as_nanos() as u64,
                                );
                                last_ok = last_ok.max(at);
                            }
                            Ok(_) => *errors.entry("UnexpectedAnswer".into()).or_default() += 1,
                            Err(e) => *errors.entry(error_name(&e)).or_default() += 1,
                        }
                    }
                }
            }
            (h, errors, last_ok, scheduled)
        });
        let (dropped, max_lag, max_out) = sender.join().expect("sender thread");
        let (h, errors, last_ok, scheduled) = completer.join().expect("completer thread");
        let lat = LatencySummary::of(&h);
        let span = last_ok
            .saturating_duration_since(measure_from)
            .as_secs_f64();
        LoadResult {
            offered_per_s: cfg.rate,
            achieved_per_s: if span > 0.0 {
                h.len() as f64 / span
            } else {
                0.0
            },
            scheduled: scheduled + dropped,
            ok: h.len(),
            errors,
            dropped_overload: dropped,
            p50_ms: lat.p50_us / 1e3,
            p99_ms: lat.p99_us / 1e3,
            p999_ms: lat.p999_us / 1e3,
            max_ms: lat.max_us / 1e3,
            max_send_lag_ms: max_lag.as_secs_f64() * 1e3,
            max_outstanding: max_out,
        }
    })
}

/// Closed loop: `count` requests one at a time on `conns[i % n]` (each sent when the previous
/// answered); latency = answer arrival − send. Returns (latency summary in µs, errors).
pub fn run_closed_loop<M, C>(
    conns: &[Arc<Connection>],
    count: u64,
    timeout: Duration,
    make: M,
    check: C,
) -> (LatencySummary, BTreeMap<String, u64>)
where
    M: Fn(u64) -> Request,
    C: Fn(&Response) -> bool,
{
    let mut h = latency_histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..count {
        let req = make(i);
        let conn = &conns[(i % conns.len() as u64) as usize];
        let t = Instant::now();
        let (answer, at) = match conn.start(&req) {
            Ok(p) => p.wait_timed(timeout),
            Err(e) => (Err(e), None),
        };
        match answer {
            Ok(r) if check(&r) => {
                let at = at.unwrap_or_else(Instant::now);
                record_ns(&mut h, at.saturating_duration_since(t).as_nanos() as u64);
            }
            Ok(_) => *errors.entry("UnexpectedAnswer".into()).or_default() += 1,
            Err(e) => *errors.entry(error_name(&e)).or_default() += 1,
        }
    }
    (LatencySummary::of(&h), errors)
}
