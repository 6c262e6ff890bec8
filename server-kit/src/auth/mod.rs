//! Who a client is and what it may do, one model for every door of every server (binary
//! protocol, HTTP, zbus, trackers):
//!
//! - [`users`]: the configured users, their hashed secrets and tokens.
//! - [`permissions`]: rules of [`Operation`]s on MQ (and group) name patterns, deny over
//!   allow.
//! - [`net`]: the address ranges served without credentials.
//! - [`throttle`]: slowing down repeated bad secrets from one address.
//! - [`tool`]: the `hash-secret` and `new-token` commands of the server binaries.
//!
//! A door settles an [`Identity`] once per connection (or per HTTP request): from a login
//! ([`Access::login_password`], [`Access::login_token`]), a TLS client certificate
//! ([`Access::certificate`]), or none, when [`Access::anonymous`] lets the peer's address in
//! without credentials. Every request then asks [`Access::check`], which answers
//! [`Denied::Unauthenticated`] (401) or [`Denied::Forbidden`] (403) with a message naming
//! the operation and the MQ.

pub mod net;
pub mod permissions;
pub mod throttle;
pub mod tool;
pub mod users;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

pub use self::net::Network;
pub use self::permissions::{Operation, Pattern, Permissions};
use self::throttle::Throttle;
pub use self::users::{hash_secret, new_token, token_digest, UserSpec, Users, ANONYMOUS};

/// How an identity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// No credentials, from an address served without them.
    Anonymous,
    /// A user name and password.
    Password,
    /// A token.
    Token,
    /// A TLS client certificate whose name is the user's.
    Certificate,
}

/// Who a client is: a configured user, or anonymous.
#[derive(Debug, Clone)]
pub struct Identity {
    name: Arc<str>,
    permissions: Arc<Permissions>,
    via: Via,
}

impl Identity {
    /// The user's name (`anonymous` without credentials).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How it was established.
    pub fn via(&self) -> Via {
        self.via
    }

    /// True when it came with no credentials.
    pub fn is_anonymous(&self) -> bool {
        self.via == Via::Anonymous
    }
}

/// A refused request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No credentials where they are needed, or bad ones: status 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// Known, but not allowed this operation: status 403.
    #[error("{0}")]
    Forbidden(String),
}

impl Denied {
    /// The status code: 401 or 403.
    pub fn code(&self) -> u16 {
        match self {
            Denied::Unauthenticated(_) => 401,
            Denied::Forbidden(_) => 403,
        }
    }
}

/// Who is served without credentials.
#[derive(Debug, Clone)]
enum AnonymousFrom {
    Everywhere,
    Networks(Vec<Network>),
}

/// The users, the anonymous policy and the login throttle of one server.
#[derive(Debug)]
pub struct Access {
    users: Users,
    /// The rules of clients without credentials: everything when no user is configured,
    /// else those of the `anonymous` entry (none if there is none).
    anonymous: Arc<Permissions>,
    anonymous_from: AnonymousFrom,
    throttle: Throttle,
}

impl Access {
    /// Access from settings: `users` (`[[users]]` entries), `anonymous_from` (CIDR ranges
    /// served without credentials; default loopback), and `allow_anonymous` (serve every
    /// address without credentials). The error names what is wrong.
    pub fn new(
        users: Vec<UserSpec>,
        anonymous_from: Option<Vec<String>>,
        allow_anonymous: bool,
    ) -> Result<Access, String> {
        let users = Users::new(users)?;
        let anonymous = if users.is_empty() {
            Permissions::everything()
        } else {
            users
                .get(ANONYMOUS)
                .map(|user| user.permissions.clone())
                .unwrap_or_default()
        };
        let anonymous_from = match (allow_anonymous, anonymous_from) {
            (true, _) => AnonymousFrom::Everywhere,
            (false, None) => AnonymousFrom::Networks(Network::loopback()),
            (false, Some(list)) => AnonymousFrom::Networks(
                list.iter()
                    .map(|n| Network::parse(n))
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(Access {
            users,
            anonymous: Arc::new(anonymous),
            anonymous_from,
            throttle: Throttle::default(),
        })
    }

    /// No users, everyone served without credentials (the embedded broker, tests).
    pub fn open() -> Access {
        Access {
            users: Users::default(),
            anonymous: Arc::new(Permissions::everything()),
            anonymous_from: AnonymousFrom::Everywhere,
            throttle: Throttle::default(),
        }
    }

    /// One line for the start-up log: which mode the server is in.
    pub fn mode(&self) -> String {
        match (&self.anonymous_from, self.users.is_empty()) {
            (AnonymousFrom::Everywhere, true) => {
                "open: no users configured and --allow-anonymous, so every client may do \
                 everything"
                    .into()
            }
            (AnonymousFrom::Networks(from), true) => format!(
                "protected: no users configured, clients from {} are served without \
                 credentials and all others refused (configure [[users]] or pass \
                 --allow-anonymous)",
                list(from)
            ),
            (from, false) => format!(
                "users: {} configured; clients without credentials get the rules of the \
                 \"anonymous\" entry ({}) from {}",
                self.users.len(),
                if self.users.get(ANONYMOUS).is_some() {
                    "present"
                } else {
                    "none: nothing allowed"
                },
                match from {
                    AnonymousFrom::Everywhere => "every address".to_owned(),
                    AnonymousFrom::Networks(from) => list(from),
                }
            ),
        }
    }

    /// True when no user is configured.
    pub fn has_users(&self) -> bool {
        !self.users.is_empty()
    }

    /// The identity of a peer without credentials: anonymous if its address is served
    /// without them (`None`, an in-process peer, always is), else none.
    pub fn anonymous(&self, ip: Option<IpAddr>) -> Option<Identity> {
        let served = match (&self.anonymous_from, ip) {
            (AnonymousFrom::Everywhere, _) | (_, None) => true,
            (AnonymousFrom::Networks(from), Some(ip)) => from.iter().any(|n| n.contains(ip)),
        };
        served.then(|| Identity {
            name: ANONYMOUS.into(),
            permissions: self.anonymous.clone(),
            via: Via::Anonymous,
        })
    }

    /// Logs `name` in with `password`. A bad pair is answered after a delay that grows
    /// with the failures from `ip` (see [`throttle`]). Without users, credentials are
    /// ignored (zbus clients send a token to every broker): the peer is anonymous where its
    /// address is served without credentials, else refused.
    pub async fn login_password(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        name: &str,
        password: &str,
    ) -> Result<Identity, Denied> {
        if let Some(without) = self.without_users(ip) {
            return without;
        }
        let access = self.clone();
        let (owned_name, owned_password) = (name.to_owned(), password.to_owned());
        // argon2 takes tens of milliseconds of CPU: not on a reactor thread.
        let user = tokio::task::spawn_blocking(move || {
            access.users.check_password(&owned_name, &owned_password)
        })
        .await
        .ok()
        .flatten();
        match user {
            Some(user) => Ok(self.logged_in(ip, user.name.clone(), &user, Via::Password)),
            None => Err(self
                .failed(ip, format!("bad user name or password for {name:?}"))
                .await),
        }
    }

    /// Logs in with a token.
    pub async fn login_token(&self, ip: Option<IpAddr>, token: &str) -> Result<Identity, Denied> {
        if let Some(without) = self.without_users(ip) {
            return without;
        }
        match self.users.by_token(token) {
            Some(user) => Ok(self.logged_in(ip, user.name.clone(), user, Via::Token)),
            None => Err(self.failed(ip, "unknown token".into()).await),
        }
    }

    /// The identity of a TLS client certificate whose name is `name`: the user of that
    /// name (a certificate proves the name, so no secret is asked). Without users the
    /// client CA is the whole policy: a certificate it signed is served as a peer from an
    /// address served without credentials would be.
    pub fn certificate(&self, name: &str) -> Result<Identity, Denied> {
        if self.users.is_empty() {
            return Ok(Identity {
                name: name.into(),
                permissions: self.anonymous.clone(),
                via: Via::Certificate,
            });
        }
        let user = self.users.get(name).ok_or_else(|| {
            Denied::Unauthenticated(format!(
                "the client certificate's name {name:?} is not a configured user"
            ))
        })?;
        Ok(Identity {
            name: user.name.clone(),
            permissions: Arc::new(user.permissions.clone()),
            via: Via::Certificate,
        })
    }

    /// What a login comes to on a server without users.
    fn without_users(&self, ip: Option<IpAddr>) -> Option<Result<Identity, Denied>> {
        self.users.is_empty().then(|| {
            self.anonymous(ip)
                .ok_or_else(|| Denied::Unauthenticated(self.refusal("log in")))
        })
    }

    fn logged_in(
        &self,
        ip: Option<IpAddr>,
        name: Arc<str>,
        user: &users::User,
        via: Via,
    ) -> Identity {
        if let Some(ip) = ip {
            self.throttle.succeeded(ip);
        }
        Identity {
            name,
            permissions: Arc::new(user.permissions.clone()),
            via,
        }
    }

    async fn failed(&self, ip: Option<IpAddr>, message: String) -> Denied {
        if let Some(ip) = ip {
            let wait = self.throttle.failed(ip);
            tracing::warn!(%ip, ?wait, "{message}");
            tokio::time::sleep(wait).await;
        }
        Denied::Unauthenticated(message)
    }

    /// May `who` do `op` on `mq` (in `group`, for consuming)? `None` is a peer without
    /// credentials from an address not served without them.
    pub fn check(
        &self,
        who: Option<&Identity>,
        op: Operation,
        mq: &str,
        group: Option<&str>,
    ) -> Result<(), Denied> {
        if who.is_some_and(|who| who.permissions.allows(op, mq, group)) {
            return Ok(());
        }
        // Only a refusal pays for its message: the check runs on every request.
        let what = describe(op, mq, group);
        match who {
            Some(who) if !who.is_anonymous() => Err(Denied::Forbidden(format!(
                "user {:?} may not {what}",
                who.name()
            ))),
            Some(_) => Err(Denied::Unauthenticated(format!(
                "credentials required to {what}: clients without them may not (log in with \
                 a user name and password or a token)"
            ))),
            None => Err(Denied::Unauthenticated(self.refusal(&what))),
        }
    }

    /// May `who` do `op` on some MQ? For requests that name none (an RPC reply's route
    /// stands for its MQ).
    pub fn check_some(&self, who: Option<&Identity>, op: Operation) -> Result<(), Denied> {
        match who {
            Some(id) if id.permissions.allows_some(op) => Ok(()),
            _ => self.check(who, op, "", None),
        }
    }

    /// May `who` see lists (of MQs, stats), filtered to what it may read? A user may;
    /// anonymous only if it may read something.
    pub fn check_lists(&self, who: Option<&Identity>) -> Result<(), Denied> {
        match who {
            Some(id) if !id.is_anonymous() => Ok(()),
            _ => self.check_some(who, Operation::Read),
        }
    }

    /// True when `who` may do anything with `mq` (to filter a topology to what a client may
    /// use).
    pub fn may_use(&self, who: Option<&Identity>, mq: &str) -> bool {
        Operation::ALL
            .iter()
            .any(|&op| op != Operation::Register && self.allows(who, op, mq))
    }

    /// True when `who` may do `op` on `mq` (to filter lists).
    pub fn allows(&self, who: Option<&Identity>, op: Operation, mq: &str) -> bool {
        who.is_some_and(|who| who.permissions.allows(op, mq, None))
    }

    /// Why a peer without credentials from an address outside `anonymous-from` is refused.
    fn refusal(&self, what: &str) -> String {
        let from = match &self.anonymous_from {
            AnonymousFrom::Networks(from) => list(from),
            AnonymousFrom::Everywhere => "every address".into(),
        };
        if self.users.is_empty() {
            format!(
                "refused to {what}: this server is in protected mode (no users configured), \
                 so only clients from {from} are served without credentials; configure users \
                 ([[users]] in the settings file, README \"Security\"), widen anonymous-from, \
                 or start the server with --allow-anonymous"
            )
        } else {
            format!(
                "credentials required to {what}: clients without them are served only from \
                 {from} (log in with a user name and password or a token)"
            )
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// What a request asks, in words, with the permission it needs.
fn describe(op: Operation, mq: &str, group: Option<&str>) -> String {
    let what = match (op, group) {
        (Operation::Register, _) if mq.is_empty() => "register a node".to_owned(),
        (Operation::Register, _) => format!("register node {mq:?}"),
        (Operation::Read, _) if mq.is_empty() => "read the list of MQs".to_owned(),
        (Operation::RpcServe, _) if mq.is_empty() => "serve RPC (route a reply)".to_owned(),
        (Operation::Produce, _) => format!("produce to MQ {mq:?}"),
        (Operation::Consume, Some(group)) => format!("consume from MQ {mq:?} in group {group:?}"),
        (Operation::Consume, None) => format!("consume from MQ {mq:?}"),
        (Operation::Admin, _) => format!("administer MQ {mq:?}"),
        (Operation::RpcServe, _) => format!("serve RPC on MQ {mq:?}"),
        (Operation::RpcCall, _) => format!("call RPC on MQ {mq:?}"),
        (Operation::Read, _) => format!("read MQ {mq:?}"),
    };
    format!("{what} (permission \"{op}\")")
}

fn list(networks: &[Network]) -> String {
    networks
        .iter()
        .map(Network::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, allow: &[&str], deny: &[&str]) -> UserSpec {
        UserSpec {
            name: name.into(),
            secret: Some(hash_secret("pw").unwrap()),
            tokens: Vec::new(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn users_anonymous_and_refusals() {
        let access = Arc::new(
            Access::new(
                vec![user(
                    "app",
                    &["produce orders*"],
                    &["produce orders.secret"],
                )],
                None,
                false,
            )
            .unwrap(),
        );
        let local = Some(IpAddr::from([127, 0, 0, 1]));
        let app = access.login_password(local, "app", "pw").await.unwrap();
        assert_eq!(app.name(), "app");
        access
            .check(Some(&app), Operation::Produce, "orders", None)
            .unwrap();
        let denied = access
            .check(Some(&app), Operation::Produce, "orders.secret", None)
            .unwrap_err();
        assert_eq!(denied.code(), 403);
        assert!(denied.to_string().contains("\"orders.secret\""), "{denied}");
        let bad = access
            .login_password(local, "app", "nope")
            .await
            .unwrap_err();
        assert_eq!(bad.code(), 401);
        // With users, anonymous has no rules of its own: refused with 401.
        let anonymous = access.anonymous(local).unwrap();
        let denied = access
            .check(Some(&anonymous), Operation::Produce, "orders", None)
            .unwrap_err();
        assert_eq!(denied.code(), 401);
        assert!(access.anonymous(Some([10, 1, 1, 1].into())).is_none());
    }

    #[test]
    fn protected_mode_names_the_way_out() {
        let access = Access::new(Vec::new(), Some(vec!["127.0.0.1/32".into()]), false).unwrap();
        assert!(access.anonymous(Some([127, 0, 0, 1].into())).is_some());
        assert!(access.anonymous(Some([127, 0, 0, 2].into())).is_none());
        let denied = access
            .check(None, Operation::Admin, "orders", None)
            .unwrap_err();
        assert_eq!(denied.code(), 401);
        let message = denied.to_string();
        assert!(
            message.contains("--allow-anonymous") && message.contains("127.0.0.1/32"),
            "{message}"
        );
        assert!(access.mode().starts_with("protected"));
        let open = Access::new(Vec::new(), None, true).unwrap();
        assert!(open.anonymous(Some([10, 0, 0, 1].into())).is_some());
    }
}
