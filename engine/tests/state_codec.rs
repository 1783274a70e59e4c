//! Payload and entry codecs of the state machine: round trips, one encoding per operation, and
//! arbitrary bytes into every decoder give a typed error, never a panic.

mod state_common;

use keyfort_engine::state::{
    IdempotencyEntry, IdempotencyId, KeyEntry, KeyState, Op, Outcome, OutcomeCode, PayloadError,
    PutOp,
};
use keyfort_engine::wbl::RecordKind;
use keyfort_hsm::{KeyHeader, KeyId, PartitionId};
use proptest::prelude::*;
use state_common::*;

const STATE_KINDS: [RecordKind; 6] = [
    RecordKind::ClusterConfig,
    RecordKind::PartitionCreate,
    RecordKind::PartitionDelete,
    RecordKind::KeyPut,
    RecordKind::KeyDelete,
    RecordKind::Checkpoint,
];

proptest! {
    #[test]
    fn every_generated_op_round_trips(s in step()) {
        if let Some(op) = s.op() {
            let bytes = op.encode();
            prop_assert_eq!(Op::decode(op.kind(), &bytes).unwrap(), op.clone());
            // Trailing bytes are refused: one encoding per operation.
            let mut longer = bytes.clone();
            longer.push(0);
            let trailing = matches!(Op::decode(op.kind(), &longer), Err(PayloadError::Trailing { .. }));
            prop_assert!(trailing);
        }
    }

    #[test]
    fn arbitrary_bytes_into_every_payload_decoder_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        for kind in RecordKind::ALL {
            let _ = Op::decode(kind, &bytes);
        }
        let _ = KeyEntry::decode(&bytes);
        let _ = IdempotencyEntry::decode(&bytes);
    }

    #[test]
    fn mutated_valid_payloads_decode_or_fail_typed(s in step(), at: usize, x: u8) {
        if let Some(op) = s.op() {
            let mut bytes = op.encode();
            let i = at % bytes.len();
            bytes[i] ^= x | 1;
            for kind in STATE_KINDS {
                let _ = Op::decode(kind, &bytes);
            }
            let _ = Op::decode(op.kind(), &bytes[..i]);
        }
    }

    #[test]
    fn key_entry_round_trips(meta in proptest::collection::vec(any::<u8>(), 0..1024),
                             blob in proptest::collection::vec(any::<u8>(), 1..512), lsn: u64, v: u32) {
        let e = KeyEntry {
            header: KeyHeader::aes(PartitionId([3; 16]), KeyId([4; 16]), v),
            state: KeyState::Disabled,
            lsn_created: lsn,
            metadata: meta,
            blob,
        };
        prop_assert_eq!(KeyEntry::decode(&e.encode()).unwrap(), e);
    }
}

#[test]
fn raft_kinds_carry_no_state_payload() {
    for kind in [
        RecordKind::RaftNoop,
        RecordKind::RaftNormal,
        RecordKind::RaftConfChange,
    ] {
        assert!(matches!(
            Op::decode(kind, &[1]),
            Err(PayloadError::NotStateKind { .. })
        ));
    }
}

#[test]
fn update_with_key_material_is_refused_by_the_decoder() {
    let mut op = put(PutOp::Update, IdempotencyId::NONE, 0, 0, 1, 0, b"m");
    if let Op::KeyPut(p) = &mut op {
        p.blob = vec![1; 117];
    }
    let bytes = op.encode();
    assert!(matches!(
        Op::decode(RecordKind::KeyPut, &bytes),
        Err(PayloadError::BadValue {
            field: "blob length",
            ..
        })
    ));
}

#[test]
fn oversized_metadata_is_refused() {
    let mut bytes = put(PutOp::Create, IdempotencyId::NONE, 0, 0, 1, 0, b"").encode();
    // metadata length field: after version, op, id (16), header (39), replaced (4), state (1).
    let at = 1 + 1 + 16 + 39 + 4 + 1;
    bytes[at..at + 2].copy_from_slice(&2000u16.to_le_bytes());
    assert!(matches!(
        Op::decode(RecordKind::KeyPut, &bytes),
        Err(PayloadError::TooLong {
            field: "metadata",
            ..
        })
    ));
}

#[test]
fn idempotency_entry_round_trips() {
    let e = IdempotencyEntry {
        partition: PartitionId([1; 16]),
        id: IdempotencyId([2; 16]),
        fingerprint: 0xdead_beef,
        first: Outcome {
            code: OutcomeCode::StaleVersion,
            version: 7,
        },
        lsn: 99,
    };
    assert_eq!(IdempotencyEntry::decode(&e.encode()).unwrap(), e);
}
