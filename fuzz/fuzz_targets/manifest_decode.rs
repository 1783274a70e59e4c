//! Arbitrary bytes into the backup manifest decoder (docs/format.md §9.2): a manifest or a typed
//! error, never a panic; what decodes names only object names that stay inside the backup root.
#![no_main]

use keyfort_engine::manifest::{valid_object_name, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((m, _mac)) = Manifest::decode_unverified(data) {
        assert!(m.shards.iter().all(|s| valid_object_name(&s.object)));
        assert!(m.archives.iter().all(|a| valid_object_name(&a.object)));
        assert_eq!(m.shards.len() as u32, m.cluster().unwrap().shard_count);
    }
});
