//! Mailbox list files, pure (text in, entries out): JSON lines, one entry
//! per line, and the JSON object Cyrus 3.6's `ctl_mboxlist -d` prints.
//! (Cyrus 3.6.1's `ctl_mboxlist -u` refuses entries without a `uniqueid`,
//! which a master's own dump lacks too, so such a dump goes back into a
//! registry with `corvidctl load`, not into a Cyrus master.)
//!
//! A Cyrus dump names every mailbox once, with its `mbtype` letters: `r`
//! remote (a master's entry; `server` then names the backend), `z`
//! reserved, `d` a tombstone a backend keeps for a deleted name, `i` an
//! intermediate. Tombstones and intermediates are not mailboxes the
//! registry holds and are skipped. A backend's own dump has no `server`:
//! the caller names the backend.

use std::fmt;
use std::io::Write;

use clap::ValueEnum;
use corvid_registry::model::{MailboxEntry, MailboxState};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

/// Longest JSON line accepted (a mailbox name and its ACL).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A mailbox list file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per line: name, location, acl, state.
    Jsonl,
    /// The JSON object of Cyrus's `ctl_mboxlist -d`.
    Cyrus,
}

/// Why a list could not be read.
#[derive(Debug, Error)]
pub enum ListError {
    /// A JSON line is not an entry.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
    },
    /// The Cyrus dump is not the JSON object `ctl_mboxlist -d` prints.
    #[error("not a ctl_mboxlist -d dump: {0}")]
    Cyrus(String),
    /// A Cyrus entry has no server and none was given.
    #[error("{0}: the dump names no server (a backend's own dump): give --backend NAME")]
    NoServer(String),
}

/// One line of the JSON lines format.
#[derive(Debug, Serialize, Deserialize)]
struct JsonLine {
    name: String,
    location: String,
    #[serde(default)]
    acl: String,
    #[serde(default = "active")]
    state: JsonState,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum JsonState {
    Active,
    Reserved,
}

fn active() -> JsonState {
    JsonState::Active
}

/// Guesses the format: a Cyrus dump is one JSON object whose first key
/// names a mailbox, JSON lines start with `{"name"`.
pub fn detect(text: &str) -> Format {
    let t = text.trim_start();
    if t.starts_with("{\"name\"") || t.is_empty() {
        Format::Jsonl
    } else {
        Format::Cyrus
    }
}

/// Reads `text` in `format`; `server` is the backend a Cyrus dump without
/// `server` fields comes from. Entries keep the file's order.
pub fn parse(
    text: &str,
    format: Format,
    server: Option<&str>,
) -> Result<Vec<MailboxEntry>, ListError> {
    match format {
        Format::Jsonl => parse_jsonl(text),
        Format::Cyrus => parse_cyrus(text, server),
    }
}

fn parse_jsonl(text: &str) -> Result<Vec<MailboxEntry>, ListError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |reason: String| ListError::Line {
            line: i + 1,
            reason,
        };
        if line.len() > MAX_LINE_BYTES {
            return Err(err(format!("longer than {MAX_LINE_BYTES} bytes")));
        }
        if line.trim().is_empty() {
            continue;
        }
        let l: JsonLine = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
        if l.name.is_empty() || l.location.is_empty() {
            return Err(err("empty name or location".into()));
        }
        out.push(MailboxEntry {
            name: l.name,
            location: l.location,
            acl: l.acl,
            state: match l.state {
                JsonState::Active => MailboxState::Active,
                JsonState::Reserved => MailboxState::Reserved,
            },
            last_change: 0,
        });
    }
    Ok(out)
}

/// Writes `entries` as JSON lines.
pub fn write_jsonl(out: &mut impl Write, entries: &[MailboxEntry]) -> std::io::Result<()> {
    for e in entries {
        let line = JsonLine {
            name: e.name.clone(),
            location: e.location.clone(),
            acl: e.acl.clone(),
            state: match e.state {
                MailboxState::Active => JsonState::Active,
                MailboxState::Reserved => JsonState::Reserved,
            },
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// One entry of a Cyrus dump; fields the registry does not hold are ignored.
#[derive(Debug, Deserialize)]
struct CyrusRecord {
    name: Option<String>,
    #[serde(default)]
    mbtype: String,
    #[serde(default)]
    partition: String,
    server: Option<String>,
    #[serde(default)]
    acl: CyrusAcl,
}

/// A dump's ACL object, in its order, as the MUPDATE ACL string
/// (`identifier TAB rights TAB` repeated).
#[derive(Debug, Default)]
struct CyrusAcl(String);

impl<'de> Deserialize<'de> for CyrusAcl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CyrusAcl;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of identifier: rights")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CyrusAcl, A::Error> {
                let mut acl = String::new();
                while let Some((id, rights)) = map.next_entry::<String, String>()? {
                    acl.push_str(&id);
                    acl.push('\t');
                    acl.push_str(&rights);
                    acl.push('\t');
                }
                Ok(CyrusAcl(acl))
            }
        }
        d.deserialize_map(V)
    }
}

/// The whole dump, in document order.
struct CyrusDump(Vec<(String, CyrusRecord)>);

impl<'de> Deserialize<'de> for CyrusDump {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CyrusDump;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of mailbox name: entry")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<CyrusDump, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = map.next_entry::<String, CyrusRecord>()? {
                    out.push(e);
                }
                Ok(CyrusDump(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_cyrus(text: &str, server: Option<&str>) -> Result<Vec<MailboxEntry>, ListError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let dump: CyrusDump =
        serde_json::from_str(text).map_err(|e| ListError::Cyrus(e.to_string()))?;
    let mut out = Vec::with_capacity(dump.0.len());
    for (key, r) in dump.0 {
        if r.mbtype.contains('d') || r.mbtype.contains('i') {
            continue;
        }
        let name = r.name.unwrap_or(key);
        let Some(srv) = r.server.as_deref().or(server) else {
            return Err(ListError::NoServer(name));
        };
        if name.is_empty() {
            return Err(ListError::Cyrus("an entry has an empty name".into()));
        }
        out.push(MailboxEntry {
            location: format!("{srv}!{}", r.partition),
            acl: r.acl.0,
            state: if r.mbtype.contains('z') {
                MailboxState::Reserved
            } else {
                MailboxState::Active
            },
            name,
            last_change: 0,
        });
    }
    Ok(out)
}

/// Writes `entries` as a master's `ctl_mboxlist -d` would print them.
pub fn write_cyrus(out: &mut impl Write, entries: &[MailboxEntry]) -> std::io::Result<()> {
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    out.write_all(b"{\n")?;
    for (i, e) in entries.iter().enumerate() {
        let (server, partition) = e.location.split_once('!').unwrap_or((&e.location, ""));
        let mbtype = match e.state {
            MailboxState::Active => "er",
            MailboxState::Reserved => "erz",
        };
        let mut fields: Vec<_> = e.acl.split('\t').collect();
        if fields.last() == Some(&"") {
            fields.pop();
        }
        let acl = fields
            .chunks(2)
            .map(|p| format!("{}: {}", q(p[0]), q(p.get(1).copied().unwrap_or(""))))
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(
            out,
            "{}: {{\"name\": {}, \"mtime\": \"0\", \"uidvalidity\": \"0\", \"createdmodseq\": \"0\", \"foldermodseq\": \"0\", \"mbtype\": \"{mbtype}\", \"partition\": {}, \"server\": {}, \"acl\": {{{acl}}}, \"name_history\": []}}{}",
            q(&e.name),
            q(&e.name),
            q(partition),
            q(server),
            if i + 1 < entries.len() { "," } else { "" }
        )?;
    }
    out.write_all(b"}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Printed by Debian's Cyrus 3.6.1 `ctl_mboxlist -d` on a `mupdate -m`
    /// master (a reservation has `z`).
    const MASTER: &str = r#"{
"dom.com!user.x": {"name": "dom.com!user.x", "mtime": "1796029010", "uidvalidity": "0", "createdmodseq": "0", "foldermodseq": "0", "mbtype": "er", "partition": "default", "server": "be3", "acl": {"x": "lr"}, "name_history": []},
"shared": {"name": "shared", "mtime": "1796029004", "uidvalidity": "0", "createdmodseq": "0", "foldermodseq": "0", "mbtype": "er", "partition": "default", "server": "be1", "acl": {"anyone": "lrs", "bob": "lrs"}, "name_history": []},
"user.res": {"name": "user.res", "mtime": "1796029010", "uidvalidity": "0", "createdmodseq": "0", "foldermodseq": "0", "mbtype": "erz", "partition": "p2", "server": "be2", "acl": {}, "name_history": []}
}
"#;

    /// The same tool on a backend: no server, and a tombstone.
    const BACKEND: &str = r#"{
"shared": {"name": "shared", "mtime": "1796029004", "uidvalidity": "1796029005", "createdmodseq": "1", "foldermodseq": "2", "mbtype": "e", "partition": "default", "acl": {"anyone": "lrs", "bob": "lrs"}, "uniqueid": "vhqj3rrbywj063pk3yqia33e", "name_history": []},
"user.carol": {"name": "user.carol", "mtime": "1796029004", "uidvalidity": "1796029005", "createdmodseq": "1", "foldermodseq": "3", "mbtype": "ed", "acl": {}, "uniqueid": "l1xezo8gtsg9vkjixvm0wg4i", "name_history": []}
}
"#;

    fn e(name: &str, location: &str, acl: &str, state: MailboxState) -> MailboxEntry {
        MailboxEntry {
            name: name.into(),
            location: location.into(),
            acl: acl.into(),
            state,
            last_change: 0,
        }
    }

    #[test]
    fn reads_a_masters_dump_in_order_with_acl_order_kept() {
        assert_eq!(detect(MASTER), Format::Cyrus);
        let got = parse(MASTER, Format::Cyrus, None).unwrap();
        assert_eq!(
            got,
            vec![
                e(
                    "dom.com!user.x",
                    "be3!default",
                    "x\tlr\t",
                    MailboxState::Active
                ),
                e(
                    "shared",
                    "be1!default",
                    "anyone\tlrs\tbob\tlrs\t",
                    MailboxState::Active
                ),
                e("user.res", "be2!p2", "", MailboxState::Reserved),
            ]
        );
    }

    #[test]
    fn a_backends_dump_needs_its_name_and_skips_tombstones() {
        assert!(matches!(
            parse(BACKEND, Format::Cyrus, None),
            Err(ListError::NoServer(_))
        ));
        let got = parse(BACKEND, Format::Cyrus, Some("be1")).unwrap();
        assert_eq!(
            got,
            vec![e(
                "shared",
                "be1!default",
                "anyone\tlrs\tbob\tlrs\t",
                MailboxState::Active
            )]
        );
    }

    #[test]
    fn both_formats_round_trip() {
        let entries = parse(MASTER, Format::Cyrus, None).unwrap();
        let mut cyrus = Vec::new();
        write_cyrus(&mut cyrus, &entries).unwrap();
        let cyrus = String::from_utf8(cyrus).unwrap();
        assert_eq!(detect(&cyrus), Format::Cyrus);
        assert_eq!(parse(&cyrus, Format::Cyrus, None).unwrap(), entries);
        let mut jsonl = Vec::new();
        write_jsonl(&mut jsonl, &entries).unwrap();
        let jsonl = String::from_utf8(jsonl).unwrap();
        assert_eq!(detect(&jsonl), Format::Jsonl);
        assert_eq!(jsonl.lines().count(), 3);
        assert_eq!(parse(&jsonl, Format::Jsonl, None).unwrap(), entries);
        // Empty lists in both.
        assert!(parse("", Format::Jsonl, None).unwrap().is_empty());
        let mut empty = Vec::new();
        write_cyrus(&mut empty, &[]).unwrap();
        assert!(
            parse(std::str::from_utf8(&empty).unwrap(), Format::Cyrus, None)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for bad in [
            "{\"name\": 5}",
            "{\"name\": \"a\"}",
            "{\"name\": \"\", \"location\": \"be1!x\"}",
            "not json",
        ] {
            assert!(parse(bad, Format::Jsonl, None).is_err(), "{bad}");
        }
        for bad in [
            "[1,2]",
            "{\"a\": 5}",
            "{\"a\": {\"acl\": [1]}}",
            "{",
            "{\"\": {}}",
        ] {
            assert!(parse(bad, Format::Cyrus, Some("be1")).is_err(), "{bad}");
        }
        let long = format!("{{\"name\": \"{}\"}}", "a".repeat(MAX_LINE_BYTES));
        assert!(matches!(
            parse(&long, Format::Jsonl, None),
            Err(ListError::Line { line: 1, .. })
        ));
    }
}
