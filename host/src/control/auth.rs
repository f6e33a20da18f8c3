//! Who may call the API: bearer tokens scoped to a namespace and a role
//! (read < deploy < admin), stored as sha256 hashes in `weir_tokens`; a
//! bootstrap admin token from the config; and a request rate per token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

use super::admission::{LOOKUP_TTL, LookupCache};
use crate::ratelimit::TokenBucket;

/// What a token allows, each role including the ones before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Deploy,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Deploy => "deploy",
            Role::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "read" => Some(Role::Read),
            "deploy" => Some(Role::Deploy),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The namespace of a token that may act in every namespace.
pub const ANY_NAMESPACE: &str = "*";

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub namespace: String,
    pub role: Role,
}

impl Principal {
    /// Whether this caller may act as `role` in `namespace`.
    pub fn require(&self, namespace: &str, role: Role) -> Result<(), AuthError> {
        if self.namespace != ANY_NAMESPACE && self.namespace != namespace {
            return Err(AuthError::Forbidden(format!(
                "this token is for namespace `{}`, not `{namespace}`",
                self.namespace
            )));
        }
        if self.role < role {
            return Err(AuthError::Forbidden(format!(
                "this needs the `{}` role; the token has `{}`",
                role.as_str(),
                self.role.as_str()
            )));
        }
        Ok(())
    }

    /// Whether this caller has `role` in at least one namespace.
    pub fn require_role(&self, role: Role) -> Result<(), AuthError> {
        self.require(&self.namespace.clone(), role)
    }
}

/// Why a request is not allowed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    Missing,
    #[error("the bearer token is not valid")]
    Invalid,
    #[error("{0}")]
    Forbidden(String),
    #[error("too many requests for this token; retry in {} ms", .retry_after.as_millis())]
    RateLimited { retry_after: Duration },
    #[error("token store: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the operating system's random generator failed: {0}")]
    Entropy(String),
}

/// The hex sha256 of a token: what is stored and compared.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Checks tokens and rates.
pub struct Authenticator {
    pool: PgPool,
    bootstrap_hash: Option<String>,
    requests_per_second: f64,
    requests_per_second_per_namespace: f64,
    /// Token buckets, per token and per namespace.
    buckets: Mutex<HashMap<String, TokenBucket>>,
    /// Recent lookups by token hash, unknown tokens included.
    lookups: LookupCache<Principal>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

/// Buckets kept (tokens and namespaces) before idle ones are forgotten.
const MAX_BUCKETS: usize = 10_000;

/// The token of an `Authorization` header value of the Bearer scheme. The
/// scheme name is case-insensitive and may be followed by several spaces
/// (RFC 7235, section 2.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Authenticator {
    /// Tokens are looked up in `pool`; each may make `requests_per_second`,
    /// all of a namespace's together `requests_per_second_per_namespace`
    /// (bursts of twice either).
    pub fn new(
        pool: PgPool,
        bootstrap_token: Option<&str>,
        requests_per_second: u32,
        requests_per_second_per_namespace: u32,
    ) -> Self {
        Self {
            pool,
            bootstrap_hash: bootstrap_token.map(hash_token),
            requests_per_second: f64::from(requests_per_second.max(1)),
            requests_per_second_per_namespace: f64::from(requests_per_second_per_namespace.max(1)),
            buckets: Mutex::new(HashMap::new()),
            lookups: LookupCache::default(),
        }
    }

    /// The caller of a request with this `Authorization` header value, once
    /// its token is known and within its rate.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let token = authorization
            .and_then(bearer_token)
            .ok_or(AuthError::Missing)?;
        let hash = hash_token(token);
        let principal = if self.bootstrap_hash.as_deref() == Some(hash.as_str()) {
            Principal {
                token_id: "bootstrap".into(),
                namespace: ANY_NAMESPACE.into(),
                role: Role::Admin,
            }
        } else {
            let now = Instant::now();
            let found = match self.lookups.get(&hash, now) {
                Some(found) => found,
                None => {
                    let generation = self.lookups.generation();
                    let (found, expires_in) = self.look_up(&hash).await?;
                    let believe = expires_in.map_or(LOOKUP_TTL, |left| left.min(LOOKUP_TTL));
                    self.lookups
                        .put(&hash, found.clone(), now, believe, generation);
                    found
                }
            };
            found.ok_or(AuthError::Invalid)?
        };
        self.admit(&principal)?;
        Ok(principal)
    }

    /// The principal of the token with this hash, if there is one, and how
    /// long until it expires, if it does.
    async fn look_up(
        &self,
        hash: &str,
    ) -> Result<(Option<Principal>, Option<Duration>), AuthError> {
        // Revoked and expired tokens are not found.
        let row = sqlx::query(
            "SELECT id, namespace, role, extract(epoch FROM expires_at - now())::float8
             FROM weir_tokens WHERE hash = $1
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok((None, None));
        };
        let (token_id, namespace, role): (String, String, String) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let expires_in: Option<f64> = row.try_get(3)?;
        let principal = Role::parse(&role).map(|role| Principal {
            token_id,
            namespace,
            role,
        });
        let expires_in = expires_in.map(|secs| Duration::from_secs_f64(secs.max(0.0)));
        Ok((principal, expires_in))
    }

    /// Forgets what was looked up for the token with this hash (revoked).
    pub fn forget(&self, hash: &str) {
        self.lookups.forget(hash);
    }

    /// Forgets the revoked tokens every host announces on
    /// [`super::tokens::TOKEN_CHANNEL`], until `shutdown`. Whenever the
    /// listener (re)connects, every lookup is forgotten: an announcement
    /// sent while it was away is not left believed for up to
    /// [`super::admission::LOOKUP_TTL`].
    pub async fn follow_revocations(&self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let stopped = tokio::select! {
                _ = shutdown.cancelled() => return,
                stopped = self.forget_revoked() => stopped,
            };
            // A dropped connection is listened on again at once (after a
            // breath, should it keep dropping); a failure after a second.
            let pause = match stopped {
                Ok(()) => Duration::from_millis(100),
                Err(error) => {
                    tracing::warn!(%error, "API: listening for revoked tokens failed; retrying (meanwhile a token revoked on another host is believed for up to {} s)", LOOKUP_TTL.as_secs());
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Listens for revoked tokens and forgets each, until the connection
    /// drops (`Ok`) or fails (`Err`). Every lookup is forgotten once the
    /// listener listens: what was announced before it did is not missed.
    async fn forget_revoked(&self) -> Result<(), sqlx::Error> {
        // A connection of its own, not one of the API's few pooled ones,
        // named apart from them in `pg_stat_activity`.
        let options = (*self.pool.connect_options())
            .clone()
            .application_name("weir-api-revocations");
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(options);
        let mut listener = sqlx::postgres::PgListener::connect_with(&own).await?;
        listener.listen(super::tokens::TOKEN_CHANNEL).await?;
        self.lookups.clear();
        // `try_recv`, not `recv`: `recv` reconnects by itself, and what was
        // announced while it did would be missed with nothing forgotten.
        while let Some(revoked) = listener.try_recv().await? {
            self.forget(revoked.payload());
        }
        Ok(())
    }

    /// The pool tokens are stored in.
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Takes one request from the token's bucket, then from its
    /// namespace's: many tokens of one namespace share its rate.
    fn admit(&self, principal: &Principal) -> Result<(), AuthError> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let token = format!("token:{}", principal.token_id);
        let namespace = format!("namespace:{}", principal.namespace);
        if buckets.len() >= MAX_BUCKETS
            && !(buckets.contains_key(&token) && buckets.contains_key(&namespace))
        {
            buckets.retain(|_, bucket| !bucket.is_full(now));
        }
        for (key, rate) in [
            (token, self.requests_per_second),
            (namespace, self.requests_per_second_per_namespace),
        ] {
            let bucket = buckets
                .entry(key)
                .or_insert_with(|| TokenBucket::new(rate, rate * 2.0, now));
            if !bucket.take(now) {
                return Err(AuthError::RateLimited {
                    retry_after: bucket.wait(),
                });
            }
        }
        Ok(())
    }
}

/// `bytes` random bytes from the OS, hex-encoded.
pub(super) fn random_hex(bytes: usize) -> Result<String, AuthError> {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).map_err(|e| AuthError::Entropy(e.to_string()))?;
    Ok(hex::encode(buffer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(namespace: &str, role: Role) -> Principal {
        Principal {
            token_id: "t".into(),
            namespace: namespace.into(),
            role,
        }
    }

    #[test]
    fn roles_and_namespaces() {
        let deployer = principal("shop", Role::Deploy);
        assert!(deployer.require("shop", Role::Read).is_ok());
        assert!(deployer.require("shop", Role::Deploy).is_ok());
        let too_low = deployer.require("shop", Role::Admin).expect_err("admin");
        assert!(too_low.to_string().contains("needs the `admin` role"));
        let elsewhere = deployer
            .require("billing", Role::Read)
            .expect_err("namespace");
        assert!(
            elsewhere
                .to_string()
                .contains("namespace `shop`, not `billing`")
        );
        assert!(
            principal("*", Role::Admin)
                .require("any", Role::Admin)
                .is_ok()
        );
        assert!(
            principal("*", Role::Read)
                .require("any", Role::Deploy)
                .is_err()
        );
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER   abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn tokens_are_stored_hashed() {
        let hash = hash_token("weir_secret");
        assert_eq!(hash.len(), 64);
        assert_ne!(hash, "weir_secret");
        assert_eq!(hash, hash_token("weir_secret"));
        let (a, b) = (
            random_hex(24).expect("random"),
            random_hex(24).expect("random"),
        );
        assert_ne!(a, b);
        assert_eq!(a.len(), 48);
    }
}
