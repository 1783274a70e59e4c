//! The durable store (DESIGN.md "Durable store"): S3 or a local directory through
//! `object_store`, on one dedicated tokio thread. Being written (issue 7).
