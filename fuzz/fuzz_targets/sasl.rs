//! SASL exchanges (PLAIN and SCRAM-SHA-256) against a credential file with
//! one user (`user`/`pencil`). Any client data must give a challenge, a
//! success or an error: never a panic.
//!
//! Input: `[flags, message\nmessage\n…]`. flags bit 0: SCRAM (else PLAIN);
//! bit 1: the first message is an initial response (else step with None
//! first); bit 2: lower-case mechanism name. In SCRAM messages after the
//! first, `%N` is replaced by the server's nonce and `%P` by the proof a
//! client knowing the password would send, so the fuzzer can reach the
//! exchange's later states.
#![no_main]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine;
use corvid_registry::auth::{CredentialStore, SaslServer, SaslStep, UserFile};
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

const PASSWORD: &str = "pencil";

fn server() -> &'static SaslServer {
    static SERVER: OnceLock<(tempfile::TempDir, SaslServer)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("users.toml");
            let mut users = UserFile::default();
            users.add("user", PASSWORD, false).expect("add user");
            users.add("admin", "secret", true).expect("add admin");
            users.save(&path).expect("save users");
            let store = Arc::new(CredentialStore::new(path));
            store.refresh().expect("users file loads");
            (dir, SaslServer::new(store))
        })
        .1
}

/// PBKDF2 is slow: remember salted passwords by (salt, iterations).
fn salted(salt: &[u8], iterations: u32) -> [u8; 32] {
    static CACHE: OnceLock<Mutex<HashMap<(Vec<u8>, u32), [u8; 32]>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap();
    if let Some(k) = cache.get(&(salt.to_vec(), iterations)) {
        return *k;
    }
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(PASSWORD.as_bytes(), salt, iterations, &mut out);
    if cache.len() < 1024 {
        cache.insert((salt.to_vec(), iterations), out);
    }
    out
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Fills `%N` and `%P` in a client-final message.
fn fill(message: &[u8], client_first: &[u8], server_first: &[u8]) -> Vec<u8> {
    let attr = |name: u8| {
        server_first
            .split(|&b| b == b',')
            .find(|p| p.len() >= 2 && p[0] == name && p[1] == b'=')
            .map(|p| p[2..].to_vec())
    };
    let nonce = attr(b'r').unwrap_or_default();
    let mut out = replace(message, b"%N", &nonce);
    if let Some(at) = find(&out, b"%P") {
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = attr(b's')
            .and_then(|s| b64.decode(s).ok())
            .unwrap_or_default();
        let iterations = attr(b'i')
            .and_then(|i| std::str::from_utf8(&i).ok()?.parse::<u32>().ok())
            .filter(|&i| (1..=10_000).contains(&i))
            .unwrap_or(1);
        let bare_at = client_first
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b',')
            .nth(1)
            .map_or(client_first.len(), |(i, _)| i + 1);
        let without_proof = out[..at].strip_suffix(b",p=").unwrap_or(&out[..at]);
        let mut auth = client_first[bare_at..].to_vec();
        auth.push(b',');
        auth.extend_from_slice(server_first);
        auth.push(b',');
        auth.extend_from_slice(without_proof);
        let salted = salted(&salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored_key, &auth);
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let proof = b64.encode(proof);
        out = replace(&out, b"%P", proof.as_bytes());
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn replace(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut rest = hay;
    while let Some(at) = find(rest, needle) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(with);
        rest = &rest[at + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

fuzz_target!(|data: &[u8]| {
    let [flags, rest @ ..] = data else { return };
    let scram = flags & 1 != 0;
    let mechanism = match (scram, flags & 4 != 0) {
        (true, false) => "SCRAM-SHA-256",
        (true, true) => "scram-sha-256",
        (false, false) => "PLAIN",
        (false, true) => "plain",
    };
    let Ok(mut exchange) = server().start(mechanism, true) else {
        panic!("{mechanism} must be offered when plaintext is allowed");
    };
    let mut messages = rest.split(|&b| b == b'\n');
    if flags & 2 == 0 {
        // No initial response: an empty challenge asks for one.
        match exchange.step(None) {
            Ok(SaslStep::Challenge(c)) => assert!(c.is_empty()),
            other => panic!("first step without data gave {other:?}"),
        }
    }
    let mut client_first = Vec::new();
    let mut server_first = Vec::new();
    for (i, message) in messages.by_ref().take(8).enumerate() {
        let message = if scram && i > 0 {
            fill(message, &client_first, &server_first)
        } else {
            message.to_vec()
        };
        let step = exchange.step(Some(&message));
        if std::env::var_os("CORVID_FUZZ_VERBOSE").is_some() {
            eprintln!(
                "{:?} -> {:?}",
                String::from_utf8_lossy(&message),
                step.as_ref().map(|s| match s {
                    SaslStep::Challenge(c) => String::from_utf8_lossy(c).into_owned(),
                    SaslStep::Success { identity, .. } => format!("success as {}", identity.user),
                })
            );
        }
        if i == 0 {
            client_first = message;
            if let Ok(SaslStep::Challenge(c)) = &step {
                server_first = c.clone();
            }
        }
        match step {
            Ok(SaslStep::Challenge(_)) => {}
            Ok(SaslStep::Success { identity, .. }) => {
                assert!(
                    identity.user == "user" || identity.user == "admin",
                    "authenticated as unknown {identity:?}"
                );
                // Not reusable.
                assert!(exchange.step(Some(b"")).is_err());
                return;
            }
            Err(_) => {
                assert!(exchange.step(Some(b"")).is_err());
                return;
            }
        }
    }
});
