//! The durable store against a local directory and against a real `keyfort-s3` process.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use futures_lite::future::block_on;
use keyfort_tools::durable::{
    DurableStore, FetchOptions, PutOutcome, S3Credentials, StoreError, PUT_SINGLE_BYTES_MAX,
};

const ACCESS_KEY: &str = "keyfort-test";
const SECRET_KEY: &str = "keyfort-test-secret";
const BUCKET: &str = "keyfort-dr";

/// A `keyfort-s3` child (`keyfort_bench::s3_server`) with its root, removed with it.
struct S3Server {
    server: keyfort_bench::s3_server::S3Server,
    _root: tempfile::TempDir,
}

impl S3Server {
    fn start(extra: &[&str]) -> S3Server {
        let root = tempfile::tempdir().unwrap();
        let server = keyfort_bench::s3_server::S3Server::start(
            env!("CARGO_BIN_EXE_keyfort-s3").as_ref(),
            root.path(),
            BUCKET,
            extra,
        )
        .unwrap();
        S3Server {
            server,
            _root: root,
        }
    }

    fn open(&self, prefix: &str) -> DurableStore {
        let creds = S3Credentials {
            access_key_id: self.server.access_key.clone(),
            secret_access_key: self.server.secret_key.clone(),
        };
        DurableStore::open_with(&self.server.url(prefix), Some(creds)).unwrap()
    }
}

/// Deterministic, non-repeating-per-block content so a misplaced part is caught.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_file(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
}

/// The behaviour every backend must have.
fn store_contract(store: &DurableStore) {
    let scratch = tempfile::tempdir().unwrap();
    block_on(async {
        // conditional create never overwrites
        let first = store
            .put_bytes_create("m/manifest-1", b"first".to_vec())
            .await;
        assert_eq!(first, Ok(PutOutcome::Created));
        let second = store
            .put_bytes_create("m/manifest-1", b"second".to_vec())
            .await;
        assert_eq!(second, Ok(PutOutcome::AlreadyExists));
        assert_eq!(store.get_bytes("m/manifest-1").await.unwrap(), b"first");

        // a 40 MiB file goes multipart and comes back byte-identical
        let big = pattern(40 << 20, 7);
        assert!(big.len() as u64 > PUT_SINGLE_BYTES_MAX);
        let src = scratch.path().join("big.src");
        write_file(&src, &big);
        let put = store.put_file_create("snap/shard-1/big", &src).await;
        assert_eq!(put, Ok(PutOutcome::Created));
        let again = store.put_file_create("snap/shard-1/big", &src).await;
        assert_eq!(again, Ok(PutOutcome::AlreadyExists));
        let dest = scratch.path().join("big.dest");
        let report = store
            .get_to_file("snap/shard-1/big", &dest, FetchOptions::default())
            .await
            .unwrap();
        assert_eq!(report.bytes, big.len() as u64);
        assert_eq!(report.parts, 5);
        assert!(std::fs::read(&dest).unwrap() == big, "fetched file differs");

        // a small file is one conditional PUT
        let small = scratch.path().join("small");
        write_file(&small, b"small file");
        let put = store.put_file_create("snap/shard-2/small", &small).await;
        assert_eq!(put, Ok(PutOutcome::Created));

        // missing keys
        let missing = store.get_bytes("m/absent").await;
        assert_eq!(
            missing,
            Err(StoreError::NotFound {
                key: "m/absent".into()
            })
        );
        assert_eq!(store.head("m/absent").await, Ok(None));
        assert_eq!(store.head("m/manifest-1").await, Ok(Some(5)));

        // list is a string prefix, sorted, relative to the URL prefix, staging hidden
        let shards = store.list("snap/shard-").await.unwrap();
        assert_eq!(
            shards,
            vec![
                ("snap/shard-1/big".to_string(), big.len() as u64),
                ("snap/shard-2/small".to_string(), 10),
            ]
        );
        assert_eq!(store.list("m/").await.unwrap().len(), 1);
        assert_eq!(store.list("").await.unwrap().len(), 3);
        assert!(store.list("nothing/here").await.unwrap().is_empty());

        // delete, and deleting an absent key is fine
        store.delete("m/manifest-1").await.unwrap();
        store.delete("m/manifest-1").await.unwrap();
        assert_eq!(store.head("m/manifest-1").await, Ok(None));
        let recreated = store
            .put_bytes_create("m/manifest-1", b"third".to_vec())
            .await;
        assert_eq!(recreated, Ok(PutOutcome::Created));
    });
}

#[test]
fn local_directory_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("store").display());
    let store = DurableStore::open(&url).unwrap();
    assert_eq!(store.url(), url);
    store_contract(&store);
    // keys live as files under the directory
    assert!(dir.path().join("store/snap/shard-1/big").is_file());
}

#[test]
fn s3_store_keeps_the_contract_against_keyfort_s3() {
    let server = S3Server::start(&[]);
    let store = server.open("cluster-a");
    store_contract(&store);
    // a second prefix in the same bucket sees none of the first one's keys
    let other = server.open("cluster-b");
    assert!(block_on(other.list("")).unwrap().is_empty());
}

#[test]
fn cut_gets_are_resumed_byte_identical() {
    let server = S3Server::start(&["--fault-cut-get-every", "2"]);
    let store = server.open("");
    let scratch = tempfile::tempdir().unwrap();
    let data = pattern(12 << 20, 11);
    let src = scratch.path().join("src");
    write_file(&src, &data);
    block_on(async {
        let put = store.put_file_create("snap/cut", &src).await;
        assert_eq!(put, Ok(PutOutcome::Created));
        // Each cut halves what is left, and bodies of 64 KiB or less are never cut: 1 MiB
        // parts need at most 4 resumes, so 8 always suffices.
        let opts = FetchOptions {
            part_bytes: 1 << 20,
            parallel: 4,
            retries: 8,
        };
        let dest = scratch.path().join("dest");
        let report = store.get_to_file("snap/cut", &dest, opts).await.unwrap();
        assert_eq!(report.parts, 12);
        assert!(report.resumed_parts > 0, "{report:?}");
        assert!(
            std::fs::read(&dest).unwrap() == data,
            "resumed file differs"
        );
    });
}

#[test]
fn keyfort_s3_refuses_non_loopback_listen_addresses() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keyfort-s3"))
        .arg("--root")
        .arg(root.path())
        .args(["--listen", "0.0.0.0:0"])
        .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("loopback only"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn s3_credentials_file_has_two_lines() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    write_file(&good, b"AKID\nsecret\n");
    let creds = S3Credentials::from_file(&good).unwrap();
    assert_eq!(creds.access_key_id, "AKID");
    assert_eq!(creds.secret_access_key, "secret");
    let bad = dir.path().join("bad");
    write_file(&bad, b"only-one-line\n");
    assert!(matches!(
        S3Credentials::from_file(&bad),
        Err(StoreError::Credentials { .. })
    ));
}

#[test]
fn bad_urls_and_options_are_typed_errors() {
    assert!(matches!(
        DurableStore::open("gs://bucket"),
        Err(StoreError::BadUrl { .. })
    ));
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path().to_str().unwrap()).unwrap();
    let opts = FetchOptions {
        parallel: 0,
        ..Default::default()
    };
    let got = block_on(store.get_to_file("k", &dir.path().join("d"), opts));
    assert!(matches!(got, Err(StoreError::BadOptions { .. })), "{got:?}");
    let bad_key = block_on(store.get_bytes("a//b"));
    assert!(
        matches!(bad_key, Err(StoreError::BadKey { .. })),
        "{bad_key:?}"
    );
}

/// Racing creates of one key: exactly one wins and its content is what stays, for single PUTs
/// and for staged multipart uploads (whose completion carries `If-None-Match: *`).
fn racing_creates_have_one_winner(store: &DurableStore) {
    let scratch = tempfile::tempdir().unwrap();
    let racers: u8 = 6;
    let outcomes: Vec<PutOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..racers)
            .map(|i| s.spawn(move || block_on(store.put_bytes_create("race/small", vec![i; 64]))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let winners: Vec<u8> = (0..racers)
        .filter(|&i| outcomes[i as usize] == PutOutcome::Created)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let kept = block_on(store.get_bytes("race/small")).unwrap();
    assert_eq!(kept, vec![winners[0]; 64]);

    let big_len = PUT_SINGLE_BYTES_MAX as usize + (1 << 20);
    let files: Vec<_> = (0..2u64)
        .map(|i| {
            let path = scratch.path().join(format!("big-{i}"));
            write_file(&path, &pattern(big_len, 100 + i));
            path
        })
        .collect();
    let outcomes: Vec<PutOutcome> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|f| s.spawn(move || block_on(store.put_file_create("race/big", f))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    let winner = outcomes
        .iter()
        .position(|o| *o == PutOutcome::Created)
        .expect("one large create wins");
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == PutOutcome::Created)
            .count(),
        1
    );
    let dest = scratch.path().join("big.dest");
    block_on(store.get_to_file("race/big", &dest, FetchOptions::default())).unwrap();
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&files[winner]).unwrap());
    assert_eq!(
        block_on(store.list("race/")).unwrap().len(),
        2,
        "staging hidden"
    );
}

#[test]
fn racing_creates_have_one_winner_on_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    racing_creates_have_one_winner(&DurableStore::open(dir.path().to_str().unwrap()).unwrap());
    let server = S3Server::start(&[]);
    racing_creates_have_one_winner(&server.open("race-prefix"));
}

#[test]
fn store_is_awaitable_from_a_glommio_executor() {
    let server = S3Server::start(&[]);
    let store = server.open("glommio");
    let done = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("durable-test")
        .io_memory(1 << 20)
        .spawn(move || async move {
            let put = store.put_bytes_create("k", b"from glommio".to_vec()).await;
            assert_eq!(put, Ok(PutOutcome::Created));
            // the executor keeps running other tasks while the store works
            let ticker = glommio::spawn_local(async { 7 });
            let got = store.get_bytes("k").await.unwrap();
            assert_eq!(ticker.await, 7);
            got
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(done, b"from glommio");
}

#[test]
fn keyfort_s3_exits_on_sigterm() {
    let mut server = S3Server::start(&[]);
    let pid = server.server.child().id() as libc::pid_t;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(status) = server.server.child().try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still running");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn store_handles_and_their_futures_cross_threads() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path().to_str().unwrap()).unwrap();
    send_sync(&store);
    let put = store.put_bytes_create("k", vec![1]);
    send(&put);
    let fetch = store.get_to_file("k", dir.path(), FetchOptions::default());
    send(&fetch);
    drop(fetch);
    assert_eq!(block_on(put), Ok(PutOutcome::Created));
    // the durable thread outlives the handle that made it, as long as a clone is alive
    let clone = store.clone();
    drop(store);
    assert_eq!(block_on(clone.get_bytes("k")), Ok(vec![1]));
}
