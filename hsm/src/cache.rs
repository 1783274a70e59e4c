//! Bounded LRU of unwrapped customer key handles, one per core. The owner destroys every handle
//! this returns (eviction, delete, rotation), so the card's object count stays bounded.

use crate::format::{KeyRef, PartitionId};
use cryptoki::object::ObjectHandle;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
pub struct HandleCache {
    max: usize,
    tick: u64,
    by_key: HashMap<KeyRef, (ObjectHandle, u64)>,
    by_age: BTreeMap<u64, KeyRef>,
    pub hits: u64,
    pub misses: u64,
}

impl HandleCache {
    pub fn new(max: usize) -> Self {
        assert!(max > 0, "a handle cache needs room for one key");
        HandleCache {
            max,
            tick: 0,
            by_key: HashMap::with_capacity(max),
            by_age: BTreeMap::new(),
            hits: 0,
            misses: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub fn get(&mut self, key: &KeyRef) -> Option<ObjectHandle> {
        self.tick += 1;
        let tick = self.tick;
        match self.by_key.get_mut(key) {
            Some((h, age)) => {
                self.by_age.remove(age);
                *age = tick;
                self.by_age.insert(tick, *key);
                self.hits += 1;
                Some(*h)
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Inserts; returns the handle evicted to make room (or replaced), to be destroyed.
    #[must_use]
    pub fn insert(&mut self, key: KeyRef, h: ObjectHandle) -> Option<ObjectHandle> {
        let mut out = self.remove(&key);
        if out.is_none() && self.by_key.len() >= self.max {
            let (_, oldest) = self.by_age.pop_first().expect("cache is full");
            out = self.by_key.remove(&oldest).map(|(h, _)| h);
        }
        self.tick += 1;
        self.by_key.insert(key, (h, self.tick));
        self.by_age.insert(self.tick, key);
        debug_assert!(self.by_key.len() <= self.max && self.by_age.len() == self.by_key.len());
        out
    }

    #[must_use]
    pub fn remove(&mut self, key: &KeyRef) -> Option<ObjectHandle> {
        let (h, age) = self.by_key.remove(key)?;
        self.by_age.remove(&age);
        Some(h)
    }

    /// Removes every version of every key of a partition.
    #[must_use]
    pub fn remove_partition(&mut self, p: &PartitionId) -> Vec<ObjectHandle> {
        let keys: Vec<KeyRef> = self
            .by_key
            .keys()
            .filter(|k| &k.partition == p)
            .copied()
            .collect();
        keys.iter().filter_map(|k| self.remove(k)).collect()
    }

    #[must_use]
    pub fn drain(&mut self) -> Vec<ObjectHandle> {
        self.by_age.clear();
        self.by_key.drain().map(|(_, (h, _))| h).collect()
    }
}
