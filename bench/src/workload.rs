//! The load generator's workloads: which [`Op`] comes next, from a seeded random generator, over
//! the keys the run knows to be live.
//!
//! A [`Chooser`] hands out operations ([`Chooser::next_op`]) and learns their outcomes
//! ([`Chooser::answered`]). It only picks keys whose create was acknowledged: keys
//! `0..preloaded` (made by [`crate::target::Target::preload`]) from the start, and a key created
//! during the run (numbered from `preloaded` upwards, see [`crate::target`]) once its create
//! answered successfully. A target therefore never sees an operation on a key it has not
//! mapped yet, and the generator needs no map of its own.
//!
//! The mixes (each operation drawn independently):
//! * **create-heavy**: 90 % create, 10 % use (half encrypt, half decrypt), use keys uniform
//!   over the live keys;
//! * **use-heavy**: 90 % use (half encrypt, half decrypt), 10 % create, use keys drawn by a Zipf
//!   law (exponent [`DEFAULT_ZIPF`] unless told) over the live keys, the oldest hottest (rank 1
//!   is key 0);
//! * **churn**: 45 % create, 45 % delete, 10 % encrypt (uniform over the live keys). A delete
//!   takes the oldest live key *created during this run*; the preloaded keys are never deleted,
//!   so consecutive runs over one preloaded target (a rate search) never delete a key twice.
//!   The run-created keys (live or being created) are kept between 0 and 2 × [`CHURN_WINDOW`]
//!   (a create is forced when none is acknowledged, a delete when the window is full), so the
//!   live key count stays within that of the preload (more only while more creates than that
//!   are in flight with none acknowledged yet).
//!
//! Decrypts need a ciphertext made beforehand, which only the preloaded keys have (the target
//! makes one per key in `preload`): a decrypt draws from the preloaded keys (by the same law
//! as encrypts), and with no preload it becomes an encrypt.

use crate::target::Op;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::str::FromStr;

/// The Zipf exponent of use-heavy key choice unless told otherwise (YCSB's).
pub const DEFAULT_ZIPF: f64 = 0.99;
/// Churn keeps between 0 and twice this many run-created keys live.
pub const CHURN_WINDOW: u64 = 512;
/// Shares in percent of the mixes (the rest of each is the other kind).
const CREATE_HEAVY_CREATE_PCT: u32 = 90;
const USE_HEAVY_CREATE_PCT: u32 = 10;
const CHURN_USE_PCT: u32 = 10;

/// A named operation mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    CreateHeavy,
    UseHeavy,
    Churn,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::CreateHeavy, Workload::UseHeavy, Workload::Churn];

    /// The name on the command line, in tables and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::CreateHeavy => "create-heavy",
            Workload::UseHeavy => "use-heavy",
            Workload::Churn => "churn",
        }
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| format!("unknown workload {s:?} (create-heavy, use-heavy or churn)"))
    }
}

/// Draws ranks `1..=n` with probability proportional to `rank^-exponent`: rejection-inversion
/// sampling (Hörmann and Derflinger 1996, as in Apache Commons RNG), O(1) per draw for any `n`.
#[derive(Clone, Debug)]
pub struct Zipf {
    n: f64,
    exponent: f64,
    h_integral_x1: f64,
    h_integral_n: f64,
    s: f64,
}

impl Zipf {
    /// `n` ≥ 1 ranks; `exponent` ≥ 0 (0: uniform).
    pub fn new(n: u64, exponent: f64) -> Zipf {
        assert!(n >= 1, "Zipf over no ranks");
        assert!(exponent >= 0.0, "negative Zipf exponent");
        let mut z = Zipf {
            n: n as f64,
            exponent,
            h_integral_x1: 0.0,
            h_integral_n: 0.0,
            s: 0.0,
        };
        z.h_integral_x1 = z.h_integral(1.5) - 1.0;
        z.h_integral_n = z.h_integral(z.n + 0.5);
        z.s = 2.0 - z.h_integral_inverse(z.h_integral(2.5) - z.h(2.0));
        z
    }

    /// How many ranks it draws from.
    pub fn n(&self) -> u64 {
        self.n as u64
    }

    /// A rank in `1..=n`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        loop {
            let u = self.h_integral_n + rng.gen::<f64>() * (self.h_integral_x1 - self.h_integral_n);
            let x = self.h_integral_inverse(u);
            let k = (x + 0.5).floor().clamp(1.0, self.n);
            if k - x <= self.s || u >= self.h_integral(k + 0.5) - self.h(k) {
                return k as u64;
            }
        }
    }

    fn h(&self, x: f64) -> f64 {
        (-self.exponent * x.ln()).exp()
    }

    fn h_integral(&self, x: f64) -> f64 {
        let lx = x.ln();
        expm1_over_x((1.0 - self.exponent) * lx) * lx
    }

    fn h_integral_inverse(&self, x: f64) -> f64 {
        let t = (x * (1.0 - self.exponent)).max(-1.0);
        (ln1p_over_x(t) * x).exp()
    }
}

/// `ln(1 + x) / x`, continuous at 0.
fn ln1p_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.ln_1p() / x
    } else {
        1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x))
    }
}

/// `(e^x − 1) / x`, continuous at 0.
fn expm1_over_x(x: f64) -> f64 {
    if x.abs() > 1e-8 {
        x.exp_m1() / x
    } else {
        1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x))
    }
}

/// A workload's deterministic source of operations (same seed and same answers: same ops).
#[derive(Debug)]
pub struct Chooser {
    workload: Workload,
    preloaded: u64,
    zipf_exponent: f64,
    rng: StdRng,
    /// The number the next create gets.
    next_key: u64,
    /// Keys created during the run whose create was acknowledged and that no delete was
    /// chosen for, oldest first.
    run_live: VecDeque<u64>,
    /// Creates handed out and not yet answered.
    pending_creates: u64,
    /// Samplers over the preloaded keys and over the live keys (rebuilt when a count changes).
    zipf: [Option<Zipf>; 2],
}

impl Chooser {
    /// A chooser for a run over a target preloaded with keys `0..preloaded`.
    pub fn new(workload: Workload, preloaded: u64, zipf_exponent: f64, seed: u64) -> Chooser {
        Chooser {
            workload,
            preloaded,
            zipf_exponent,
            rng: StdRng::seed_from_u64(seed),
            next_key: preloaded,
            run_live: VecDeque::new(),
            pending_creates: 0,
            zipf: [None, None],
        }
    }

    /// Keys an operation may use now (preloaded and acknowledged, not chosen for deletion).
    pub fn live_keys(&self) -> u64 {
        self.preloaded + self.run_live.len() as u64
    }

    /// Creates handed out whose answer has not been reported.
    pub fn pending_creates(&self) -> u64 {
        self.pending_creates
    }

    /// The next operation to start.
    pub fn next_op(&mut self) -> Op {
        let pct: u32 = self.rng.gen_range(0..100);
        match self.workload {
            Workload::CreateHeavy if pct < CREATE_HEAVY_CREATE_PCT => self.create(),
            Workload::UseHeavy if pct < USE_HEAVY_CREATE_PCT => self.create(),
            Workload::CreateHeavy => self.use_op(false),
            Workload::UseHeavy => self.use_op(true),
            Workload::Churn if pct < CHURN_USE_PCT => match self.live_key(false) {
                Some(key) => Op::Encrypt { key },
                None => self.create(),
            },
            Workload::Churn => {
                let run_keys = self.run_live.len() as u64 + self.pending_creates;
                let delete = if self.run_live.is_empty() {
                    false
                } else if run_keys >= 2 * CHURN_WINDOW {
                    true
                } else {
                    self.rng.gen_bool(0.5)
                };
                match delete.then(|| self.run_live.pop_front()).flatten() {
                    Some(key) => Op::Delete { key },
                    None => self.create(),
                }
            }
        }
    }

    /// Reports the outcome of an operation [`Chooser::next_op`] handed out (`ok`: answered
    /// successfully). A successful create makes its key live; a failed one is forgotten.
    /// A deleted key stopped being chosen when the delete was handed out, whatever its outcome.
    pub fn answered(&mut self, op: Op, ok: bool) {
        if let Op::Create { key } = op {
            self.pending_creates = self.pending_creates.saturating_sub(1);
            if ok {
                self.run_live.push_back(key);
            }
        }
    }

    fn create(&mut self) -> Op {
        let key = self.next_key;
        self.next_key += 1;
        self.pending_creates += 1;
        Op::Create { key }
    }

    /// An encrypt or (half the time) a decrypt; a create when no key is live.
    fn use_op(&mut self, zipf: bool) -> Op {
        let decrypt = self.rng.gen_bool(0.5) && self.preloaded > 0;
        let key = if decrypt {
            self.draw(self.preloaded, zipf)
        } else {
            match self.live_key(zipf) {
                Some(k) => k,
                None => return self.create(),
            }
        };
        if decrypt {
            Op::Decrypt { key }
        } else {
            Op::Encrypt { key }
        }
    }

    /// A live key, by Zipf rank (oldest hottest) or uniformly; none when no key is live.
    fn live_key(&mut self, zipf: bool) -> Option<u64> {
        let n = self.live_keys();
        if n == 0 {
            return None;
        }
        let i = self.draw(n, zipf);
        Some(if i < self.preloaded {
            i
        } else {
            self.run_live[(i - self.preloaded) as usize]
        })
    }

    /// An index in `0..n` (n ≥ 1), by Zipf rank − 1 or uniformly.
    fn draw(&mut self, n: u64, zipf: bool) -> u64 {
        if !zipf {
            return self.rng.gen_range(0..n);
        }
        // Two samplers: decrypts draw over the preloaded keys, encrypts over all live ones.
        let slot = usize::from(n != self.preloaded);
        if self.zipf[slot].as_ref().map(Zipf::n) != Some(n) {
            self.zipf[slot] = Some(Zipf::new(n, self.zipf_exponent));
        }
        let z = self.zipf[slot].as_ref().expect("sampler just set");
        z.sample(&mut self.rng) - 1
    }
}
