//! What a user may do: rules of operations on MQ name patterns (and, for consuming, on
//! group name patterns), written in the settings file as short strings:
//!
//! ```text
//! "produce,consume orders.*"        produce to and consume from MQs starting "orders."
//! "consume orders billing-*"        consume from "orders" in groups starting "billing-"
//! "admin,read *"                    create/remove MQs and groups, read stats, on every MQ
//! "rpc-call greeter"                call the RPC service served on MQ "greeter"
//! "register *"                      (trackers) report as a broker or RPC server
//! ```
//!
//! A pattern is `*` (everything), a prefix ending in `*`, or an exact name. A user's
//! `deny` rules win over its `allow` rules; what no rule allows is refused.

use std::fmt;

/// One operation a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Append messages to an MQ.
    Produce,
    /// Fetch, ack and nack an MQ's messages (in a group).
    Consume,
    /// Create and remove MQs, remove groups, set MQ options.
    Admin,
    /// Serve RPC on an MQ: take its calls (fetch, ack) and route replies.
    RpcServe,
    /// Call RPC on an MQ.
    RpcCall,
    /// Describe MQs, read stats and reply-table counters.
    Read,
    /// Report to a tracker as a broker or an RPC server.
    Register,
}

impl Operation {
    /// Every operation, in the order the docs list them.
    pub const ALL: [Operation; 7] = [
        Operation::Produce,
        Operation::Consume,
        Operation::Admin,
        Operation::RpcServe,
        Operation::RpcCall,
        Operation::Read,
        Operation::Register,
    ];

    /// The name used in rules and error messages.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Produce => "produce",
            Operation::Consume => "consume",
            Operation::Admin => "admin",
            Operation::RpcServe => "rpc-serve",
            Operation::RpcCall => "rpc-call",
            Operation::Read => "read",
            Operation::Register => "register",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Operation {
    type Err = String;

    fn from_str(s: &str) -> Result<Operation, String> {
        Operation::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Operation::ALL.iter().map(|op| op.name()).collect();
                format!("{s:?} is not an operation: use {}", names.join(", "))
            })
    }
}

/// A name pattern: `*`, a prefix ending in `*`, or an exact name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Every name.
    Any,
    /// Names starting with this.
    Prefix(String),
    /// This name only.
    Exact(String),
}

impl Pattern {
    /// Reads `*`, `prefix*` or `name`.
    pub fn parse(text: &str) -> Pattern {
        match text.strip_suffix('*') {
            Some("") => Pattern::Any,
            Some(prefix) => Pattern::Prefix(prefix.to_owned()),
            None => Pattern::Exact(text.to_owned()),
        }
    }

    /// True when `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Prefix(prefix) => name.starts_with(prefix.as_str()),
            Pattern::Exact(exact) => name == exact,
        }
    }
}

/// One rule: operations on MQs matching a pattern (and groups, for consume).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    ops: u8,
    mq: Pattern,
    group: Option<Pattern>,
}

impl Rule {
    /// Reads `"OP[,OP...] MQ-PATTERN [GROUP-PATTERN]"`.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (ops, mq, group) = match words.as_slice() {
            [ops, mq] => (ops, mq, None),
            [ops, mq, group] => (ops, mq, Some(Pattern::parse(group))),
            _ => {
                return Err(format!(
                    "rule {text:?} is not \"OPERATIONS MQ-PATTERN [GROUP-PATTERN]\", \
                     e.g. \"produce,consume orders.*\""
                ))
            }
        };
        let mut bits = 0;
        for op in ops.split(',') {
            bits |= op.parse::<Operation>()?.bit();
        }
        Ok(Rule {
            ops: bits,
            mq: Pattern::parse(mq),
            group,
        })
    }

    /// A rule granting everything on every MQ.
    pub fn everything() -> Rule {
        Rule {
            ops: u8::MAX,
            mq: Pattern::Any,
            group: None,
        }
    }

    fn matches(&self, op: Operation, mq: &str, group: Option<&str>) -> bool {
        self.ops & op.bit() != 0
            && self.mq.matches(mq)
            && match (&self.group, group) {
                (Some(pattern), Some(group)) => pattern.matches(group),
                _ => true,
            }
    }
}

/// A user's rules: allowed unless a deny rule matches, refused unless an allow rule does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

impl Permissions {
    /// Rules from their text forms; the error names the bad rule.
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Permissions, String> {
        let parse = |rules: &[String]| -> Result<Vec<Rule>, String> {
            rules.iter().map(|r| Rule::parse(r)).collect()
        };
        Ok(Permissions {
            allow: parse(allow)?,
            deny: parse(deny)?,
        })
    }

    /// Everything allowed (anonymous access to a broker without users).
    pub fn everything() -> Permissions {
        Permissions {
            allow: vec![Rule::everything()],
            deny: Vec::new(),
        }
    }

    /// True when `op` is allowed on some MQ (for requests that name none, like an RPC
    /// reply, whose route stands for its MQ).
    pub fn allows_some(&self, op: Operation) -> bool {
        let everywhere = |r: &Rule| r.ops & op.bit() != 0 && r.mq == Pattern::Any;
        !self.deny.iter().any(|r| everywhere(r) && r.group.is_none())
            && self.allow.iter().any(|r| r.ops & op.bit() != 0)
    }

    /// True when `op` on `mq` (in `group`, for consuming) is allowed.
    pub fn allows(&self, op: Operation, mq: &str, group: Option<&str>) -> bool {
        !self.deny.iter().any(|r| r.matches(op, mq, group))
            && self.allow.iter().any(|r| r.matches(op, mq, group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(allow: &[&str], deny: &[&str]) -> Permissions {
        let own = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Permissions::parse(&own(allow), &own(deny)).unwrap()
    }

    #[test]
    fn patterns() {
        assert!(Pattern::parse("*").matches("anything"));
        assert!(Pattern::parse("orders.*").matches("orders.eu"));
        assert!(!Pattern::parse("orders.*").matches("orders"));
        assert!(Pattern::parse("orders").matches("orders"));
        assert!(!Pattern::parse("orders").matches("orders2"));
    }

    #[test]
    fn deny_wins_and_nothing_is_allowed_by_default() {
        let p = rules(
            &["produce,consume orders.*", "read *"],
            &["consume orders.audit"],
        );
        assert!(p.allows(Operation::Produce, "orders.eu", None));
        assert!(p.allows(Operation::Consume, "orders.eu", Some("g")));
        assert!(!p.allows(Operation::Consume, "orders.audit", Some("g")));
        assert!(p.allows(Operation::Produce, "orders.audit", None));
        assert!(!p.allows(Operation::Admin, "orders.eu", None));
        assert!(!p.allows(Operation::Produce, "payments", None));
        assert!(p.allows(Operation::Read, "payments", None));
        assert!(!Permissions::default().allows(Operation::Read, "x", None));
    }

    #[test]
    fn group_patterns_limit_consuming() {
        let p = rules(&["consume orders billing-*"], &["consume * billing-test"]);
        assert!(p.allows(Operation::Consume, "orders", Some("billing-eu")));
        assert!(!p.allows(Operation::Consume, "orders", Some("shipping")));
        assert!(!p.allows(Operation::Consume, "orders", Some("billing-test")));
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        let err = Rule::parse("produce").unwrap_err();
        assert!(err.contains("OPERATIONS MQ-PATTERN"), "{err}");
        let err = Rule::parse("publish *").unwrap_err();
        assert!(err.contains("not an operation"), "{err}");
    }
}
