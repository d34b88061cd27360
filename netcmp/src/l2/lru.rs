//! A map that knows which entry was used least recently, so that a bounded table can evict it
//! in O(log n).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

#[derive(Debug)]
struct Slot<V> {
    tick: u64,
    value: V,
}

/// A hash map with a recency order: [`Lru::touch`] makes an entry the most recent,
/// [`Lru::pop_oldest`] removes the least recent.
#[derive(Debug)]
pub(crate) struct Lru<K, V> {
    map: HashMap<K, Slot<V>>,
    order: BTreeMap<u64, K>,
    tick: u64,
}

impl<K: Hash + Eq + Copy, V> Lru<K, V> {
    pub(crate) fn new() -> Self {
        Lru {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|s| &s.value)
    }

    /// The entry, without changing its recency.
    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.map.get_mut(k).map(|s| &mut s.value)
    }

    /// Make `k` the most recent entry (if present).
    pub(crate) fn touch(&mut self, k: &K) {
        if let Some(slot) = self.map.get_mut(k) {
            self.order.remove(&slot.tick);
            self.tick += 1;
            slot.tick = self.tick;
            self.order.insert(self.tick, *k);
        }
    }

    /// Insert (or replace) `k` as the most recent entry; returns the value it replaced.
    pub(crate) fn insert(&mut self, k: K, value: V) -> Option<V> {
        let old = self.remove(&k);
        self.tick += 1;
        self.order.insert(self.tick, k);
        self.map.insert(
            k,
            Slot {
                tick: self.tick,
                value,
            },
        );
        old
    }

    pub(crate) fn remove(&mut self, k: &K) -> Option<V> {
        let slot = self.map.remove(k)?;
        self.order.remove(&slot.tick);
        Some(slot.value)
    }

    /// Remove and return the least recently used entry.
    pub(crate) fn pop_oldest(&mut self) -> Option<(K, V)> {
        let (_, k) = self.order.pop_first()?;
        let slot = self.map.remove(&k).expect("order and map agree");
        Some((k, slot.value))
    }

    /// The least recently used entry.
    pub(crate) fn oldest(&self) -> Option<(&K, &V)> {
        let (_, k) = self.order.first_key_value()?;
        self.map.get(k).map(|s| (k, &s.value))
    }

    /// The keys, least recent first.
    pub(crate) fn keys(&self) -> Vec<K> {
        self.order.values().copied().collect()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(k, s)| (k, &s.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_touched() {
        let mut l = Lru::new();
        for k in 0..4 {
            l.insert(k, k * 10);
        }
        l.touch(&0);
        assert_eq!(l.insert(2, 21), Some(20));
        assert_eq!(l.pop_oldest(), Some((1, 10)));
        assert_eq!(l.keys(), vec![3, 0, 2]);
        assert_eq!(l.remove(&0), Some(0));
        assert_eq!(l.get(&2), Some(&21));
        *l.get_mut(&3).unwrap() += 1;
        assert_eq!(l.pop_oldest(), Some((3, 31)));
        assert_eq!(l.len(), 1);
        assert_eq!(l.iter().count(), 1);
        assert_eq!(l.oldest(), Some((&2, &21)));
    }
}
