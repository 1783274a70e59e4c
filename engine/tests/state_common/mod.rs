//! Random logs over a small universe of partitions, keys and idempotency ids, so that creates,
//! updates, rotates (stale ones included), deletes, re-creates and duplicate ids collide often.

#![allow(dead_code)]

use keyfort_engine::state::{IdempotencyId, KeyPut, KeyState, Op, PutOp};
use keyfort_engine::wbl::RecordKind;
use keyfort_hsm::{KeyHeader, KeyId, PartitionId};
use proptest::prelude::*;

pub fn partition(i: u8) -> PartitionId {
    PartitionId([i + 1; 16])
}

pub fn key(i: u8) -> KeyId {
    KeyId([0x40 + i; 16])
}

pub fn idem(i: u8) -> IdempotencyId {
    if i == 0 {
        IdempotencyId::NONE
    } else {
        IdempotencyId([i; 16])
    }
}

pub fn blob(p: u8, k: u8, v: u32) -> Vec<u8> {
    let mut b = vec![0xB0, p, k];
    b.extend_from_slice(&v.to_le_bytes());
    b.resize(117, 0x5A);
    b
}

pub fn put(
    op: PutOp,
    id: IdempotencyId,
    p: u8,
    k: u8,
    version: u32,
    replaced: u32,
    meta: &[u8],
) -> Op {
    Op::KeyPut(KeyPut {
        op,
        idempotency_id: id,
        header: KeyHeader::aes(partition(p), key(k), version),
        version_replaced: replaced,
        state: KeyState::Enabled,
        metadata: meta.to_vec(),
        blob: if op == PutOp::Update {
            vec![]
        } else {
            blob(p, k, version)
        },
    })
}

/// One generated step; encoded into one record.
#[derive(Clone, Debug)]
pub enum Step {
    Create {
        p: u8,
        k: u8,
        idem: u8,
    },
    Update {
        p: u8,
        k: u8,
        v: u32,
        meta: u8,
        idem: u8,
    },
    Rotate {
        p: u8,
        k: u8,
        replaced: u32,
        idem: u8,
    },
    Delete {
        p: u8,
        k: u8,
        idem: u8,
    },
    PartitionCreate {
        p: u8,
    },
    PartitionDelete {
        p: u8,
    },
    Cluster {
        c: u8,
    },
    Garbage {
        bytes: Vec<u8>,
    },
}

impl Step {
    pub fn op(&self) -> Option<Op> {
        Some(match *self {
            Step::Create { p, k, idem: i } => put(PutOp::Create, idem(i), p, k, 1, 0, b"created"),
            Step::Update {
                p,
                k,
                v,
                meta,
                idem: i,
            } => put(PutOp::Update, idem(i), p, k, v, 0, &[meta; 3]),
            Step::Rotate {
                p,
                k,
                replaced,
                idem: i,
            } => put(
                PutOp::Rotate,
                idem(i),
                p,
                k,
                replaced + 1,
                replaced,
                b"rotated",
            ),
            Step::Delete { p, k, idem: i } => Op::KeyDelete {
                idempotency_id: idem(i),
                partition: partition(p),
                key_id: key(k),
            },
            Step::PartitionCreate { p } => Op::PartitionCreate {
                partition: partition(p),
                config: vec![p; 245],
            },
            Step::PartitionDelete { p } => Op::PartitionDelete {
                partition: partition(p),
            },
            Step::Cluster { c } => Op::ClusterConfig {
                config: vec![c; 40],
            },
            Step::Garbage { .. } => return None,
        })
    }

    pub fn record(&self) -> (RecordKind, Vec<u8>) {
        match (self, self.op()) {
            (_, Some(op)) => (op.kind(), op.encode()),
            (Step::Garbage { bytes }, None) => (RecordKind::KeyPut, bytes.clone()),
            _ => unreachable!(),
        }
    }
}

pub fn step() -> impl Strategy<Value = Step> {
    let p = 0u8..2;
    let k = 0u8..4;
    let i = 0u8..4;
    prop_oneof![
        4 => (p.clone(), k.clone(), i.clone()).prop_map(|(p, k, idem)| Step::Create { p, k, idem }),
        2 => (p.clone(), k.clone(), 1u32..4, any::<u8>(), i.clone())
            .prop_map(|(p, k, v, meta, idem)| Step::Update { p, k, v, meta, idem }),
        3 => (p.clone(), k.clone(), 0u32..4, i.clone())
            .prop_map(|(p, k, replaced, idem)| Step::Rotate { p, k, replaced, idem }),
        2 => (p.clone(), k.clone(), i).prop_map(|(p, k, idem)| Step::Delete { p, k, idem }),
        1 => p.clone().prop_map(|p| Step::PartitionCreate { p }),
        1 => p.prop_map(|p| Step::PartitionDelete { p }),
        1 => any::<u8>().prop_map(|c| Step::Cluster { c }),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(|bytes| Step::Garbage { bytes }),
    ]
}

/// A log that starts by creating both partitions, then random steps.
pub fn log(max: usize) -> impl Strategy<Value = Vec<(RecordKind, Vec<u8>)>> {
    proptest::collection::vec(step(), 1..max).prop_map(|steps| {
        let mut out = vec![
            Step::PartitionCreate { p: 0 }.record(),
            Step::PartitionCreate { p: 1 }.record(),
        ];
        out.extend(steps.iter().map(Step::record));
        out
    })
}
pub mod card;

/// Opens a snapshot (every check, MAC included) and the state served from it.
pub fn open_state(
    path: &std::path::Path,
    card: &keyfort_hsm::CoreSession,
) -> (
    std::sync::Arc<keyfort_engine::snapshot::Snapshot>,
    keyfort_engine::state::StateMachine,
) {
    let snap = std::sync::Arc::new(keyfort_engine::snapshot::Snapshot::open(path, card).unwrap());
    (
        snap.clone(),
        keyfort_engine::state::StateMachine::from_snapshot(snap),
    )
}

/// Keyed xxh3 in place of the card's HMAC, for tests whose processes cannot share a card or that
/// test a codec rather than the card (the card's MAC is covered by the card-backed tests).
pub struct SoftMac;

impl keyfort_engine::snapshot::FooterMac for SoftMac {
    fn mac(&self, bytes: &[u8]) -> keyfort_hsm::Result<[u8; 32]> {
        let mut out = [0u8; 32];
        for (i, c) in out.chunks_mut(16).enumerate() {
            let h = xxhash_rust::xxh3::xxh3_128_with_seed(bytes, 0x6b66 + i as u64);
            c.copy_from_slice(&h.to_le_bytes());
        }
        Ok(out)
    }
    fn verify(&self, bytes: &[u8], mac: &[u8]) -> keyfort_hsm::Result<()> {
        if self.mac(bytes)?.as_slice() == mac {
            Ok(())
        } else {
            Err(keyfort_hsm::CardError::BadMac {
                what: "soft mac",
                context: "soft mac".into(),
            })
        }
    }
}
