//! Merging the panes of sliding windows in a bounded number of merges per
//! firing, whatever size / slide is. Merged naively, a window of n
//! non-empty panes costs n - 1 merges, and each pane is merged again for
//! every one of the size / slide windows it is in. Here a key's panes are
//! cut into chunks one window long, aligned to multiples of the size, so
//! that a window [s, s + size) is the tail of the chunk s falls in and the
//! head of the next. A chunk's tails (the merge of its panes from each
//! pane to its end) are built once, right to left; a chunk's head (the
//! merge of its panes from its start) grows pane by pane as later windows
//! fire. A firing then costs one merge plus the panes it is the first to
//! reach: about three merges per firing in all, instead of n - 1.
//!
//! This needs `merge` to be associative (it is always called as
//! `merge(earlier, later)`, so it need not be commutative). What is kept
//! is derived from the panes alone: the driver drops it whenever a pane
//! changes ([`PaneMerges::changed`]), and may drop all of it at any time.
//! It holds no I/O: the caller reads the panes and runs the merges.

use std::collections::BTreeMap;

/// Merged panes of the sliding windows of `size` of every key.
#[derive(Debug)]
pub struct PaneMerges<A> {
    size: i64,
    /// Most bytes of accumulators kept: what would go past it is merged
    /// but not kept.
    max_bytes: usize,
    bytes: usize,
    keys: BTreeMap<String, BTreeMap<i64, Chunk<A>>>,
}

/// What is merged of one chunk of a key's panes, [start, start + size).
#[derive(Debug)]
struct Chunk<A> {
    /// (pane, the merge of the chunk's panes from it to the chunk's end),
    /// by pane; the panes from the first window that needed them on.
    tails: Vec<(i64, A)>,
    /// The merge of the chunk's first `count` panes, all before `through`.
    head: Option<Head<A>>,
}

#[derive(Debug)]
struct Head<A> {
    through: i64,
    count: usize,
    merged: A,
}

impl<A> Default for Chunk<A> {
    fn default() -> Self {
        Self {
            tails: Vec::new(),
            head: None,
        }
    }
}

impl<A: Clone + AsRef<[u8]>> PaneMerges<A> {
    /// For sliding windows `size_ms` long, keeping at most `max_bytes` of
    /// merged accumulators.
    pub fn new(size_ms: i64, max_bytes: usize) -> Self {
        Self {
            size: size_ms.max(1),
            max_bytes,
            bytes: 0,
            keys: BTreeMap::new(),
        }
    }

    /// Bytes of accumulators kept now.
    pub fn kept_bytes(&self) -> usize {
        self.bytes
    }

    fn chunk_of(&self, pane: i64) -> i64 {
        pane.div_euclid(self.size) * self.size
    }

    /// Pane `pane` of `key` changed (an event was folded into it): drops
    /// what was merged from it.
    pub fn changed(&mut self, key: &str, pane: i64) {
        let chunk_start = self.chunk_of(pane);
        let Some(chunk) = self
            .keys
            .get_mut(key)
            .and_then(|chunks| chunks.get_mut(&chunk_start))
        else {
            return;
        };
        let mut freed = 0;
        if chunk.tails.first().is_some_and(|(first, _)| pane >= *first) {
            freed += chunk.take_tails();
        }
        if chunk.head.as_ref().is_some_and(|head| pane < head.through) {
            freed += chunk
                .head
                .take()
                .map_or(0, |head| head.merged.as_ref().len());
        }
        self.bytes -= freed;
    }

    /// Forgets the chunks of windows that ended before `ended_before` (the
    /// watermark less the allowed lateness: no such window fires again).
    pub fn forget_ended(&mut self, ended_before: i64) {
        let size = self.size;
        let mut freed = 0;
        for chunks in self.keys.values_mut() {
            // A chunk's tails serve windows that end by its start + 2 size;
            // its head, windows that end by its start + size.
            let keep = chunks.split_off(&ended_before.saturating_sub(2 * size).saturating_add(1));
            freed += chunks.values().map(Chunk::bytes).sum::<usize>();
            *chunks = keep;
        }
        self.keys.retain(|_, chunks| !chunks.is_empty());
        self.bytes -= freed;
    }

    /// The merge of the window of `key` starting at `start`, made of
    /// `panes` — (pane start, its accumulator), in order, all within
    /// [start, start + size) — with `merge(earlier, later)`. `None` when
    /// `panes` is empty. A failed merge is returned as it is, and what it
    /// was building is dropped.
    pub fn window<E>(
        &mut self,
        key: &str,
        start: i64,
        panes: &[(i64, A)],
        mut merge: impl FnMut(&A, &A) -> Result<A, E>,
    ) -> Result<Option<A>, E> {
        let next = self.chunk_of(start).saturating_add(self.size);
        let split = panes.partition_point(|(pane, _)| *pane < next);
        let (tail_panes, head_panes) = panes.split_at(split);
        let tail = self.tail(key, tail_panes, &mut merge)?;
        let head = self.head(
            key,
            next,
            start.saturating_add(self.size),
            head_panes,
            &mut merge,
        )?;
        match (tail, head) {
            (Some(tail), Some(head)) => merge(&tail, &head).map(Some),
            (tail, head) => Ok(tail.or(head)),
        }
    }

    /// The merge of `panes`, the last panes of their chunk from the
    /// window's start on.
    fn tail<E>(
        &mut self,
        key: &str,
        panes: &[(i64, A)],
        merge: &mut impl FnMut(&A, &A) -> Result<A, E>,
    ) -> Result<Option<A>, E> {
        let Some((first, _)) = panes.first() else {
            return Ok(None);
        };
        let chunk_start = self.chunk_of(*first);
        let chunk = chunk_mut(&mut self.keys, key, chunk_start);
        // Kept tails serve if these panes are their last ones (a pane
        // added or changed since dropped them).
        let at = chunk.tails.partition_point(|(pane, _)| pane < first);
        if chunk.tails.len() - at == panes.len()
            && chunk.tails.get(at).is_some_and(|(pane, _)| pane == first)
        {
            return Ok(Some(chunk.tails[at].1.clone()));
        }
        self.bytes -= chunk.take_tails();
        // Tails of accumulators that grow with their contents add up to
        // far more than the panes: past the budget they are merged one
        // after the other as before, and not kept.
        let mut tails: Option<Vec<(i64, A)>> = Some(Vec::with_capacity(panes.len()));
        let mut kept_bytes = 0;
        let mut later: Option<A> = None;
        for (pane, accumulator) in panes.iter().rev() {
            let merged = match &later {
                None => accumulator.clone(),
                Some(later) => merge(accumulator, later)?,
            };
            kept_bytes += merged.as_ref().len();
            if self.bytes + kept_bytes > self.max_bytes {
                tails = None;
            }
            if let Some(tails) = tails.as_mut() {
                tails.push((*pane, merged.clone()));
            }
            later = Some(merged);
        }
        if let Some(mut tails) = tails {
            tails.reverse();
            self.bytes += kept_bytes;
            chunk.tails = tails;
        }
        Ok(later)
    }

    /// The merge of `panes`, the first panes of the chunk at `chunk_start`
    /// up to `through`.
    fn head<E>(
        &mut self,
        key: &str,
        chunk_start: i64,
        through: i64,
        panes: &[(i64, A)],
        merge: &mut impl FnMut(&A, &A) -> Result<A, E>,
    ) -> Result<Option<A>, E> {
        if panes.is_empty() {
            return Ok(None);
        }
        let chunk = chunk_mut(&mut self.keys, key, chunk_start);
        // A kept head serves if it ends before `through` and holds the
        // panes before its end.
        let kept = chunk.head.take().and_then(|head| {
            self.bytes -= head.merged.as_ref().len();
            let serves = head.through <= through
                && panes.partition_point(|(pane, _)| *pane < head.through) == head.count;
            serves.then_some(head)
        });
        let (mut count, mut merged) = match kept {
            Some(head) => (head.count, Some(head.merged)),
            None => (0, None),
        };
        for (_, accumulator) in &panes[count..] {
            merged = Some(match merged {
                None => accumulator.clone(),
                Some(earlier) => merge(&earlier, accumulator)?,
            });
            count += 1;
        }
        if let Some(merged) = &merged
            && self.bytes + merged.as_ref().len() <= self.max_bytes
        {
            self.bytes += merged.as_ref().len();
            chunk.head = Some(Head {
                through,
                count,
                merged: merged.clone(),
            });
        }
        Ok(merged)
    }
}

/// The chunk of `key` starting at `start`, made if need be. (A function
/// of the map alone, so the caller can still count bytes while holding it.)
fn chunk_mut<'a, A>(
    keys: &'a mut BTreeMap<String, BTreeMap<i64, Chunk<A>>>,
    key: &str,
    start: i64,
) -> &'a mut Chunk<A> {
    keys.entry(key.to_string())
        .or_default()
        .entry(start)
        .or_default()
}

impl<A: AsRef<[u8]>> Chunk<A> {
    fn tails_bytes(&self) -> usize {
        self.tails.iter().map(|(_, a)| a.as_ref().len()).sum()
    }

    /// Drops the tails; the bytes they took.
    fn take_tails(&mut self) -> usize {
        let bytes = self.tails_bytes();
        self.tails.clear();
        bytes
    }

    fn bytes(&self) -> usize {
        self.tails_bytes()
            + self
                .head
                .as_ref()
                .map_or(0, |head| head.merged.as_ref().len())
    }
}
