//! Backup manifests (issue 7). Being written.
