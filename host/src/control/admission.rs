//! What an API request costs before it reaches the database: a rate per
//! client address, checked before anything else; token lookups
//! remembered for a few seconds — the unknown ones too, so that a flood of
//! bad tokens costs one query per distinct token, not one per request; and
//! upload slots, in total and per client address, so that no client holds
//! every upload (and the memory its body takes).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ratelimit::TokenBucket;

/// Entries kept (per client, per token hash) before all are forgotten at
/// once: a bound on memory, not a policy.
const MAX_ENTRIES: usize = 10_000;

/// How long a token lookup is believed: a token made meanwhile is refused
/// for at most this long after a failed try, a role change takes this long.
pub const LOOKUP_TTL: Duration = Duration::from_secs(10);

/// A token bucket per client address.
#[derive(Debug)]
pub struct ClientLimiter {
    rate: f64,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl ClientLimiter {
    /// `rate` requests per second per address, with bursts of twice that.
    pub fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `client`'s bucket; `Err` with how long to wait.
    /// An IPv6 client is its /64, which one host usually holds whole.
    pub fn admit(&self, client: IpAddr, now: Instant) -> Result<(), Duration> {
        let client = client_key(client);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_ENTRIES && !buckets.contains_key(&client) {
            // Forget only the clients that have been quiet long enough to
            // be full again: clearing all would hand a flood of new
            // addresses a fresh burst for every busy client too.
            buckets.retain(|_, bucket| !bucket.is_full(now));
            if buckets.len() >= MAX_ENTRIES {
                return Err(Duration::from_secs(1));
            }
        }
        let rate = self.rate;
        let bucket = buckets
            .entry(client)
            .or_insert_with(|| TokenBucket::new(rate, rate * 2.0, now));
        if bucket.take(now) {
            Ok(())
        } else {
            Err(bucket.wait())
        }
    }
}

/// A client as the limits count it: an IPv6 client is its /64, which one
/// host usually holds whole.
fn client_key(client: IpAddr) -> IpAddr {
    // An IPv4 client of a listener on `[::]` arrives as `::ffff:a.b.c.d`:
    // it is its IPv4 address, not one of the clients of `::ffff:0:0/64`.
    match client.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// Uploads being read or compiled: at most `total` at once, and at most
/// `per_client` of them from one client.
#[derive(Debug)]
pub struct UploadSlots {
    total: usize,
    per_client: usize,
    /// Uploads in flight per client; the sum is the total in flight.
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Which limit refused an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadsBusy {
    Host,
    Client,
}

/// One upload's slot, given back when dropped.
#[derive(Debug)]
pub struct UploadSlot {
    client: IpAddr,
    in_flight: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl UploadSlots {
    pub fn new(total: usize, per_client: usize) -> Self {
        Self {
            total: total.max(1),
            per_client: per_client.max(1),
            in_flight: Arc::default(),
        }
    }

    /// A slot for an upload from `client`, if both limits allow one.
    pub fn try_take(&self, client: IpAddr) -> Result<UploadSlot, UploadsBusy> {
        let client = client_key(client);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if in_flight.values().sum::<usize>() >= self.total {
            return Err(UploadsBusy::Host);
        }
        let mine = in_flight.entry(client).or_insert(0);
        if *mine >= self.per_client {
            return Err(UploadsBusy::Client);
        }
        *mine += 1;
        Ok(UploadSlot {
            client,
            in_flight: self.in_flight.clone(),
        })
    }
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = in_flight.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                in_flight.remove(&self.client);
            }
        }
    }
}

/// Lookups by token hash, each with until when it is believed; and how
/// many times something was forgotten.
type Lookups<T> = (HashMap<String, (Instant, Option<T>)>, u64);

/// Token lookups by token hash, each believed for at most [`LOOKUP_TTL`].
#[derive(Debug)]
pub struct LookupCache<T> {
    /// What was found, and until when it is believed; and how many times
    /// something was forgotten, so that a lookup that was in flight then
    /// (and may have read a token just revoked) is not remembered.
    entries: Mutex<Lookups<T>>,
}

impl<T: Clone> Default for LookupCache<T> {
    fn default() -> Self {
        Self {
            entries: Mutex::new((HashMap::new(), 0)),
        }
    }
}

impl<T: Clone> LookupCache<T> {
    fn locked(&self) -> std::sync::MutexGuard<'_, Lookups<T>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What was found for `hash` (`Some(None)`: known not to exist), if it
    /// is still believed at `now`.
    pub fn get(&self, hash: &str, now: Instant) -> Option<Option<T>> {
        let entries = self.locked();
        let (until, found) = entries.0.get(hash)?;
        (now < *until).then(|| found.clone())
    }

    /// Take this before a lookup and hand it to [`LookupCache::put`].
    pub fn generation(&self) -> u64 {
        self.locked().1
    }

    /// Forgets `hash` (its token was revoked).
    pub fn forget(&self, hash: &str) {
        let mut entries = self.locked();
        entries.0.remove(hash);
        entries.1 += 1;
    }

    /// Forgets every lookup.
    pub fn clear(&self) {
        let mut entries = self.locked();
        entries.0.clear();
        entries.1 += 1;
    }

    /// Remembers what a lookup of `hash` found at `now`, to be believed for
    /// `believe` (at most [`LOOKUP_TTL`]; less for a token about to expire),
    /// unless something was forgotten since the lookup began
    /// (`generation`, from [`LookupCache::generation`]).
    pub fn put(
        &self,
        hash: &str,
        found: Option<T>,
        now: Instant,
        believe: Duration,
        generation: u64,
    ) {
        let mut entries = self.locked();
        if entries.1 != generation {
            return;
        }
        let entries = &mut entries.0;
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(hash) {
            entries.retain(|_, (until, _)| now < *until);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(hash.to_string(), (now + believe.min(LOOKUP_TTL), found));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_are_believed_for_their_ttl_unknown_tokens_too() {
        let cache = LookupCache::<u32>::default();
        let start = Instant::now();
        assert_eq!(cache.get("a", start), None);
        let generation = cache.generation();
        cache.put("a", Some(7), start, LOOKUP_TTL, generation);
        cache.put("bad", None, start, LOOKUP_TTL, generation);
        cache.put(
            "soon",
            Some(1),
            start,
            Duration::from_millis(10),
            generation,
        );
        assert_eq!(
            cache.get("soon", start + Duration::from_secs(1)),
            None,
            "its token expired"
        );
        assert_eq!(
            cache.get("a", start + Duration::from_secs(1)),
            Some(Some(7))
        );
        assert_eq!(cache.get("bad", start + Duration::from_secs(1)), Some(None));
        assert_eq!(cache.get("a", start + LOOKUP_TTL), None, "expired");
        for i in 0..MAX_ENTRIES + 5 {
            cache.put(&format!("t{i}"), None, start, LOOKUP_TTL, generation);
        }
        assert!(cache.locked().0.len() <= MAX_ENTRIES);
    }

    #[test]
    fn a_lookup_in_flight_while_a_token_is_forgotten_is_not_remembered() {
        let cache = LookupCache::<u32>::default();
        let start = Instant::now();
        // A lookup begins, reads the token as valid; meanwhile it is revoked
        // and forgotten; the lookup's answer is then not believed.
        let generation = cache.generation();
        cache.forget("a");
        cache.put("a", Some(7), start, LOOKUP_TTL, generation);
        assert_eq!(cache.get("a", start), None);
        let generation = cache.generation();
        cache.put("a", Some(7), start, LOOKUP_TTL, generation);
        assert_eq!(cache.get("a", start), Some(Some(7)));
    }

    #[test]
    fn each_client_has_its_own_rate() {
        let limiter = ClientLimiter::new(2);
        let now = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ([127, 0, 0, 1].into(), [10, 0, 0, 1].into());
        for _ in 0..4 {
            assert!(limiter.admit(a, now).is_ok(), "a burst of twice the rate");
        }
        assert!(limiter.admit(a, now).is_err());
        assert!(limiter.admit(b, now).is_ok(), "another client is not held");
        assert!(limiter.admit(a, now + Duration::from_secs(1)).is_ok());
        // One /64 is one client.
        let (v6a, v6b): (IpAddr, IpAddr) = (
            "2001:db8::1".parse().expect("v6"),
            "2001:db8::ffff:1".parse().expect("v6"),
        );
        for _ in 0..4 {
            assert!(limiter.admit(v6a, now).is_ok());
        }
        assert!(limiter.admit(v6b, now).is_err(), "same /64");
    }

    #[test]
    fn a_flood_of_new_addresses_does_not_reset_busy_ones() {
        let limiter = ClientLimiter::new(1);
        let now = Instant::now();
        let busy: IpAddr = [10, 9, 9, 9].into();
        while limiter.admit(busy, now).is_ok() {}
        for i in 0..(MAX_ENTRIES as u32 + 10) {
            let _ = limiter.admit(IpAddr::from(i.to_be_bytes()), now);
        }
        assert!(limiter.admit(busy, now).is_err(), "still out of tokens");
    }

    #[test]
    fn uploads_are_limited_in_total_and_per_client() {
        let slots = UploadSlots::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().expect("address");
        let b: IpAddr = "10.0.0.2".parse().expect("address");
        let a1 = slots.try_take(a).expect("first of a");
        let a2 = slots.try_take(a).expect("second of a");
        assert_eq!(slots.try_take(a).err(), Some(UploadsBusy::Client));
        let b1 = slots.try_take(b).expect("b has its own share");
        assert_eq!(slots.try_take(b).err(), Some(UploadsBusy::Host));
        drop(a1);
        let b2 = slots.try_take(b).expect("a slot came back");
        drop((a2, b1, b2));
        // Every slot came back, and no client is remembered.
        assert!(slots.in_flight.lock().expect("lock").is_empty());
        let mapped: IpAddr = "::ffff:10.0.0.3".parse().expect("address");
        let other_mapped: IpAddr = "::ffff:10.0.0.4".parse().expect("address");
        let _three = slots.try_take(mapped).expect("a mapped IPv4 client");
        let _four = slots
            .try_take(other_mapped)
            .expect("another IPv4 client, not the same /64");
        drop((_three, _four));
        let v6: IpAddr = "2001:db8::1".parse().expect("address");
        let same_64: IpAddr = "2001:db8::ffff".parse().expect("address");
        let _one = slots.try_take(v6).expect("first");
        let _two = slots.try_take(same_64).expect("second");
        assert_eq!(
            slots.try_take(v6).err(),
            Some(UploadsBusy::Client),
            "one /64 is one client"
        );
    }
}
