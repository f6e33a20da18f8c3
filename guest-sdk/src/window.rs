//! Window functions: called per event-time window of a key instead of per
//! event (docs/windows.md).
//!
//! - **Incremental** ([`IncrementalWindow`], exported with
//!   [`incremental_window!`](crate::incremental_window)): each event is
//!   folded into a typed accumulator, which the host keeps (as JSON) in the
//!   window's state; accumulators of two parts of a window (the panes of a
//!   sliding window, sessions an event bridged) are merged; when the window
//!   fires, its accumulator is handed over.
//! - **Buffered** ([`BufferedWindow`], exported with
//!   [`buffered_window!`](crate::buffered_window)): when the window fires,
//!   its events are handed over in event-time order.
//!
//! Both are told which firing this is: 0 when the watermark passes the
//! window's end, then 1, 2, ... for updates after late events.
//!
//! Natively, [`crate::testing::WindowHarness`] drives them with controlled
//! event times and watermark.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Error, Event};

/// A window that fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firing {
    /// The key whose window this is.
    pub key: String,
    /// The window, [start_ms, end_ms).
    pub start_ms: i64,
    pub end_ms: i64,
    /// 0 for the first firing; 1, 2, ... for each update after late data.
    pub number: u32,
}

impl Firing {
    /// Whether this call updates an earlier result after late events.
    pub fn is_update(&self) -> bool {
        self.number > 0
    }
}

/// A window function that folds each event into an accumulator.
pub trait IncrementalWindow {
    /// The window's running result, kept as JSON between events. A new
    /// window starts from `Default`.
    type Accumulator: Serialize + DeserializeOwned + Default;

    /// Adds `event` to the accumulator. An error fails the event (retried
    /// or dead-lettered like any event) and leaves its window as it was.
    fn fold(accumulator: &mut Self::Accumulator, event: &Event) -> Result<(), Error>;

    /// Combines two parts of one window, `earlier` before `later` in event
    /// time. Must be associative — `merge(merge(a, b), c)` equals
    /// `merge(a, merge(b, c))` — as the host may group a window's parts
    /// either way (it reuses what it merged for earlier windows); the
    /// order of the parts is always kept.
    fn merge(earlier: Self::Accumulator, later: Self::Accumulator) -> Self::Accumulator;

    /// The window fired: publish its result.
    fn fire(firing: &Firing, accumulator: Self::Accumulator) -> Result<(), Error>;
}

/// A window function that gets the window's events when it fires.
pub trait BufferedWindow {
    /// The window fired: its events, in event-time order (stream order
    /// among equal times).
    fn on_window(firing: &Firing, events: Vec<Event>) -> Result<(), Error>;
}

/// Decodes an accumulator the host kept.
pub(crate) fn decode<A: DeserializeOwned>(bytes: &[u8]) -> Result<A, Error> {
    serde_json::from_slice(bytes).map_err(|e| {
        Error::reject(format!(
            "the window's accumulator is not valid JSON for {}: {e}",
            std::any::type_name::<A>()
        ))
    })
}

/// Encodes an accumulator for the host to keep.
pub(crate) fn encode<A: Serialize>(accumulator: &A) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(accumulator)
        .map_err(|e| Error::reject(format!("cannot encode the window's accumulator: {e}")))
}

/// Exports `$window` (an [`IncrementalWindow`]) as the component's
/// `weir:window/incremental-window-handler` world. Built natively it does
/// nothing: test the type with [`crate::testing::WindowHarness`].
#[macro_export]
macro_rules! incremental_window {
    ($window:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        #[allow(unsafe_code)]
        const _: () = {
            struct __WeirWindow;

            impl $crate::__bindings::incremental::Guest for __WeirWindow {
                fn fold(
                    accumulator: ::core::option::Option<::std::vec::Vec<u8>>,
                    event: $crate::__bindings::Event,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, $crate::__bindings::Error>
                {
                    $crate::__bindings::fold::<$window>(accumulator, event)
                }

                fn merge(
                    earlier: ::std::vec::Vec<u8>,
                    later: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, $crate::__bindings::Error>
                {
                    $crate::__bindings::merge::<$window>(earlier, later)
                }

                fn fire(
                    firing: $crate::__bindings::GuestFiring,
                    accumulator: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<(), $crate::__bindings::Error> {
                    $crate::__bindings::fire::<$window>(firing, accumulator)
                }
            }

            $crate::__bindings::incremental::__export_incremental!(
                __WeirWindow with_types_in $crate::__bindings::incremental
            );
        };
    };
}

/// Exports `$window` (a [`BufferedWindow`]) as the component's
/// `weir:window/buffered-window-handler` world. Built natively it does
/// nothing: test the type with [`crate::testing::WindowHarness`].
#[macro_export]
macro_rules! buffered_window {
    ($window:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        #[allow(unsafe_code)]
        const _: () = {
            struct __WeirWindow;

            impl $crate::__bindings::buffered::Guest for __WeirWindow {
                fn on_window(
                    firing: $crate::__bindings::GuestFiring,
                    events: ::std::vec::Vec<$crate::__bindings::Event>,
                ) -> ::core::result::Result<(), $crate::__bindings::Error> {
                    $crate::__bindings::on_window::<$window>(firing, events)
                }
            }

            $crate::__bindings::buffered::__export_buffered!(
                __WeirWindow with_types_in $crate::__bindings::buffered
            );
        };
    };
}
