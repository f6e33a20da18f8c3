//! What a namespace owns: the streams its functions may read and the
//! subject patterns their inputs and outputs must stay within. A binding
//! outside them is refused, so a tenant can neither read another's stream
//! (or Weir's own dead-letter and log streams) nor publish into another's
//! subjects. Checked as subject *sets*: `shop.*.out` is within `shop.>`,
//! `shop.>` is not within `shop.*`.
//!
//! Without a grant, namespace `shop` owns the streams `SHOP` and `SHOP_*`
//! and the subjects `shop.>`. A global admin replaces that with
//! `PUT /v1/namespaces/{ns}/resources`. In production, NATS accounts (or
//! per-tenant credentials with subject permissions) can enforce the same
//! split on the broker itself; this check keeps Weir's own API from being
//! the way around it.

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::output::{is_subject_pattern, is_within};

/// The namespace named like Weir's own streams (`WEIR_DEAD_LETTERS`,
/// `WEIR_LOGS`) and subjects (`weir.dlq.>`, `weir.logs.>`): no tenant may
/// have it, or its defaults would be every tenant's dead letters and logs.
pub const RESERVED_NAMESPACE: &str = "weir";

/// The streams and subject patterns a namespace owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Stream names; an entry ending in `*` covers every name it prefixes.
    pub streams: Vec<String>,
    /// Subject patterns (`*` and `>` wildcards) inputs and outputs must be
    /// within.
    pub subjects: Vec<String>,
}

/// The stream-name form of a namespace: `my-shop` → `MY-SHOP`. The `-`
/// stays: namespace names hold no `_`, so `SHOP_*` (namespace `shop`'s)
/// can never cover another namespace's default streams, as it would cover
/// `SHOP_X` if `shop-x` became `SHOP_X`.
fn stream_stem(namespace: &str) -> String {
    namespace.to_ascii_uppercase()
}

impl Resources {
    /// What a namespace owns until an admin says otherwise (nothing, for
    /// the reserved namespace).
    pub fn default_for(namespace: &str) -> Self {
        if namespace == RESERVED_NAMESPACE {
            return Self {
                streams: Vec::new(),
                subjects: Vec::new(),
            };
        }
        let stem = stream_stem(namespace);
        Self {
            streams: vec![stem.clone(), format!("{stem}_*")],
            subjects: vec![format!("{namespace}.>")],
        }
    }

    /// Why these resources are not usable as a grant, if they are not.
    pub fn problem(&self) -> Option<String> {
        for stream in &self.streams {
            let name = stream.strip_suffix('*').unwrap_or(stream);
            if name.is_empty()
                || name.len() > 255
                || name.contains(['.', '*', '>', ' '])
                || name.chars().any(char::is_control)
            {
                return Some(format!(
                    "streams: `{stream}` is not a stream name (or a name prefix ending in `*`)"
                ));
            }
        }
        for subject in &self.subjects {
            if !is_subject_pattern(subject) || subject.starts_with('$') {
                return Some(format!(
                    "subjects: `{subject}` is not a subject pattern outside `$` system subjects"
                ));
            }
        }
        None
    }

    fn owns_stream(&self, stream: &str) -> bool {
        self.streams
            .iter()
            .any(|owned| match owned.strip_suffix('*') {
                Some(prefix) => stream.starts_with(prefix),
                None => owned == stream,
            })
    }

    fn owns_subjects(&self, pattern: &str) -> bool {
        self.subjects.iter().any(|owned| is_within(pattern, owned))
    }

    /// Why namespace `namespace` may not bind to `stream` and `subject`
    /// with these `outputs`, naming the field; `None` if it may.
    pub fn binding_problem(
        &self,
        namespace: &str,
        stream: &str,
        subject: &str,
        outputs: &[String],
    ) -> Option<String> {
        let how =
            format!("a global admin grants more with PUT /v1/namespaces/{namespace}/resources");
        if !self.owns_stream(stream) {
            return Some(format!(
                "stream: `{stream}` is not a stream of namespace `{namespace}` (it owns {}); {how}",
                self.streams.join(", ")
            ));
        }
        if !self.owns_subjects(subject) {
            return Some(format!(
                "subject: `{subject}` reaches outside namespace `{namespace}`'s subjects ({}); {how}",
                self.subjects.join(", ")
            ));
        }
        if let Some(output) = outputs.iter().find(|o| !self.owns_subjects(o)) {
            return Some(format!(
                "outputs: `{output}` reaches outside namespace `{namespace}`'s subjects ({}); {how}",
                self.subjects.join(", ")
            ));
        }
        None
    }
}

/// What namespace `namespace` owns: its grant, or the defaults.
pub async fn resources(pool: &PgPool, namespace: &str) -> Result<Resources, sqlx::Error> {
    let row: Option<(Vec<String>, Vec<String>)> = sqlx::query_as(
        "SELECT streams, subjects FROM weir_namespace_resources WHERE namespace = $1",
    )
    .bind(namespace)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        Some((streams, subjects)) => Resources { streams, subjects },
        None => Resources::default_for(namespace),
    })
}

/// Replaces what namespace `namespace` owns, and tells every host (on
/// `channel`), which stop the namespace's functions that no longer fit.
pub async fn grant(
    pool: &PgPool,
    namespace: &str,
    resources: &Resources,
    channel: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO weir_namespace_resources (namespace, streams, subjects) VALUES ($1, $2, $3)
         ON CONFLICT (namespace) DO UPDATE
         SET streams = EXCLUDED.streams, subjects = EXCLUDED.subjects, updated_at = now()",
    )
    .bind(namespace)
    .bind(&resources.streams)
    .bind(&resources.subjects)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(format!("{namespace}/"))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::subject_matches;

    #[test]
    fn subject_sets_within_subject_sets() {
        let within = [
            ("shop.in", "shop.>"),
            ("shop.a.b", "shop.>"),
            ("shop.*", "shop.>"),
            ("shop.*.out", "shop.>"),
            ("shop.>", "shop.>"),
            ("shop.x", "shop.*"),
            ("shop.*", "shop.*"),
            ("a.b", "a.b"),
            ("a.b", ">"),
            ("a.*.c", "a.*.*"),
        ];
        for (pattern, owned) in within {
            assert!(is_within(pattern, owned), "{pattern} within {owned}");
        }
        let outside = [
            ("billing.>", "shop.>"),
            ("shop", "shop.>"),
            ("shop.>", "shop.*"),
            ("*", "shop.>"),
            (">", "shop.>"),
            ("*.in", "shop.>"),
            ("weir.dlq.billing", "shop.>"),
            ("_INBOX.>", "shop.>"),
            ("shop.a.b", "shop.*"),
            ("a.*.c", "a.b.*"),
            ("shop..x", "shop.>"),
            ("", "shop.>"),
            ("shop.>.x", ">"),
        ];
        for (pattern, owned) in outside {
            assert!(!is_within(pattern, owned), "{pattern} not within {owned}");
        }
    }

    /// Within means: every literal subject the pattern matches, the owned
    /// pattern matches too — checked over every subject of up to four
    /// tokens from a small alphabet.
    #[test]
    fn within_agrees_with_matching_every_subject() {
        let alphabet = ["a", "b"];
        let mut subjects: Vec<String> = Vec::new();
        for len in 1..=4u32 {
            for n in 0..2usize.pow(len) {
                let tokens: Vec<&str> = (0..len).map(|i| alphabet[(n >> i) & 1]).collect();
                subjects.push(tokens.join("."));
            }
        }
        let patterns = [
            "a", "a.b", "*", "*.a", "a.*", ">", "a.>", "*.>", "a.*.b", "*.*", "b.>", "a.b.>",
        ];
        for pattern in patterns {
            for owned in patterns {
                let by_matching = subjects
                    .iter()
                    .filter(|s| subject_matches(pattern, s))
                    .all(|s| subject_matches(owned, s));
                // Sets cut off at four tokens: `>` patterns reach further
                // than the sample, where they agree by construction.
                assert_eq!(
                    is_within(pattern, owned),
                    by_matching,
                    "{pattern} within {owned}"
                );
            }
        }
    }

    #[test]
    fn defaults_and_bindings() {
        let shop = Resources::default_for("my-shop");
        assert_eq!(shop.streams, ["MY-SHOP", "MY-SHOP_*"]);
        // `shop`'s defaults never cover another namespace's.
        let plain = Resources::default_for("shop");
        for other in ["shop-x", "shopx", "shop-2"] {
            let theirs = Resources::default_for(other);
            for stream in theirs.streams.iter().map(|s| s.trim_end_matches('*')) {
                assert!(!plain.owns_stream(stream), "{stream} of {other}");
                assert!(
                    !plain.owns_stream(&format!("{stream}_EVENTS")),
                    "{stream}_EVENTS of {other}"
                );
            }
        }
        assert!(
            shop.binding_problem(
                "my-shop",
                "MY-SHOP_ORDERS",
                "my-shop.orders.>",
                &["my-shop.out".into()]
            )
            .is_none()
        );
        let reading_billing = shop.binding_problem("my-shop", "BILLING", "billing.>", &[]);
        assert!(reading_billing.is_some_and(|p| p.starts_with("stream:")));
        let dead_letters = shop.binding_problem("my-shop", "WEIR_DEAD_LETTERS", "weir.dlq.>", &[]);
        assert!(dead_letters.is_some_and(|p| p.starts_with("stream:")));
        for output in [
            "billing.in",
            "weir.>",
            "weir.dlq.billing",
            "weir.logs.billing",
            "_INBOX.>",
            "*",
        ] {
            let problem =
                shop.binding_problem("my-shop", "MY-SHOP", "my-shop.in", &[output.into()]);
            assert!(
                problem.is_some_and(|p| p.starts_with("outputs:")),
                "{output}"
            );
        }
        let reserved = Resources::default_for(RESERVED_NAMESPACE);
        assert!(
            reserved
                .binding_problem("weir", "WEIR_DEAD_LETTERS", "weir.dlq.>", &[])
                .is_some()
        );
        let bad_grant = Resources {
            streams: vec!["A.B".into()],
            subjects: vec!["x.>".into()],
        };
        assert!(bad_grant.problem().is_some());
        let system = Resources {
            streams: vec!["A".into()],
            subjects: vec!["$JS.>".into()],
        };
        assert!(system.problem().is_some());
    }
}
