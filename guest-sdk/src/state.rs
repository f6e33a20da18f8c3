//! Keyed state: entries stored by name under the key of the event being handled.
//!
//! A handler sees only its current key's entries. The host applies an event's writes
//! only if the handler returns `Ok`; the native test harness does the same.

use serde::Serialize;
use serde::de::DeserializeOwned;

#[cfg(target_arch = "wasm32")]
use crate::__bindings::weir::function::state as imp;
use crate::Error;
#[cfg(not(target_arch = "wasm32"))]
use crate::testing::imports::state as imp;

/// The value stored under `name` for the current key, if any.
pub fn get(name: &str) -> Option<Vec<u8>> {
    imp::get(name)
}

/// Stores `value` under `name` for the current key.
pub fn set(name: &str, value: &[u8]) {
    imp::set(name, value);
}

/// Removes `name` for the current key; removing a missing entry is not an error.
pub fn delete(name: &str) {
    imp::delete(name);
}

/// The entry `name` decoded from JSON. An entry that does not decode is rejected,
/// naming the entry.
pub fn get_json<T: DeserializeOwned>(name: &str) -> Result<Option<T>, Error> {
    let Some(bytes) = get(name) else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        Error::reject(format!(
            "state entry {name:?} is not valid JSON for {}: {e}",
            std::any::type_name::<T>()
        ))
    })
}

/// Stores `value` as JSON under `name`.
pub fn set_json<T: Serialize + ?Sized>(name: &str, value: &T) -> Result<(), Error> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| Error::reject(format!("cannot encode state entry {name:?} as JSON: {e}")))?;
    set(name, &bytes);
    Ok(())
}
