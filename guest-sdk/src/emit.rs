//! Output records: publish to the subjects the function's binding declares.
//!
//! The host publishes an event's records only if the handler returns `Ok`; publishing
//! to an undeclared subject fails the invocation.

use serde::Serialize;

#[cfg(target_arch = "wasm32")]
use crate::__bindings::weir::function::emit as imp;
use crate::Error;
#[cfg(not(target_arch = "wasm32"))]
use crate::testing::imports::emit as imp;

/// Publishes `payload` with `headers` to `subject`.
pub fn publish(subject: &str, payload: &[u8], headers: &[(String, String)]) {
    imp::publish(subject, payload, headers);
}

/// Publishes `value` as JSON to `subject`, with the header `content-type: application/json`.
pub fn publish_json<T: Serialize + ?Sized>(subject: &str, value: &T) -> Result<(), Error> {
    let payload = serde_json::to_vec(value).map_err(|e| {
        Error::reject(format!(
            "cannot encode the record for {subject:?} as JSON: {e}"
        ))
    })?;
    let headers = [("content-type".to_owned(), "application/json".to_owned())];
    publish(subject, &payload, &headers);
    Ok(())
}
