//! The membership (raft `ConfState`) as of an LSN, rebuilt outside a running `RawNode`: from a
//! snapshot's voters and learners plus the conf-change records replayed after it. raft-rs's
//! own changer and tracker do the work, so the result is exactly what the node computes.

use raft::eraftpb::{ConfChange, ConfChangeType, ConfChangeV2, ConfState};
use raft::{Changer, ProgressTracker};
use raft_proto::new_conf_change_single;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfError {
    #[error("conf change at lsn {lsn} does not decode: {reason}")]
    Decode { lsn: u64, reason: String },
    #[error("conf change at lsn {lsn} is invalid for the current membership: {reason}")]
    Invalid { lsn: u64, reason: String },
}

/// Decodes a `RaftConfChange` or `RaftConfChangeV2` payload as a v2 change.
pub fn decode_conf_change(v2: bool, lsn: u64, payload: &[u8]) -> Result<ConfChangeV2, ConfError> {
    use protobuf::Message;
    use raft_proto::ConfChangeI;
    let err = |e: protobuf::ProtobufError| ConfError::Decode {
        lsn,
        reason: e.to_string(),
    };
    if v2 {
        ConfChangeV2::parse_from_bytes(payload).map_err(err)
    } else {
        Ok(ConfChange::parse_from_bytes(payload)
            .map_err(err)?
            .into_v2())
    }
}

/// Membership tracker fed conf changes in log order.
pub struct ConfTracker {
    prs: ProgressTracker,
}

impl ConfTracker {
    pub fn new(cs: &ConfState, last_index: u64) -> Result<ConfTracker, ConfError> {
        // What raft-rs's (private) `confchange::restore` does for a configuration that is not
        // joint: one simple change per member. Snapshots are never taken in a joint
        // configuration (their footer has no outgoing voters).
        let mut t = ConfTracker {
            prs: ProgressTracker::new(crate::raft::MAX_INFLIGHT_MSGS),
        };
        let adds = cs
            .voters
            .iter()
            .map(|&v| new_conf_change_single(v, ConfChangeType::AddNode))
            .chain(
                cs.learners
                    .iter()
                    .map(|&l| new_conf_change_single(l, ConfChangeType::AddLearnerNode)),
            );
        for single in adds {
            let cc = ConfChangeV2 {
                changes: vec![single].into(),
                ..Default::default()
            };
            t.apply(last_index, &cc)?;
        }
        Ok(t)
    }

    /// Applies the change at `lsn` the way `RawNode::apply_conf_change` does.
    pub fn apply(&mut self, lsn: u64, cc: &ConfChangeV2) -> Result<ConfState, ConfError> {
        let invalid = |e: raft::Error| ConfError::Invalid {
            lsn,
            reason: e.to_string(),
        };
        let mut changer = Changer::new(&self.prs);
        let (cfg, changes) = if cc.leave_joint() {
            changer.leave_joint().map_err(invalid)?
        } else if let Some(auto_leave) = cc.enter_joint() {
            changer
                .enter_joint(auto_leave, &cc.changes)
                .map_err(invalid)?
        } else {
            changer.simple(&cc.changes).map_err(invalid)?
        };
        self.prs.apply_conf(cfg, changes, lsn);
        Ok(self.conf_state())
    }

    pub fn conf_state(&self) -> ConfState {
        self.prs.conf().to_conf_state()
    }
}

/// The membership at the persisted commit after local recovery: the snapshot footer's (or
/// `bootstrap`, the one `cluster init` gave, for a log that starts at 1) with the replayed
/// changes applied.
pub fn membership_at_commit(
    local: &crate::recovery::LocalRecovery,
    bootstrap: &ConfState,
) -> Result<ConfState, ConfError> {
    let cs = match local.snapshot {
        Some(_) => ConfState {
            voters: local.voters.clone(),
            learners: local.learners.clone(),
            ..Default::default()
        },
        None => bootstrap.clone(),
    };
    let mut t = ConfTracker::new(&cs, local.lsn_snapshot)?;
    for (lsn, kind, payload) in &local.conf_changes {
        let v2 = *kind == crate::wbl::RecordKind::RaftConfChangeV2;
        t.apply(*lsn, &decode_conf_change(v2, *lsn, payload)?)?;
    }
    Ok(t.conf_state())
}
