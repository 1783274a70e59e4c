//! The snapshot manager (issue 7). Being written.
