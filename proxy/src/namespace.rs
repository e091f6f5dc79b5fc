//! Mailbox names: Cyrus's internal form (what MUPDATE and the replica hold)
//! against what a logged-in user sees, after Cyrus's `imap/mboxname.c`.
//!
//! Internally the separator is always `.`, a user's mailboxes live under
//! `user.<name>` and, with virtual domains, a name may start with
//! `domain!`. With `unixhierarchysep` the user sees `/` as separator and a
//! `.` inside a component is stored as `^`. With `altnamespace` the user's
//! own folders sit at the top level and other users and shared folders
//! under the `Other Users` and `Shared Folders` prefixes.
//!
//! Only what a non-admin sees is modelled: no `DELETED.` names, no
//! cross-domain access, and no `Alt Folders` prefix (personal folders whose
//! names collide with a prefix are not shown, see [`Namespace::to_external`]).

use thiserror::Error;

/// Internal prefix of users' mailboxes.
const USER_PREFIX: &str = "user";
/// Internal prefix of delayed-deleted mailboxes, never shown to users.
const DELETED_PREFIX: &str = "DELETED";
/// altnamespace prefix of other users' mailboxes (Cyrus `userprefix`).
const OTHER_USERS: &str = "Other Users";
/// altnamespace prefix of shared mailboxes (Cyrus `sharedprefix`).
const SHARED_FOLDERS: &str = "Shared Folders";

/// The namespace options, as in the backends' `imapd.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace {
    /// `unixhierarchysep`: `/` separates levels for clients.
    pub unixhierarchysep: bool,
    /// `altnamespace`: personal folders at the top level.
    pub altnamespace: bool,
    /// `virtdomains`: `user@domain` owns `domain!user.user`.
    pub virtdomains: bool,
    /// `defaultdomain`: users in it (or without a domain) have no prefix.
    pub defaultdomain: Option<String>,
}

/// Why a name cannot be mapped.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The name is empty.
    #[error("empty mailbox name")]
    Empty,
    /// Two separators in a row, or one at the start or end.
    #[error("empty level in mailbox name")]
    EmptyComponent,
    /// A control character, or one that would not map back unchanged.
    #[error("invalid character in mailbox name")]
    BadCharacter,
    /// `user` (or `Other Users`, `Shared Folders`) without a name after it.
    #[error("mailbox name incomplete after prefix")]
    MissingName,
    /// The login name cannot own mailboxes in this namespace.
    #[error("invalid user name for mailbox names")]
    BadUser,
}

/// A login name split the way Cyrus stores it.
struct User {
    /// Local part in internal form (`.` as `^` with unixhierarchysep).
    local: String,
    /// Domain, None when absent or the default domain.
    domain: Option<String>,
}

impl Namespace {
    /// `/` with unixhierarchysep, else `.`.
    pub fn separator(&self) -> char {
        if self.unixhierarchysep {
            '/'
        } else {
            '.'
        }
    }

    fn user(&self, user: &str) -> Result<User, NameError> {
        let (local, domain) = match user.rfind('@') {
            Some(at) if self.virtdomains => (&user[..at], Some(&user[at + 1..])),
            _ => (user, None),
        };
        if local.is_empty() || domain == Some("") {
            return Err(NameError::BadUser);
        }
        let bad = |c: char| {
            c.is_control()
                || matches!(c, '!' | '*' | '%')
                || (self.unixhierarchysep && matches!(c, '^' | '/'))
                || (!self.unixhierarchysep && c == '.')
        };
        if local.chars().any(bad)
            || domain.is_some_and(|d| d.chars().any(|c| c.is_control() || c == '!'))
        {
            return Err(NameError::BadUser);
        }
        let domain = domain
            .filter(|d| {
                !self
                    .defaultdomain
                    .as_deref()
                    .is_some_and(|dd| dd.eq_ignore_ascii_case(d))
            })
            .map(str::to_string);
        Ok(User {
            local: self.component_to_internal(local),
            domain,
        })
    }

    fn component_to_internal(&self, c: &str) -> String {
        if self.unixhierarchysep {
            c.replace('.', "^")
        } else {
            c.to_string()
        }
    }

    fn component_to_external(&self, c: &str) -> String {
        if self.unixhierarchysep {
            c.replace('^', ".")
        } else {
            c.to_string()
        }
    }

    /// Internal name of the INBOX of `user` (e.g. `user.alice`,
    /// `user.alice^smith` for `alice.smith` with unixhierarchysep,
    /// `example.com!user.alice` for alice@example.com with virtdomains when
    /// example.com is not the defaultdomain).
    pub fn inbox(&self, user: &str) -> Result<String, NameError> {
        let user = self.user(user)?;
        Ok(internal(&user.domain, &[USER_PREFIX, &user.local]))
    }

    /// The name a client typed (already unquoted) → Cyrus internal name, for
    /// `user` logged in. A trailing separator (allowed by CREATE) is the
    /// caller's to strip.
    pub fn to_internal(&self, user: &str, external: &str) -> Result<String, NameError> {
        let owner = self.user(user)?;
        if external.is_empty() {
            return Err(NameError::Empty);
        }
        // `^` would come back as `.`, and `!` would be read as a domain.
        let bad = |c: char| {
            c.is_control() || (self.unixhierarchysep && c == '^') || (self.virtdomains && c == '!')
        };
        if external.chars().any(bad) {
            return Err(NameError::BadCharacter);
        }
        let parts: Vec<String> = external
            .split(self.separator())
            .map(|c| self.component_to_internal(c))
            .collect();
        if parts.iter().any(String::is_empty) {
            return Err(NameError::EmptyComponent);
        }
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let personal = |rest: &[&str]| {
            let mut all = vec![USER_PREFIX, owner.local.as_str()];
            all.extend_from_slice(rest);
            internal(&owner.domain, &all)
        };
        let first = parts[0];
        if !self.altnamespace {
            if first.eq_ignore_ascii_case("INBOX") {
                return Ok(personal(&parts[1..]));
            }
            if first == USER_PREFIX && parts.len() < 2 {
                return Err(NameError::MissingName);
            }
            // `user.bob.x` and shared names are the same inside and out.
            return Ok(internal(&owner.domain, &parts));
        }
        if first == OTHER_USERS || first == SHARED_FOLDERS {
            if parts.len() < 2 {
                return Err(NameError::MissingName);
            }
            if first == OTHER_USERS {
                let mut all = vec![USER_PREFIX];
                all.extend_from_slice(&parts[1..]);
                return Ok(internal(&owner.domain, &all));
            }
            return Ok(internal(&owner.domain, &parts[1..]));
        }
        if first.eq_ignore_ascii_case("INBOX") {
            if parts.len() == 1 {
                return Ok(personal(&[]));
            }
            // Cyrus keeps INBOX's children under a box named INBOX.
            let mut rest = vec!["INBOX"];
            rest.extend_from_slice(&parts[1..]);
            return Ok(personal(&rest));
        }
        Ok(personal(&parts))
    }

    /// Internal → what `user` sees; None if the user cannot see it in this
    /// namespace (another domain, a deleted mailbox, a malformed name, or a
    /// name that would read back as something else, such as a shared
    /// `inbox` or, with altnamespace, a personal folder called `Other
    /// Users`).
    pub fn to_external(&self, user: &str, internal_name: &str) -> Option<String> {
        let owner = self.user(user).ok()?;
        if internal_name.chars().any(char::is_control) {
            return None;
        }
        let (domain, rest) = match internal_name.split_once('!') {
            Some((d, rest)) if self.virtdomains => (Some(d), rest),
            _ => (None, internal_name),
        };
        let domain = domain.filter(|d| {
            !self
                .defaultdomain
                .as_deref()
                .is_some_and(|dd| dd.eq_ignore_ascii_case(d))
        });
        let same_domain = match (domain, owner.domain.as_deref()) {
            (None, None) => true,
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        };
        if !same_domain {
            return None;
        }
        let parts: Vec<&str> = rest.split('.').collect();
        let sep = self.separator();
        if parts.iter().any(|p| p.is_empty() || p.contains(sep)) || parts[0] == DELETED_PREFIX {
            return None;
        }
        let ext: Vec<String> = parts
            .iter()
            .map(|p| self.component_to_external(p))
            .collect();
        let join = |prefix: &str, items: &[String]| {
            let mut out = prefix.to_string();
            for item in items {
                if !out.is_empty() {
                    out.push(sep);
                }
                out.push_str(item);
            }
            out
        };
        if parts[0] == USER_PREFIX {
            if parts.len() < 2 {
                return None;
            }
            if parts[1] != owner.local {
                let prefix = if self.altnamespace {
                    OTHER_USERS
                } else {
                    USER_PREFIX
                };
                return Some(join(prefix, &ext[1..]));
            }
            let boxes = &ext[2..];
            if !self.altnamespace {
                return Some(join("INBOX", boxes));
            }
            return match boxes.first().map(String::as_str) {
                None => Some("INBOX".to_string()),
                // Only INBOX's children: a lone `INBOX` box would read back
                // as the INBOX itself.
                Some("INBOX") if boxes.len() > 1 => Some(join("", boxes)),
                Some(first)
                    if first.eq_ignore_ascii_case("INBOX")
                        || first == OTHER_USERS
                        || first == SHARED_FOLDERS =>
                {
                    None
                }
                Some(_) => Some(join("", boxes)),
            };
        }
        if self.altnamespace {
            return Some(join(SHARED_FOLDERS, &ext));
        }
        if parts[0].eq_ignore_ascii_case("INBOX") {
            return None;
        }
        Some(join("", &ext))
    }

    /// Body of the NAMESPACE response, e.g. `(("INBOX." ".")) (("user." "."))
    /// (("" "."))`.
    pub fn namespace_response(&self) -> String {
        let s = self.separator();
        if self.altnamespace {
            format!("((\"\" \"{s}\")) ((\"{OTHER_USERS}{s}\" \"{s}\")) ((\"{SHARED_FOLDERS}{s}\" \"{s}\"))")
        } else {
            format!("((\"INBOX{s}\" \"{s}\")) ((\"{USER_PREFIX}{s}\" \"{s}\")) ((\"\" \"{s}\"))")
        }
    }
}

/// `domain!a.b.c` from internal components.
fn internal(domain: &Option<String>, parts: &[&str]) -> String {
    let mut out = String::new();
    if let Some(d) = domain {
        out.push_str(d);
        out.push('!');
    }
    out.push_str(&parts.join("."));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn plain() -> Namespace {
        Namespace::default()
    }

    fn unix() -> Namespace {
        Namespace {
            unixhierarchysep: true,
            ..Namespace::default()
        }
    }

    fn alt() -> Namespace {
        Namespace {
            altnamespace: true,
            ..Namespace::default()
        }
    }

    fn virt() -> Namespace {
        Namespace {
            virtdomains: true,
            defaultdomain: Some("default.org".into()),
            ..Namespace::default()
        }
    }

    fn both_ways(ns: &Namespace, user: &str, external: &str, internal: &str) {
        assert_eq!(
            ns.to_internal(user, external).as_deref(),
            Ok(internal),
            "to_internal({user}, {external})"
        );
        assert_eq!(
            ns.to_external(user, internal).as_deref(),
            Some(external),
            "to_external({user}, {internal})"
        );
    }

    #[test]
    fn default_namespace() {
        let ns = plain();
        assert_eq!(ns.separator(), '.');
        assert_eq!(ns.inbox("alice").unwrap(), "user.alice");
        both_ways(&ns, "alice", "INBOX", "user.alice");
        both_ways(&ns, "alice", "INBOX.Sent", "user.alice.Sent");
        both_ways(&ns, "alice", "INBOX.a/b.c d", "user.alice.a/b.c d");
        both_ways(&ns, "alice", "user.bob", "user.bob");
        both_ways(&ns, "alice", "user.bob.Trash", "user.bob.Trash");
        both_ways(&ns, "alice", "shared.x", "shared.x");
        both_ways(&ns, "alice", "Public", "Public");
        both_ways(&ns, "alice", "&AOk-t&AOk-", "&AOk-t&AOk-");
        for inbox in ["inbox", "Inbox", "iNbOx"] {
            assert_eq!(ns.to_internal("alice", inbox).unwrap(), "user.alice");
            assert_eq!(
                ns.to_internal("alice", &format!("{inbox}.Sent")).unwrap(),
                "user.alice.Sent"
            );
        }
        // `user.alice` typed by alice herself is her INBOX.
        assert_eq!(
            ns.to_internal("alice", "user.alice.x").unwrap(),
            "user.alice.x"
        );
        assert_eq!(ns.to_external("alice", "user.alice.x").unwrap(), "INBOX.x");
        // Names that cannot be typed.
        assert_eq!(ns.to_internal("alice", ""), Err(NameError::Empty));
        for bad in ["INBOX.", ".x", "a..b", "INBOX.."] {
            assert_eq!(
                ns.to_internal("alice", bad),
                Err(NameError::EmptyComponent),
                "{bad}"
            );
        }
        for bad in ["a\0b", "a\rb", "a\nb", "a\x7fb"] {
            assert_eq!(ns.to_internal("alice", bad), Err(NameError::BadCharacter));
        }
        assert_eq!(ns.to_internal("alice", "user"), Err(NameError::MissingName));
        // A dot in a login name cannot be stored without unixhierarchysep.
        assert_eq!(ns.inbox("alice.smith"), Err(NameError::BadUser));
        assert_eq!(ns.inbox(""), Err(NameError::BadUser));
        // Names that cannot be shown.
        for hidden in [
            "user",
            "inbox",
            "INBOX.x",
            "DELETED.user.bob.4F0A",
            "a..b",
            "",
            "a\nb",
        ] {
            assert_eq!(ns.to_external("alice", hidden), None, "{hidden}");
        }
        // Without virtdomains `!` and `@` are ordinary characters.
        both_ways(&ns, "alice", "a!b@c", "a!b@c");
        assert_eq!(ns.inbox("bob@example").unwrap(), "user.bob@example");
        assert_eq!(
            ns.namespace_response(),
            r#"(("INBOX." ".")) (("user." ".")) (("" "."))"#
        );
    }

    #[test]
    fn unix_hierarchy_separator() {
        let ns = unix();
        assert_eq!(ns.separator(), '/');
        assert_eq!(ns.inbox("alice").unwrap(), "user.alice");
        assert_eq!(ns.inbox("alice.smith").unwrap(), "user.alice^smith");
        both_ways(&ns, "alice", "INBOX", "user.alice");
        both_ways(&ns, "alice", "INBOX/Sent", "user.alice.Sent");
        both_ways(&ns, "alice", "INBOX/a.b/c", "user.alice.a^b.c");
        both_ways(&ns, "alice.smith", "INBOX", "user.alice^smith");
        both_ways(&ns, "alice.smith", "INBOX/x.y", "user.alice^smith.x^y");
        both_ways(&ns, "alice", "user/bob.smith/x", "user.bob^smith.x");
        both_ways(&ns, "alice", "user/bob", "user.bob");
        both_ways(&ns, "alice", "shared/v1.2", "shared.v1^2");
        both_ways(&ns, "alice", "a.b", "a^b");
        assert_eq!(
            ns.to_internal("alice", "inbox/Sent").unwrap(),
            "user.alice.Sent"
        );
        assert_eq!(ns.to_internal("alice", "Inbox").unwrap(), "user.alice");
        assert_eq!(ns.to_internal("alice", "a^b"), Err(NameError::BadCharacter));
        assert_eq!(
            ns.to_internal("alice", "INBOX/"),
            Err(NameError::EmptyComponent)
        );
        assert_eq!(
            ns.to_internal("alice", "/x"),
            Err(NameError::EmptyComponent)
        );
        assert_eq!(
            ns.to_internal("alice", "user/"),
            Err(NameError::EmptyComponent)
        );
        assert_eq!(ns.to_internal("alice", "user"), Err(NameError::MissingName));
        assert_eq!(ns.inbox("bob@example.com").unwrap(), "user.bob@example^com");
        assert_eq!(ns.inbox("a/b"), Err(NameError::BadUser));
        assert_eq!(ns.inbox("a^b"), Err(NameError::BadUser));
        // An internal `/` would show up as a separator.
        assert_eq!(ns.to_external("alice", "user.alice.a/b"), None);
        assert_eq!(ns.to_external("alice", "INBOX"), None);
        assert_eq!(
            ns.namespace_response(),
            r#"(("INBOX/" "/")) (("user/" "/")) (("" "/"))"#
        );
    }

    #[test]
    fn alt_namespace() {
        let ns = alt();
        both_ways(&ns, "alice", "INBOX", "user.alice");
        both_ways(&ns, "alice", "Sent", "user.alice.Sent");
        both_ways(&ns, "alice", "Work.2024", "user.alice.Work.2024");
        both_ways(&ns, "alice", "INBOX.x", "user.alice.INBOX.x");
        both_ways(&ns, "alice", "Other Users.bob", "user.bob");
        both_ways(&ns, "alice", "Other Users.bob.x", "user.bob.x");
        both_ways(&ns, "alice", "Shared Folders.x", "x");
        // A shared `user` would read back as the users' prefix.
        assert_eq!(ns.to_external("alice", "user"), None);
        assert_eq!(ns.to_internal("alice", "inbox").unwrap(), "user.alice");
        assert_eq!(
            ns.to_internal("alice", "inbox.x").unwrap(),
            "user.alice.INBOX.x"
        );
        assert_eq!(
            ns.to_internal("alice", "user.bob").unwrap(),
            "user.alice.user.bob"
        );
        assert_eq!(
            ns.to_internal("alice", "Other Users"),
            Err(NameError::MissingName)
        );
        assert_eq!(
            ns.to_internal("alice", "Shared Folders"),
            Err(NameError::MissingName)
        );
        for hidden in [
            "user.alice.INBOX",
            "user.alice.inbox.x",
            "user.alice.Other Users",
        ] {
            assert_eq!(ns.to_external("alice", hidden), None, "{hidden}");
        }
        assert_eq!(
            ns.namespace_response(),
            r#"(("" ".")) (("Other Users." ".")) (("Shared Folders." "."))"#
        );
        let ns = Namespace {
            unixhierarchysep: true,
            ..alt()
        };
        both_ways(&ns, "alice.s", "Sent/a.b", "user.alice^s.Sent.a^b");
        both_ways(&ns, "alice", "Other Users/bob.s/x", "user.bob^s.x");
        assert_eq!(
            ns.namespace_response(),
            r#"(("" "/")) (("Other Users/" "/")) (("Shared Folders/" "/"))"#
        );
    }

    #[test]
    fn virtual_domains() {
        let ns = virt();
        assert_eq!(
            ns.inbox("alice@example.com").unwrap(),
            "example.com!user.alice"
        );
        assert_eq!(ns.inbox("alice@default.org").unwrap(), "user.alice");
        assert_eq!(ns.inbox("alice").unwrap(), "user.alice");
        assert_eq!(ns.inbox("alice@"), Err(NameError::BadUser));
        assert_eq!(ns.inbox("@example.com"), Err(NameError::BadUser));
        both_ways(
            &ns,
            "alice@example.com",
            "INBOX.Sent",
            "example.com!user.alice.Sent",
        );
        both_ways(&ns, "alice@example.com", "user.bob", "example.com!user.bob");
        both_ways(&ns, "alice@example.com", "shared", "example.com!shared");
        both_ways(
            &ns,
            "alice@example.com",
            "INBOX.a@b",
            "example.com!user.alice.a@b",
        );
        both_ways(&ns, "alice@default.org", "INBOX", "user.alice");
        both_ways(&ns, "alice", "user.bob", "user.bob");
        // Other domains are invisible, whichever side the user is on.
        assert_eq!(
            ns.to_external("alice@example.com", "other.com!user.bob"),
            None
        );
        assert_eq!(ns.to_external("alice@example.com", "user.bob"), None);
        assert_eq!(ns.to_external("alice", "example.com!user.bob"), None);
        assert_eq!(
            ns.to_external("alice@EXAMPLE.com", "example.com!user.alice")
                .unwrap(),
            "INBOX"
        );
        // Same local part, other domain: another user.
        assert_eq!(
            ns.to_external("alice@example.com", "example.com!user.alice"),
            Some("INBOX".into())
        );
        assert_eq!(
            ns.to_internal("alice@example.com", "x!y"),
            Err(NameError::BadCharacter)
        );
    }

    /// `to_internal(u, to_external(u, n)?) == n` for random internal names,
    /// in every combination of options.
    #[test]
    fn round_trip() {
        let mut rng = StdRng::seed_from_u64(42);
        let words = [
            "user",
            "alice",
            "bob",
            "INBOX",
            "inbox",
            "Sent",
            "a^b",
            "x/y",
            "Other Users",
            "Shared Folders",
            "DELETED",
            "&AOk-",
            "a b",
            "q@r",
        ];
        let users = [
            "alice",
            "bob",
            "alice@example.com",
            "alice.smith",
            "carol@default.org",
        ];
        for flags in 0..8 {
            let ns = Namespace {
                unixhierarchysep: flags & 1 != 0,
                altnamespace: flags & 2 != 0,
                virtdomains: flags & 4 != 0,
                defaultdomain: Some("default.org".into()),
            };
            let mut shown = 0;
            for _ in 0..3000 {
                let n = rng.gen_range(1..5);
                let mut name = (0..n)
                    .map(|_| words[rng.gen_range(0..words.len())])
                    .collect::<Vec<_>>()
                    .join(".");
                if rng.gen_bool(0.2) {
                    name = format!("example.com!{name}");
                }
                let user = users[rng.gen_range(0..users.len())];
                if let Some(external) = ns.to_external(user, &name) {
                    shown += 1;
                    assert_eq!(
                        ns.to_internal(user, &external).as_deref(),
                        Ok(name.as_str()),
                        "{ns:?} {user} {name} -> {external}"
                    );
                }
            }
            assert!(shown > 300, "{ns:?}: only {shown} names shown");
        }
    }
}
