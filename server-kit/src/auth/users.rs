//! Users from a server's settings file, and how their secrets are stored and checked.
//!
//! A password is stored as an argon2id hash in the PHC string format
//! (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`, made by `qbus-broker hash-secret`); a
//! token, a long random string for scripts, as `sha256:HEX` of it (made by
//! `qbus-broker new-token`): a token carries 256 random bits, so a fast digest suffices, and
//! a digest lets a token find its user without trying every hash. Neither is ever stored
//! as given.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::permissions::Permissions;

/// The name of the entry whose rules apply to clients without credentials.
pub const ANONYMOUS: &str = "anonymous";

/// One `[[users]]` entry of a settings file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserSpec {
    /// The name a client logs in with.
    pub name: String,
    /// The password's argon2 hash (`qbus-broker hash-secret`).
    #[serde(default)]
    pub secret: Option<String>,
    /// Tokens' digests, `sha256:HEX` (`qbus-broker new-token`).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Rules this user is allowed, e.g. `"produce,consume orders.*"`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Rules this user is refused even where `allow` matches.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// A user with a checked secret and parsed rules.
pub struct User {
    /// Its name.
    pub name: Arc<str>,
    secret: Option<String>,
    /// What it may do.
    pub permissions: Permissions,
}

/// Hashes stay out of logs.
impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User")
            .field("name", &self.name)
            .field("permissions", &self.permissions)
            .finish_non_exhaustive()
    }
}

/// Why a secret could not be checked or made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The stored value is not a hash this server can check.
    #[error("{0}")]
    NotAHash(String),
}

/// The configured users.
#[derive(Default)]
pub struct Users {
    by_name: HashMap<Arc<str>, Arc<User>>,
    by_token: HashMap<[u8; 32], Arc<User>>,
    /// Per user, the SHA-256 of the password last verified against its argon2 hash: HTTP
    /// clients send their password with every request, and argon2 is slow on purpose.
    /// Bounded by the number of users.
    verified: Mutex<HashMap<Arc<str>, [u8; 32]>>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.by_name.values()).finish()
    }
}

impl Users {
    /// Checks every entry: names unique, secrets hashes (never plain text), rules readable.
    /// The error names the user and what is wrong.
    pub fn new(specs: Vec<UserSpec>) -> Result<Users, String> {
        let mut users = Users::default();
        for spec in specs {
            let at = |message: String| format!("user {:?}: {message}", spec.name);
            if spec.name.is_empty() || spec.name.contains(':') {
                return Err(at("a name must be non-empty and hold no ':'".into()));
            }
            if let Some(secret) = &spec.secret {
                PasswordHash::new(secret).map_err(|e| {
                    at(format!(
                        "secret must be an argon2 hash made with `qbus-broker hash-secret` \
                         (never the password itself): {e}"
                    ))
                })?;
            }
            let permissions = Permissions::parse(&spec.allow, &spec.deny).map_err(at)?;
            let user = Arc::new(User {
                name: spec.name.as_str().into(),
                secret: spec.secret.clone(),
                permissions,
            });
            for token in &spec.tokens {
                let digest = parse_token_digest(token).map_err(at)?;
                if users.by_token.insert(digest, user.clone()).is_some() {
                    return Err(at("the same token is listed twice".into()));
                }
            }
            if users.by_name.insert(user.name.clone(), user).is_some() {
                return Err(at("listed twice".into()));
            }
        }
        Ok(users)
    }

    /// True when no user is configured.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// How many users are configured.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<User>> {
        self.by_name.get(name)
    }

    /// The user holding `token`.
    pub fn by_token(&self, token: &str) -> Option<&Arc<User>> {
        self.by_token.get(&sha256(token.as_bytes()))
    }

    /// The user `name` if `password` is its password. Slow (argon2): call it off the
    /// reactor threads, except that a password verified before is recognised at once.
    pub fn check_password(&self, name: &str, password: &str) -> Option<Arc<User>> {
        let user = self.by_name.get(name)?;
        let hash = user.secret.as_deref()?;
        let digest = sha256(password.as_bytes());
        if self.recently_verified(&user.name, &digest) {
            return Some(user.clone());
        }
        let parsed = PasswordHash::new(hash).ok()?;
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .ok()?;
        self.verified
            .lock()
            .expect("verified map poisoned")
            .insert(user.name.clone(), digest);
        Some(user.clone())
    }

    /// True when `password` (given as its digest) was verified for `name` before.
    pub fn recently_verified(&self, name: &str, digest: &[u8; 32]) -> bool {
        self.verified
            .lock()
            .expect("verified map poisoned")
            .get(name)
            .is_some_and(|known| constant_time_eq(known, digest))
    }
}

/// The argon2id hash of `password` in PHC string form, with a fresh random salt.
pub fn hash_secret(password: &str) -> Result<String, SecretError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| SecretError::NotAHash(format!("cannot hash the secret: {e}")))
}

/// A fresh random token (`qbus_` and 64 hex digits) and the `sha256:HEX` line that
/// stores it.
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let token = format!("qbus_{}", hex(&bytes));
    let stored = token_digest(&token);
    (token, stored)
}

/// How a token is stored: `sha256:` and the hex digest.
pub fn token_digest(token: &str) -> String {
    format!("sha256:{}", hex(&sha256(token.as_bytes())))
}

fn parse_token_digest(text: &str) -> Result<[u8; 32], String> {
    let bad = || {
        format!(
            "token {text:?} is not sha256:<64 hex digits> as `qbus-broker new-token` prints \
             (never the token itself)"
        )
    };
    let hex = text.strip_prefix("sha256:").ok_or_else(bad)?;
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(digest)
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, secret: Option<String>, tokens: Vec<String>) -> UserSpec {
        UserSpec {
            name: name.into(),
            secret,
            tokens,
            allow: vec!["produce *".into()],
            deny: Vec::new(),
        }
    }

    #[test]
    fn passwords_and_tokens_are_checked_against_their_hashes() {
        let hash = hash_secret("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let (token, stored) = new_token();
        let users = Users::new(vec![spec("alice", Some(hash), vec![stored])]).unwrap();
        assert!(users.check_password("alice", "s3cret").is_some());
        // Twice: the second is answered from the verified digest.
        assert!(users.check_password("alice", "s3cret").is_some());
        assert!(users.check_password("alice", "wrong").is_none());
        assert!(users.check_password("bob", "s3cret").is_none());
        assert_eq!(users.by_token(&token).map(|u| &*u.name), Some("alice"));
        assert!(users.by_token("qbus_guess").is_none());
    }

    #[test]
    fn plain_text_secrets_and_duplicates_are_refused() {
        let err = Users::new(vec![spec("alice", Some("hunter2".into()), vec![])]).unwrap_err();
        assert!(err.contains("hash-secret"), "{err}");
        let err = Users::new(vec![spec("a", None, vec!["qbus_123".into()])]).unwrap_err();
        assert!(err.contains("new-token"), "{err}");
        let err = Users::new(vec![spec("a", None, vec![]), spec("a", None, vec![])]).unwrap_err();
        assert!(err.contains("twice"), "{err}");
    }
}
