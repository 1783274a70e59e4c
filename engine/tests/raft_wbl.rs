//! One shard's raft group on real logs: three replicas in one executor, each on its own WBL
//! (direct I/O, group commit), messages between them on an in-memory network. Proposals commit
//! and apply everywhere with the same state; a full restart recovers every replica from its
//! log alone and the group goes on; a read index is served once applied; compaction under
//! replication writes card-MACed snapshots that the restart then starts from.

mod state_common;

use keyfort_engine::raft::{Replica, Transport};
use keyfort_engine::recovery::open_and_recover;
use keyfort_engine::state::Op;
use keyfort_engine::wbl::WblOptions;
use keyfort_hsm::PartitionId;
use raft::eraftpb::{ConfState, Message};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::{Rc, Weak};
use std::time::Duration;

const IDS: [u64; 3] = [1, 2, 3];
const TICK: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Net {
    replicas: RefCell<BTreeMap<u64, Weak<Replica>>>,
    /// Nodes cut off: their messages are lost both ways.
    cut: RefCell<std::collections::BTreeSet<u64>>,
}

struct To(Rc<Net>);

impl Transport for To {
    fn send(&self, _shard: u32, msgs: Vec<Message>) {
        for m in msgs {
            let cut = self.0.cut.borrow();
            if cut.contains(&m.to) || cut.contains(&m.from) {
                continue;
            }
            drop(cut);
            let r = self.0.replicas.borrow().get(&m.to).and_then(Weak::upgrade);
            if let Some(r) = r {
                glommio::spawn_local(async move { r.step(m) }).detach();
            }
        }
    }
}

fn opts() -> WblOptions {
    WblOptions {
        segment_bytes: 1 << 20,
        ..WblOptions::default()
    }
}

async fn open_all(root: &Path, net: &Rc<Net>) -> Vec<Rc<Replica>> {
    let bootstrap = ConfState {
        voters: IDS.to_vec(),
        ..Default::default()
    };
    let mut out = Vec::new();
    for id in IDS {
        let dir = root.join(format!("n{id}"));
        std::fs::create_dir_all(dir.join("snap")).unwrap();
        let card = state_common::card::session();
        let start = open_and_recover(&dir.join("snap"), &dir.join("wbl"), opts(), &card, 1 << 20)
            .await
            .unwrap();
        let r = Replica::open(id, 0, start, &bootstrap, Rc::new(To(net.clone())), false)
            .await
            .unwrap();
        net.replicas.borrow_mut().insert(id, Rc::downgrade(&r));
        glommio::spawn_local(r.clone().run_ticker(TICK)).detach();
        out.push(r);
    }
    out
}

async fn leader(rs: &[Rc<Replica>]) -> Rc<Replica> {
    for _ in 0..1000 {
        if let Some(l) = rs.iter().find(|r| r.with_core(|c| c.is_leader())) {
            return l.clone();
        }
        glommio::timer::sleep(TICK).await;
    }
    let why: Vec<_> = rs
        .iter()
        .map(|r| {
            (
                r.failed(),
                r.with_core(|c| {
                    (
                        c.term(),
                        c.commit_index(),
                        c.applied(),
                        format!("{:?}", c.role()),
                    )
                }),
            )
        })
        .collect();
    panic!("no leader elected: {why:?}");
}

fn create(i: u32) -> Op {
    let mut p = [0u8; 16];
    p[..4].copy_from_slice(&i.to_le_bytes());
    Op::PartitionCreate {
        partition: PartitionId(p),
        config: vec![i as u8; 32],
    }
}

async fn converge(rs: &[Rc<Replica>]) -> u128 {
    for _ in 0..1000 {
        let applied: Vec<u64> = rs.iter().map(|r| r.with_core(|c| c.applied())).collect();
        let commit = rs
            .iter()
            .map(|r| r.with_core(|c| c.commit_index()))
            .max()
            .unwrap();
        if applied.iter().all(|&a| a == commit) {
            let d: Vec<u128> = rs
                .iter()
                .map(|r| r.with_core(|c| c.state_machine().digest().0))
                .collect();
            assert!(d.iter().all(|x| *x == d[0]), "replicas differ: {d:x?}");
            return d[0];
        }
        glommio::timer::sleep(TICK).await;
    }
    panic!("replicas did not converge");
}

#[test]
fn proposals_commit_on_every_log_and_survive_a_full_restart() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().to_path_buf();
    keyfort_engine::exec::run_local(root.path(), |_| async move {
        let net = Rc::new(Net::default());
        let rs = open_all(&path, &net).await;
        let l = leader(&rs).await;
        propose_ops(&rs, 0, 300, create).await;
        converge(&rs).await;
        let keys = rs[0].with_core(|c| c.state_machine().partitions().count());
        assert_eq!(keys, 300);
        let read = l.read_index().await.unwrap();
        assert!(read >= 300);
        // Reads arriving while a round is in flight share the next one: hold the first round
        // by cutting the leader's followers off, queue 200 reads, then heal.
        let rounds = l.read_rounds();
        let lid = l.with_core(|c| c.id());
        net.cut
            .borrow_mut()
            .extend(IDS.iter().copied().filter(|&i| i != lid));
        let reads: Vec<_> = (0..200)
            .map(|_| {
                let l = l.clone();
                glommio::spawn_local(async move { l.read_index().await })
            })
            .collect();
        glommio::timer::sleep(TICK * 3).await;
        net.cut.borrow_mut().clear();
        for r in reads {
            assert!(r.await.unwrap() >= read);
        }
        let used = l.read_rounds() - rounds;
        assert!(
            used < 20,
            "200 concurrent reads took {used} ReadIndex rounds"
        );
        // A follower's proposal reaches the leader and is recognized when applied.
        let f = rs.iter().find(|r| !r.with_core(|c| c.is_leader())).unwrap();
        let op = create(10_000);
        let c = f.propose_anywhere(op.kind(), &op.encode()).await.unwrap();
        assert!(c.index > 300);
        let before = converge(&rs).await;
        assert_eq!(
            rs[0].with_core(|c| c.state_machine().partitions().count()),
            301
        );
        for r in &rs {
            r.close().await.unwrap();
        }

        // Every replica restarts from its own log: the same state, and the group goes on.
        let net = Rc::new(Net::default());
        let rs = open_all(&path, &net).await;
        for r in &rs {
            assert_eq!(r.with_core(|c| c.state_machine().digest().0), before);
        }
        propose_ops(&rs, 300, 100, create).await;
        converge(&rs).await;
        assert_eq!(
            rs[1].with_core(|c| c.state_machine().partitions().count()),
            401
        );
        for r in &rs {
            r.close().await.unwrap();
        }
    })
    .unwrap();
}

#[test]
fn compaction_under_replication_and_restart_from_the_snapshots() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().to_path_buf();
    keyfort_engine::exec::run_local(root.path(), |_| async move {
        let card = state_common::card::session();
        let cfg = keyfort_engine::compaction::CompactionConfig::default();
        let net = Rc::new(Net::default());
        let rs = open_all(&path, &net).await;
        propose_ops(&rs, 0, 200, create).await;
        converge(&rs).await;
        for (r, id) in rs.iter().zip(IDS) {
            let dir = path.join(format!("n{id}/snap"));
            let rep = r
                .compact(&dir, &card, &cfg)
                .await
                .unwrap()
                .expect("not joint");
            assert!(rep.lsn >= 200);
        }
        // Applies go on into the fresh memtable over the snapshot.
        propose_ops(&rs, 200, 100, create).await;
        let before = converge(&rs).await;
        for r in &rs {
            r.close().await.unwrap();
        }
        let net = Rc::new(Net::default());
        let rs = open_all(&path, &net).await;
        for r in &rs {
            r.with_core(|c| {
                assert!(
                    c.state_machine().base().is_some(),
                    "restarted from a snapshot"
                );
                assert_eq!(c.state_machine().digest().0, before);
            });
        }
        propose_ops(&rs, 300, 50, create).await;
        converge(&rs).await;
        assert_eq!(
            rs[2].with_core(|c| c.state_machine().partitions().count()),
            350
        );
        for r in &rs {
            r.close().await.unwrap();
        }
    })
    .unwrap();
}

/// Snapshot files fetched by copying them from the sender's snapshot directory (the peer
/// transport streams them in a node; `net/tests/snapshot_stream.rs` tests that part).
struct CopyFrom(std::path::PathBuf);

impl keyfort_engine::raft::snapshot::SnapshotSource for CopyFrom {
    fn fetch<'a>(
        &'a self,
        from: u64,
        desc: &'a keyfort_engine::raft::snapshot::SnapshotDescriptor,
        dest: &'a Path,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + 'a>> {
        Box::pin(async move {
            let src = self
                .0
                .join(format!("n{from}/snap"))
                .join(keyfort_engine::snapshot::file_name(desc.lsn));
            std::fs::copy(&src, dest).map_err(|e| format!("{}: {e}", src.display()))?;
            std::fs::File::open(dest)
                .and_then(|f| f.sync_all())
                .map_err(|e| e.to_string())
        })
    }
}

fn big(i: u32) -> Op {
    let mut p = [0u8; 16];
    p[..4].copy_from_slice(&i.to_le_bytes());
    p[4] = 0xB1;
    Op::PartitionCreate {
        partition: PartitionId(p),
        config: vec![i as u8; 4000],
    }
}

/// Proposes `make(i)` for `i` in `from..from + n` on whoever leads, 64 at a time, retrying
/// when leadership moves (a retried creation of the same partition applies as "exists": the
/// count of partitions stays exact).
async fn propose_ops(rs: &[Rc<Replica>], from: u32, n: u32, make: fn(u32) -> Op) {
    for chunk in (from..from + n).collect::<Vec<_>>().chunks(64) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let rs = rs.to_vec();
            tasks.push(glommio::spawn_local(async move {
                loop {
                    let l = leader(&rs).await;
                    let op = make(i);
                    if l.propose(op.kind(), &op.encode()).await.is_ok() {
                        return;
                    }
                    glommio::timer::sleep(TICK).await;
                }
            }));
        }
        for t in tasks {
            t.await;
        }
    }
}

#[test]
fn a_follower_behind_the_released_log_installs_the_leaders_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().to_path_buf();
    keyfort_engine::exec::run_local(root.path(), |_| async move {
        let card = Rc::new(state_common::card::session());
        let cfg = keyfort_engine::compaction::CompactionConfig::default();
        let net = Rc::new(Net::default());
        net.cut.borrow_mut().insert(3);
        let rs = open_all(&path, &net).await;
        for (r, id) in rs.iter().zip(IDS) {
            r.set_log_retention(0, 0);
            r.enable_snapshots(keyfort_engine::raft::driver::SnapshotSetup {
                source: Rc::new(CopyFrom(path.clone())),
                dir: path.join(format!("n{id}/snap")),
                mac: card.clone(),
            });
        }
        let live = &rs[..2];
        // Two compactions on the two live nodes: the second releases the log below the first.
        for round in 0..2u32 {
            propose_ops(live, round * 600, 600, big).await;
            converge(live).await;
            for (r, id) in live.iter().zip(IDS) {
                let dir = path.join(format!("n{id}/snap"));
                r.compact(&dir, &*card, &cfg)
                    .await
                    .unwrap()
                    .expect("not joint");
            }
        }
        let l = leader(live).await;
        let first = l.with_core(|c| c.store().wbl().first_lsn());
        assert!(
            first > 1,
            "the leader's log was released (first lsn {first})"
        );
        // Node 3 comes back: its log ends before the leader's, so it gets the snapshot.
        net.cut.borrow_mut().clear();
        let digest = converge(&rs).await;
        rs[2].with_core(|c| {
            let base = c.state_machine().base().map(|b| b.lsn());
            assert!(
                base.is_some_and(|b| b >= 1200),
                "installed snapshot at {base:?}"
            );
            assert_eq!(c.state_machine().digest().0, digest);
        });
        propose_ops(&rs, 5000, 50, create).await;
        converge(&rs).await;
        assert_eq!(
            rs[2].with_core(|c| c.state_machine().partitions().count()),
            1250
        );
        for r in &rs {
            r.close().await.unwrap();
        }
        // And node 3 restarts from the installed snapshot and its reset log.
        let net = Rc::new(Net::default());
        let rs = open_all(&path, &net).await;
        propose_ops(&rs, 6000, 10, create).await;
        converge(&rs).await;
        for r in &rs {
            r.close().await.unwrap();
        }
    })
    .unwrap();
}
