//! Card benchmark on SoftHSM2: per-operation latency and per-core throughput of the create path,
//! cached and cold AES-GCM 4 KiB encrypt, partition import and integrity MAC, on 1 and 2 threads
//! (one card session per thread), plus the handle-cache hit rate of a Zipf workload.
//!
//! `cargo run --release -p keyfort-bench --bin hsm_bench -- --out docs/bench/hsm.json`

use keyfort_bench::{latency_histogram, machine, record_ns, utc_date, write_json, LatencySummary};
use keyfort_hsm::softhsm::fixture;
use keyfort_hsm::{Card, KeyHeader, KeyId, MaskedBlob, PartitionId, KEY_HANDLE_CACHE_MAX};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

const CREATE_OPS: usize = 4000;
const PRIMITIVE_OPS: usize = 3000;
const ENCRYPT_OPS: usize = 4000;
const COLD_OPS: usize = 3000;
const IMPORT_OPS: usize = 300;
const MAC_OPS: usize = 4000;
const ZIPF_KEYS: usize = 100_000;
const ZIPF_REQUESTS: usize = 200_000;
const ZIPF_S: f64 = 1.0;

struct Op {
    hist: hdrhistogram::Histogram<u64>,
    elapsed_s: f64,
    ops: usize,
}

fn measure(ops: usize, mut f: impl FnMut(usize)) -> Op {
    let mut hist = latency_histogram();
    let start = Instant::now();
    for i in 0..ops {
        let t = Instant::now();
        f(i);
        record_ns(&mut hist, t.elapsed().as_nanos() as u64);
    }
    Op {
        hist,
        elapsed_s: start.elapsed().as_secs_f64(),
        ops,
    }
}

fn key_id(i: u64) -> KeyId {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[8..].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_le_bytes());
    KeyId(k)
}

/// The single card calls the create and cold paths are made of, for comparison with DESIGN's
/// measured facts (generate ~22 us, wrap ~23, unwrap ~25, HMAC 100 B ~7).
fn primitives(s: &keyfort_hsm::CoreSession, p: &PartitionId) -> Vec<(&'static str, Op)> {
    use keyfort_hsm::cryptoki::mechanism::Mechanism;
    use keyfort_hsm::templates;
    let raw = s.pkcs11_session();
    let keys = s.partition_keys(p).expect("partition");
    let mut handles = Vec::with_capacity(PRIMITIVE_OPS);
    let mut out = vec![];
    out.push((
        "card_generate",
        measure(PRIMITIVE_OPS, |_| {
            handles.push(
                raw.generate_key(&Mechanism::AesKeyGen, &templates::customer_key_generate())
                    .expect("generate"),
            );
        }),
    ));
    let mut wrapped = vec![];
    out.push((
        "card_wrap",
        measure(PRIMITIVE_OPS, |i| {
            wrapped = raw
                .wrap_key(&Mechanism::AesKeyWrap, keys.masking, handles[i])
                .expect("wrap");
        }),
    ));
    let msg = [0u8; 100];
    out.push((
        "card_hmac_100b",
        measure(PRIMITIVE_OPS, |_| {
            raw.sign(&Mechanism::Sha256Hmac, keys.hmac, &msg)
                .expect("hmac");
        }),
    ));
    out.push((
        "card_destroy",
        measure(PRIMITIVE_OPS, |i| {
            raw.destroy_object(handles[i]).expect("destroy");
        }),
    ));
    out.push((
        "card_unwrap",
        measure(PRIMITIVE_OPS, |_| {
            let h = keyfort_hsm::raw::unwrap_aes_kw(
                raw,
                keys.masking,
                &wrapped,
                &templates::customer_key_load(),
            )
            .expect("unwrap");
            raw.destroy_object(h).expect("destroy");
        }),
    ));
    out
}

/// One thread's run of every operation on its own session.
fn run_thread(card: &Card, config: &[u8], ik: &[u8], thread: u64) -> Vec<(&'static str, Op)> {
    let mut s = card.session().expect("session");
    let p = s.import_partition(config).expect("import");
    s.import_integrity_key(ik).expect("integrity key");
    let mut out = primitives(&s, &p);
    let base = thread << 40;
    out.push((
        "create_path",
        measure(CREATE_OPS, |i| {
            s.create_key(&KeyHeader::aes(p, key_id(base + i as u64), 1))
                .expect("create");
        }),
    ));
    let blob = s
        .create_key(&KeyHeader::aes(p, key_id(base + (1 << 32)), 1))
        .expect("create");
    let data = vec![0x5au8; 4096];
    s.encrypt(&blob, &data, b"").expect("warm");
    out.push((
        "encrypt_cached_4k",
        measure(ENCRYPT_OPS, |_| {
            s.encrypt(&blob, &data, b"bench").expect("encrypt");
        }),
    ));
    let kref = MaskedBlob::decode(&blob).expect("blob").header.key_ref();
    let mut cold = latency_histogram();
    let start = Instant::now();
    for _ in 0..COLD_OPS {
        s.forget_key(&kref);
        let t = Instant::now();
        s.encrypt(&blob, &data, b"bench").expect("encrypt");
        record_ns(&mut cold, t.elapsed().as_nanos() as u64);
    }
    out.push((
        "encrypt_cold_4k",
        Op {
            hist: cold,
            elapsed_s: start.elapsed().as_secs_f64(),
            ops: COLD_OPS,
        },
    ));
    out.push((
        "partition_import",
        measure(IMPORT_OPS, |_| {
            s.import_partition(config).expect("import");
        }),
    ));
    let msg = vec![0x11u8; 256];
    out.push((
        "integrity_mac_256b",
        measure(MAC_OPS, |_| {
            s.mac(&msg).expect("mac");
        }),
    ));
    out
}

fn run(card: &Card, config: &[u8], ik: &[u8], threads: usize) -> Value {
    let results: Vec<Vec<(&'static str, Op)>> = std::thread::scope(|scope| {
        let hs: Vec<_> = (0..threads)
            .map(|t| scope.spawn(move || run_thread(card, config, ik, t as u64)))
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    let mut ops = serde_json::Map::new();
    for (i, (name, _)) in results[0].iter().enumerate() {
        let mut merged = latency_histogram();
        let mut per_core = 0.0;
        for r in &results {
            merged.add(&r[i].1.hist).expect("merge");
            per_core += r[i].1.ops as f64 / r[i].1.elapsed_s;
        }
        let summary = LatencySummary::of(&merged);
        ops.insert(
            name.to_string(),
            json!({
                "p50_us": summary.p50_us,
                "p99_us": summary.p99_us,
                "count": summary.count,
                "ops_per_s_per_core": per_core / threads as f64,
                "ops_per_s_total": per_core,
            }),
        );
    }
    Value::Object(ops)
}

/// Zipf(s) over `n` ranks by inverse CDF with a fixed xorshift stream (reproducible).
struct Zipf {
    cdf: Vec<f64>,
    state: u64,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf {
            cdf,
            state: 0x2545_f491_4f6c_dd1d,
        }
    }
    fn next(&mut self) -> usize {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let u = (self.state >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

fn zipf_hit_rate(card: &Card, config: &[u8]) -> f64 {
    let mut s = card.session().expect("session");
    let p = s.import_partition(config).expect("import");
    let blobs: Vec<Vec<u8>> = (0..ZIPF_KEYS)
        .map(|i| {
            s.create_key(&KeyHeader::aes(p, key_id((7 << 48) + i as u64), 1))
                .expect("create")
        })
        .collect();
    let mut z = Zipf::new(ZIPF_KEYS, ZIPF_S);
    let (h0, m0) = s.cache_stats();
    for _ in 0..ZIPF_REQUESTS {
        s.encrypt(&blobs[z.next()], b"zipf", b"").expect("encrypt");
    }
    let (h1, m1) = s.cache_stats();
    (h1 - h0) as f64 / ((h1 - h0) + (m1 - m0)) as f64
}

/// Flags of `hsm_bench`.
#[derive(clap::Parser)]
struct Args {
    /// Where to write the JSON results.
    #[arg(long, default_value = "docs/bench/hsm.json")]
    out: PathBuf,
}

fn main() {
    let out = <Args as clap::Parser>::parse().out;
    let card = fixture().new_card("bench", "realm").expect("card");
    let mut s = card.session().expect("session");
    let config = s
        .create_partition(PartitionId([0xbe; 16]))
        .expect("partition");
    let ik = s.create_integrity_key().expect("integrity key");
    drop(s);

    let one = run(&card, &config, &ik, 1);
    let two = run(&card, &config, &ik, 2);
    let hit_rate = zipf_hit_rate(&card, &config);

    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>14} {:>14}",
        "operation", "threads", "p50 us", "p99 us", "ops/s/core", "ops/s total"
    );
    for (t, v) in [(1, &one), (2, &two)] {
        for (name, o) in v.as_object().expect("ops") {
            println!(
                "{:<22} {:>8} {:>9.1} {:>9.1} {:>14.0} {:>14.0}",
                name,
                t,
                o["p50_us"].as_f64().unwrap_or(0.0),
                o["p99_us"].as_f64().unwrap_or(0.0),
                o["ops_per_s_per_core"].as_f64().unwrap_or(0.0),
                o["ops_per_s_total"].as_f64().unwrap_or(0.0)
            );
        }
    }
    println!(
        "zipf(s={ZIPF_S}) over {ZIPF_KEYS} keys, cache {KEY_HANDLE_CACHE_MAX}: hit rate {:.3}",
        hit_rate
    );

    let get = |v: &Value, op: &str, f: &str| v[op][f].clone();
    let create_us_per_key = 1e6
        / one["create_path"]["ops_per_s_per_core"]
            .as_f64()
            .unwrap_or(f64::NAN);
    let report = json!({
        "benchmark": "hsm_bench",
        "module": "SoftHSM2 (/usr/lib/softhsm/libsofthsm2.so)",
        "machine": machine(),
        // Other work on this 2-core VM inflates every figure; record how busy it was.
        "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "date": utc_date(),
        "create_path_us_per_key": create_us_per_key,
        "create_path_us_p50": get(&one, "create_path", "p50_us"),
        "create_path_us_p99": get(&one, "create_path", "p99_us"),
        "encrypt_cached_4k_us_p50": get(&one, "encrypt_cached_4k", "p50_us"),
        "encrypt_cached_4k_us_p99": get(&one, "encrypt_cached_4k", "p99_us"),
        "encrypt_cold_4k_us_p50": get(&one, "encrypt_cold_4k", "p50_us"),
        "encrypt_cold_4k_us_p99": get(&one, "encrypt_cold_4k", "p99_us"),
        "partition_import_us": get(&one, "partition_import", "p50_us"),
        "partition_import_us_p99": get(&one, "partition_import", "p99_us"),
        "integrity_mac_256b_us_p50": get(&one, "integrity_mac_256b", "p50_us"),
        "integrity_mac_256b_us_p99": get(&one, "integrity_mac_256b", "p99_us"),
        "zipf_hit_rate": hit_rate,
        "zipf": {"keys": ZIPF_KEYS, "requests": ZIPF_REQUESTS, "s": ZIPF_S, "cache_max": KEY_HANDLE_CACHE_MAX},
        "threads_1": one,
        "threads_2": two,
    });
    write_json(&out, &report).expect("write JSON");
    println!("wrote {}", out.display());
}
