//! The circuit breaker around one function version, with resilience4j's
//! semantics: closed / open / half-open; failure-rate and slow-call-rate
//! thresholds over a count- or time-based sliding window, judged once the
//! window holds a minimum number of calls; a wait in open; a fixed number of
//! probe calls in half-open. Time comes from a [`Clock`], so tests drive the
//! state machine exactly.
//!
//! The breaker only decides. The dispatcher asks it before every invocation
//! and tells it how each one went; while it is open, the dispatcher stops
//! fetching and hands back the events it holds without spending their retry
//! budget.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where the breaker reads the time.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug)]
pub struct ManualClock(Mutex<Instant>);

impl Default for ManualClock {
    fn default() -> Self {
        Self(Mutex::new(Instant::now()))
    }
}

impl ManualClock {
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How the sliding window is measured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// The last `window_size` calls.
    Count,
    /// The calls of the last `window_size` seconds.
    Time,
}

/// Breaker settings of a function (resilience4j's names, in snake case).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    pub enabled: bool,
    pub window_kind: WindowKind,
    /// Calls (count window) or seconds (time window).
    pub window_size: u32,
    /// Calls the window must hold before its rates are judged.
    pub minimum_calls: u32,
    /// Percentage of failed calls that opens the breaker.
    pub failure_rate_threshold: f64,
    /// Percentage of slow calls that opens the breaker.
    pub slow_call_rate_threshold: f64,
    /// A call longer than this is slow.
    pub slow_call_duration_ms: u64,
    /// How long the breaker stays open before it lets probes through.
    pub wait_in_open_ms: u64,
    /// Probe calls in half-open; their rates decide open or closed.
    pub half_open_calls: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window_kind: WindowKind::Count,
            window_size: 100,
            minimum_calls: 20,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 100.0,
            slow_call_duration_ms: 1_000,
            wait_in_open_ms: 10_000,
            half_open_calls: 10,
        }
    }
}

impl BreakerConfig {
    /// What is wrong with these settings, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        // 0 % would open a healthy function as soon as the window filled.
        let percent = |p: f64| p > 0.0 && p <= 100.0;
        if self.window_size == 0 || self.window_size > 100_000 {
            return Some("breaker.window_size must be between 1 and 100000");
        }
        if self.minimum_calls == 0 {
            return Some("breaker.minimum_calls must be at least 1");
        }
        if !percent(self.failure_rate_threshold) || !percent(self.slow_call_rate_threshold) {
            return Some("breaker thresholds are percentages above 0 and at most 100");
        }
        if self.half_open_calls == 0 {
            return Some("breaker.half_open_calls must be at least 1");
        }
        None
    }
}

/// The three states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }

    /// The `weir_breaker_state` gauge value.
    pub fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::Open => 1.0,
            Self::HalfOpen => 2.0,
        }
    }
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Granted,
    /// Not now; ask again after this long.
    Refused {
        retry_after: Duration,
    },
}

/// How one call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallResult {
    pub failed: bool,
    pub duration: Duration,
}

/// A change of state, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
    /// The rates that caused it, in percent.
    pub failure_rate: f64,
    pub slow_call_rate: f64,
}

/// What the breaker looks like now, for the function's status.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub calls: u32,
    pub failure_rate: f64,
    pub slow_call_rate: f64,
}

/// Calls grouped in a slot of the window: one call each in a count
/// window, one second in a time window.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: Instant,
    calls: u32,
    failed: u32,
    slow: u32,
}

/// The calls a breaker judges, with running totals, so recording a call
/// costs the same whatever the window's size.
#[derive(Debug, Default)]
struct Window {
    buckets: VecDeque<Bucket>,
    calls: u32,
    failed: u32,
    slow: u32,
}

impl Window {
    /// Adds a call; in a time window it joins the bucket of its second.
    fn push(&mut self, kind: WindowKind, at: Instant, failed: bool, slow: bool) {
        let joins_last = kind == WindowKind::Time
            && self
                .buckets
                .back()
                .is_some_and(|b| at.saturating_duration_since(b.start) < Duration::from_secs(1));
        if !joins_last {
            self.buckets.push_back(Bucket {
                start: at,
                calls: 0,
                failed: 0,
                slow: 0,
            });
        }
        if let Some(bucket) = self.buckets.back_mut() {
            bucket.calls += 1;
            bucket.failed += u32::from(failed);
            bucket.slow += u32::from(slow);
        }
        self.calls += 1;
        self.failed += u32::from(failed);
        self.slow += u32::from(slow);
    }

    /// Drops the buckets `stale` says are out of the window.
    fn trim(&mut self, mut stale: impl FnMut(&Bucket, u32) -> bool) {
        while let Some(front) = self.buckets.front() {
            if !stale(front, self.calls) {
                break;
            }
            self.calls -= front.calls;
            self.failed -= front.failed;
            self.slow -= front.slow;
            self.buckets.pop_front();
        }
    }

    /// Failure and slow-call rates, in percent.
    fn rates(&self) -> (f64, f64) {
        if self.calls == 0 {
            return (0.0, 0.0);
        }
        let total = f64::from(self.calls);
        (
            f64::from(self.failed) * 100.0 / total,
            f64::from(self.slow) * 100.0 / total,
        )
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// One breaker.
pub struct Breaker {
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    state: BreakerState,
    /// Closed: the sliding window. Half-open: the probes' results.
    window: Window,
    opened_at: Instant,
    /// Half-open probes handed out and not yet recorded.
    probes_out: u32,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("state", &self.state)
            .field("calls", &self.window.calls)
            .finish_non_exhaustive()
    }
}

impl Breaker {
    pub fn new(config: BreakerConfig, clock: Arc<dyn Clock>) -> Self {
        let opened_at = clock.now();
        Self {
            config,
            clock,
            state: BreakerState::Closed,
            window: Window::default(),
            opened_at,
            probes_out: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// While open: how long until probes may go through.
    pub fn open_for(&self) -> Option<Duration> {
        if !self.config.enabled || self.state != BreakerState::Open {
            return None;
        }
        let waited = self.clock.now().saturating_duration_since(self.opened_at);
        Duration::from_millis(self.config.wait_in_open_ms)
            .checked_sub(waited)
            .filter(|left| !left.is_zero())
    }

    /// The most calls worth fetching events for now: unbounded when
    /// closed, the probes when testing the function again.
    pub fn call_budget(&self) -> usize {
        match self.state {
            BreakerState::Closed => usize::MAX,
            _ if !self.config.enabled => usize::MAX,
            _ => self.config.half_open_calls as usize,
        }
    }

    /// Gives back a granted call whose result says nothing about the
    /// function (the event was rejected): in half-open, its probe slot is
    /// free again.
    pub fn release(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probes_out = self.probes_out.saturating_sub(1);
        }
    }

    /// Asks for one call. In open, the wait elapsing moves the breaker to
    /// half-open (returned as the transition) and grants the first probe.
    pub fn try_acquire(&mut self) -> (Permit, Option<Transition>) {
        if !self.config.enabled {
            return (Permit::Granted, None);
        }
        let mut transition = None;
        if self.state == BreakerState::Open {
            let waited = self.clock.now().saturating_duration_since(self.opened_at);
            let wait = Duration::from_millis(self.config.wait_in_open_ms);
            if waited < wait {
                return (
                    Permit::Refused {
                        retry_after: wait - waited,
                    },
                    None,
                );
            }
            transition = Some(self.move_to(BreakerState::HalfOpen, 0.0, 0.0));
        }
        if self.state == BreakerState::HalfOpen {
            let taken = self.probes_out + self.window.calls;
            if taken >= self.config.half_open_calls {
                // Every probe is out; the verdict comes with their results.
                return (
                    Permit::Refused {
                        retry_after: Duration::from_millis(100),
                    },
                    transition,
                );
            }
            self.probes_out += 1;
        }
        (Permit::Granted, transition)
    }

    /// Records a granted call's result; returns the transition it caused.
    pub fn record(&mut self, result: CallResult) -> Option<Transition> {
        if !self.config.enabled {
            return None;
        }
        let now = self.clock.now();
        let slow = result.duration > Duration::from_millis(self.config.slow_call_duration_ms);
        match self.state {
            // A call granted before the breaker opened, finishing late.
            BreakerState::Open => None,
            BreakerState::Closed => {
                let kind = self.config.window_kind;
                self.window.push(kind, now, result.failed, slow);
                self.trim(now);
                let minimum = match self.config.window_kind {
                    // A count window can never hold more than its size.
                    WindowKind::Count => self.config.minimum_calls.min(self.config.window_size),
                    WindowKind::Time => self.config.minimum_calls,
                };
                if self.window.calls < minimum {
                    return None;
                }
                let (failure_rate, slow_call_rate) = self.window.rates();
                self.exceeded(failure_rate, slow_call_rate)
                    .then(|| self.move_to(BreakerState::Open, failure_rate, slow_call_rate))
            }
            BreakerState::HalfOpen => {
                self.probes_out = self.probes_out.saturating_sub(1);
                self.window
                    .push(WindowKind::Count, now, result.failed, slow);
                if self.window.calls < self.config.half_open_calls {
                    return None;
                }
                let (failure_rate, slow_call_rate) = self.window.rates();
                let to = if self.exceeded(failure_rate, slow_call_rate) {
                    BreakerState::Open
                } else {
                    BreakerState::Closed
                };
                Some(self.move_to(to, failure_rate, slow_call_rate))
            }
        }
    }

    pub fn snapshot(&self) -> BreakerSnapshot {
        let (failure_rate, slow_call_rate) = self.window.rates();
        BreakerSnapshot {
            state: self.state,
            calls: self.window.calls,
            failure_rate,
            slow_call_rate,
        }
    }

    fn exceeded(&self, failure_rate: f64, slow_call_rate: f64) -> bool {
        failure_rate >= self.config.failure_rate_threshold
            || slow_call_rate >= self.config.slow_call_rate_threshold
    }

    /// Drops calls that fell out of the window.
    fn trim(&mut self, now: Instant) {
        match self.config.window_kind {
            WindowKind::Count => {
                let size = self.config.window_size;
                self.window.trim(|_, calls| calls > size);
            }
            WindowKind::Time => {
                let span = Duration::from_secs(u64::from(self.config.window_size));
                self.window
                    .trim(|bucket, _| now.saturating_duration_since(bucket.start) >= span);
            }
        }
    }

    fn move_to(&mut self, to: BreakerState, failure_rate: f64, slow_call_rate: f64) -> Transition {
        let from = self.state;
        self.state = to;
        self.window.clear();
        self.probes_out = 0;
        if to == BreakerState::Open {
            self.opened_at = self.clock.now();
        }
        Transition {
            from,
            to,
            failure_rate,
            slow_call_rate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: CallResult = CallResult {
        failed: false,
        duration: Duration::from_millis(1),
    };
    const FAIL: CallResult = CallResult {
        failed: true,
        duration: Duration::from_millis(1),
    };
    const SLOW: CallResult = CallResult {
        failed: false,
        duration: Duration::from_millis(2_000),
    };
    /// Exactly the slow-call duration: not slow (slow is longer).
    const AT_LIMIT: CallResult = CallResult {
        failed: false,
        duration: Duration::from_millis(1_000),
    };

    fn breaker(config: BreakerConfig) -> (Breaker, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        (Breaker::new(config, clock.clone()), clock)
    }

    fn small() -> BreakerConfig {
        BreakerConfig {
            window_size: 10,
            minimum_calls: 5,
            failure_rate_threshold: 50.0,
            slow_call_rate_threshold: 80.0,
            slow_call_duration_ms: 1_000,
            wait_in_open_ms: 5_000,
            half_open_calls: 3,
            ..BreakerConfig::default()
        }
    }

    /// Acquires and records each result; returns the state after each call.
    fn run(b: &mut Breaker, results: &[CallResult]) -> Vec<BreakerState> {
        results
            .iter()
            .map(|r| {
                assert_eq!(b.try_acquire().0, Permit::Granted);
                b.record(*r);
                b.state()
            })
            .collect()
    }

    #[test]
    fn opens_at_the_failure_threshold_not_before() {
        use BreakerState::*;
        let cases: [(&str, Vec<CallResult>, Vec<BreakerState>); 5] = [
            (
                "calls at the slow limit are not slow",
                vec![AT_LIMIT; 10],
                vec![Closed; 10],
            ),
            // Four failures: below the minimum of five calls, stays closed.
            ("below minimum calls", vec![FAIL; 4], vec![Closed; 4]),
            // 2 of 5 = 40 %: closed; the sixth makes 3 of 6 = 50 %: open.
            (
                "at the threshold",
                vec![FAIL, OK, FAIL, OK, OK, FAIL],
                vec![Closed, Closed, Closed, Closed, Closed, Open],
            ),
            // 4 of 5 slow = 80 %: open on the fifth call.
            (
                "slow calls",
                vec![SLOW, SLOW, OK, SLOW, SLOW],
                vec![Closed, Closed, Closed, Closed, Open],
            ),
            // The window holds 10: with 10 OKs then 5 failures, the rate
            // reaches 50 % only once the first 5 OKs have slid out.
            (
                "calls slide out of a count window",
                [vec![OK; 10], vec![FAIL; 5]].concat(),
                [vec![Closed; 14], vec![Open]].concat(),
            ),
        ];
        for (name, results, expected) in cases {
            let (mut b, _) = breaker(small());
            assert_eq!(run(&mut b, &results), expected, "{name}");
        }
    }

    #[test]
    fn open_refuses_until_the_wait_then_lets_exactly_the_probes_through() {
        let (mut b, clock) = breaker(small());
        run(&mut b, &[FAIL; 5]);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.try_acquire().0,
            Permit::Refused {
                retry_after: Duration::from_millis(5_000)
            }
        );
        clock.advance(Duration::from_millis(4_999));
        assert_eq!(
            b.try_acquire().0,
            Permit::Refused {
                retry_after: Duration::from_millis(1)
            }
        );
        clock.advance(Duration::from_millis(1));
        let (permit, transition) = b.try_acquire();
        assert_eq!(permit, Permit::Granted);
        assert_eq!(
            transition.map(|t| (t.from, t.to)),
            Some((BreakerState::Open, BreakerState::HalfOpen))
        );
        // Three probes in all: two more, then refusals until they report.
        assert_eq!(b.try_acquire().0, Permit::Granted);
        assert_eq!(b.try_acquire().0, Permit::Granted);
        assert!(matches!(b.try_acquire().0, Permit::Refused { .. }));
        assert_eq!(b.record(OK), None);
        assert!(matches!(b.try_acquire().0, Permit::Refused { .. }));
        assert_eq!(b.record(OK), None);
        let closed = b.record(FAIL).expect("the third probe decides");
        // 1 of 3 failed = 33 %: below 50 %, so closed.
        assert_eq!(
            (closed.from, closed.to),
            (BreakerState::HalfOpen, BreakerState::Closed)
        );
        assert_eq!(b.snapshot().calls, 0, "a fresh window");
    }

    #[test]
    fn failing_probes_reopen_and_the_wait_starts_again() {
        let (mut b, clock) = breaker(small());
        run(&mut b, &[FAIL; 5]);
        clock.advance(Duration::from_secs(5));
        let reopened = run(&mut b, &[OK, FAIL, FAIL]);
        assert_eq!(
            reopened,
            [
                BreakerState::HalfOpen,
                BreakerState::HalfOpen,
                BreakerState::Open
            ]
        );
        clock.advance(Duration::from_millis(4_000));
        assert_eq!(
            b.try_acquire().0,
            Permit::Refused {
                retry_after: Duration::from_millis(1_000)
            }
        );
    }

    #[test]
    fn a_time_window_keeps_one_bucket_per_second() {
        let (mut b, clock) = breaker(BreakerConfig {
            window_kind: WindowKind::Time,
            window_size: 10,
            minimum_calls: 1_000_000,
            ..small()
        });
        for _ in 0..50 {
            run(&mut b, &[OK; 100]);
            clock.advance(Duration::from_millis(500));
        }
        // 5,000 calls over 25 s: the last 10 s of them, in 10 buckets.
        assert_eq!(b.snapshot().calls, 2_000);
        assert!(b.window.buckets.len() <= 11, "{}", b.window.buckets.len());
    }

    #[test]
    fn a_time_window_forgets_old_calls() {
        let (mut b, clock) = breaker(BreakerConfig {
            window_kind: WindowKind::Time,
            window_size: 10,
            ..small()
        });
        run(&mut b, &[FAIL; 4]);
        clock.advance(Duration::from_secs(10));
        // The four failures are 10 s old: out of the window.
        assert_eq!(run(&mut b, &[OK; 4]), [BreakerState::Closed; 4]);
        assert_eq!(b.snapshot().calls, 4);
        assert_eq!(run(&mut b, &[FAIL; 4]).last(), Some(&BreakerState::Open));
    }

    #[test]
    fn a_late_result_while_open_changes_nothing_and_disabled_always_grants() {
        let (mut b, _) = breaker(small());
        run(&mut b, &[FAIL; 5]);
        assert_eq!(b.record(OK), None);
        assert_eq!(b.state(), BreakerState::Open);

        let (mut off, _) = breaker(BreakerConfig {
            enabled: false,
            ..small()
        });
        assert_eq!(run(&mut off, &[FAIL; 50]), vec![BreakerState::Closed; 50]);
    }

    #[test]
    fn released_probes_are_granted_again_and_the_budget_follows_the_state() {
        let (mut b, clock) = breaker(small());
        assert_eq!(b.call_budget(), usize::MAX);
        run(&mut b, &[FAIL; 5]);
        assert_eq!(b.open_for(), Some(Duration::from_secs(5)));
        assert_eq!(b.call_budget(), 3);
        clock.advance(Duration::from_secs(5));
        assert_eq!(b.open_for(), None, "probes may go");
        for _ in 0..3 {
            assert_eq!(b.try_acquire().0, Permit::Granted);
        }
        assert!(matches!(b.try_acquire().0, Permit::Refused { .. }));
        b.release();
        assert_eq!(b.try_acquire().0, Permit::Granted, "the released slot");
    }

    #[test]
    fn bad_settings_are_named() {
        assert_eq!(BreakerConfig::default().problem(), None);
        for threshold in [150.0, 0.0, -1.0] {
            let bad = BreakerConfig {
                failure_rate_threshold: threshold,
                ..BreakerConfig::default()
            };
            assert!(
                bad.problem().is_some_and(|p| p.contains("percentages")),
                "{threshold}"
            );
        }
    }
}
