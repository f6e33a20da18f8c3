//! The state a batch works on: committed entries of the batch's keys, the
//! changes of the events applied so far, and the changes of the event being
//! handled now.
//!
//! A guest sees its own writes at once; an event that fails has its writes
//! discarded ([`BatchView::finish_event`] with `applied = false`), so only the
//! changes of applied events reach the commit.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

/// The committed entries (name → value) of one key.
pub type KeyEntries = HashMap<String, Bytes>;

/// A change to one entry: `Some` sets the value, `None` deletes the entry.
pub type EntryChange = Option<Bytes>;

#[derive(Debug, Default)]
struct KeyView {
    committed: Arc<KeyEntries>,
    /// Changes of applied events of this batch.
    changes: HashMap<String, EntryChange>,
}

/// The state of every key a batch touches.
#[derive(Debug, Default)]
pub struct BatchView {
    keys: HashMap<String, KeyView>,
    current_key: String,
    /// Changes of the event being handled, not yet applied.
    event_changes: HashMap<String, EntryChange>,
}

/// What one key looks like after the batch: its changes (for the database)
/// and its full new entries (for the cache).
#[derive(Debug)]
pub struct KeyDelta {
    pub key: String,
    pub changes: Vec<(String, EntryChange)>,
    pub entries: Arc<KeyEntries>,
}

impl BatchView {
    /// A view over these committed keys.
    pub fn new(committed: HashMap<String, Arc<KeyEntries>>) -> Self {
        let keys = committed
            .into_iter()
            .map(|(key, committed)| {
                let view = KeyView {
                    committed,
                    changes: HashMap::new(),
                };
                (key, view)
            })
            .collect();
        Self {
            keys,
            current_key: String::new(),
            event_changes: HashMap::new(),
        }
    }

    /// Whether the view holds `key` (loaded, or written by this batch).
    pub fn has_key(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// Adds the keys of `loaded` this view does not hold yet: state read
    /// after the batch started (the keys of windows that fire).
    pub fn include(&mut self, loaded: BatchView) {
        for (key, view) in loaded.keys {
            self.keys.entry(key).or_insert(view);
        }
    }

    /// Scopes the following reads and writes to `key`.
    pub fn begin_event(&mut self, key: &str) {
        self.current_key.clear();
        self.current_key.push_str(key);
        self.event_changes.clear();
    }

    /// The key of the event being handled.
    pub fn current_key(&self) -> &str {
        &self.current_key
    }

    /// The current key's value of `name`, including this batch's writes.
    pub fn get(&self, name: &str) -> Option<Bytes> {
        if let Some(change) = self.event_changes.get(name) {
            return change.clone();
        }
        let view = self.keys.get(&self.current_key)?;
        match view.changes.get(name) {
            Some(change) => change.clone(),
            None => view.committed.get(name).cloned(),
        }
    }

    /// How many entries the current key holds, this event's writes
    /// included; names starting with U+0001 (a window function's host
    /// entries) do not count.
    pub fn entry_count(&self) -> usize {
        let view = self.keys.get(&self.current_key);
        let mut names: std::collections::HashSet<&str> = view
            .map(|v| v.committed.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let changes = view
            .into_iter()
            .flat_map(|v| v.changes.iter())
            .chain(self.event_changes.iter());
        for (name, change) in changes {
            match change {
                Some(_) => names.insert(name),
                None => names.remove(name.as_str()),
            };
        }
        names
            .iter()
            .filter(|name| !name.starts_with(super::HOST_ENTRY_PREFIX))
            .count()
    }

    pub fn set(&mut self, name: String, value: Bytes) {
        self.event_changes.insert(name, Some(value));
    }

    pub fn delete(&mut self, name: String) {
        self.event_changes.insert(name, None);
    }

    /// Ends the current event: its writes join the batch if it was applied,
    /// and are dropped otherwise. Returns whether it wrote anything.
    pub fn finish_event(&mut self, applied: bool) -> bool {
        let wrote = !self.event_changes.is_empty();
        if applied && wrote {
            let view = self.keys.entry(self.current_key.clone()).or_default();
            view.changes.extend(self.event_changes.drain());
        }
        self.event_changes.clear();
        applied && wrote
    }

    /// The keys whose entries changed, with their changes and new entries.
    pub fn into_deltas(self) -> Vec<KeyDelta> {
        self.keys
            .into_iter()
            .filter(|(_, view)| !view.changes.is_empty())
            .map(|(key, view)| {
                let mut entries = (*view.committed).clone();
                let mut changes: Vec<(String, EntryChange)> = view.changes.into_iter().collect();
                changes.sort_by(|a, b| a.0.cmp(&b.0));
                for (name, change) in &changes {
                    match change {
                        Some(value) => entries.insert(name.clone(), value.clone()),
                        None => entries.remove(name),
                    };
                }
                KeyDelta {
                    key,
                    changes,
                    entries: Arc::new(entries),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn committed(pairs: &[(&str, &str, &str)]) -> HashMap<String, Arc<KeyEntries>> {
        let mut keys: HashMap<String, KeyEntries> = HashMap::new();
        for (key, name, value) in pairs {
            keys.entry(key.to_string())
                .or_default()
                .insert(name.to_string(), Bytes::from(value.to_string()));
        }
        keys.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
    }

    #[test]
    fn reads_see_committed_then_batch_then_event_writes() {
        let mut view = BatchView::new(committed(&[("a", "n", "1")]));
        view.begin_event("a");
        assert_eq!(view.get("n"), Some(Bytes::from("1")));
        view.set("n".into(), Bytes::from("2"));
        assert_eq!(view.get("n"), Some(Bytes::from("2")));
        assert!(view.finish_event(true));
        view.begin_event("a");
        assert_eq!(view.get("n"), Some(Bytes::from("2")));
        view.delete("n".into());
        assert_eq!(view.get("n"), None);
        assert!(view.finish_event(true));
        let deltas = view.into_deltas();
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].changes, vec![("n".to_string(), None)]);
        assert!(deltas[0].entries.is_empty());
    }

    #[test]
    fn failed_event_writes_are_discarded() {
        let mut view = BatchView::new(committed(&[("a", "n", "1")]));
        view.begin_event("a");
        view.set("n".into(), Bytes::from("9"));
        view.set("m".into(), Bytes::from("9"));
        assert!(!view.finish_event(false));
        view.begin_event("a");
        assert_eq!(view.get("n"), Some(Bytes::from("1")));
        assert_eq!(view.get("m"), None);
        assert!(view.into_deltas().is_empty());
    }

    #[test]
    fn keys_are_isolated() {
        let mut view = BatchView::new(committed(&[("a", "n", "1")]));
        view.begin_event("b");
        assert_eq!(view.get("n"), None);
        view.set("n".into(), Bytes::from("b"));
        view.finish_event(true);
        view.begin_event("a");
        assert_eq!(view.get("n"), Some(Bytes::from("1")));
        let mut deltas = view.into_deltas();
        deltas.sort_by(|x, y| x.key.cmp(&y.key));
        assert_eq!(deltas.len(), 1);
        assert_eq!(deltas[0].key, "b");
        assert_eq!(deltas[0].entries.get("n"), Some(&Bytes::from("b")));
    }
}
