#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/ (run from fuzz/; idempotent).

MUPDATE seeds follow ../shared/reference/mupdate-protocol.md (Cyrus's client
sends every argument as a {n+} literal). Frame seeds are bincode (standard
config: varint integers, enum variants as varint indices) behind a 4-byte
big-endian length, as peer::write_frame writes them. Config seeds are the
examples from docs/src/cluster.md; corpus/config/defaults is the output of
`corvid-registry --print-config`.
"""
import base64
import os
import struct

def put(target, name, data):
    d = os.path.join("corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)

def lit(s):
    b = s.encode() if isinstance(s, str) else s
    return b"{%d+}\r\n" % len(b) + b

ACL = "bob\tlrswipkxtecdan\tadmin\tlrswipkxtecdan\t"
plain = base64.b64encode(b"\0mupdate\0secret")

# --- requests: [limits, k, sizes..., stream] -------------------------------
cyrus = (b'A01 AUTHENTICATE "PLAIN" ' + lit(plain) + b"\r\n"
         + b"X0 RESERVE " + lit("user.bob") + b" " + lit("be1!default") + b"\r\n"
         + b"X1 ACTIVATE " + lit("user.bob") + b" " + lit("be1!default") + b" " + lit(ACL) + b"\r\n"
         + b"X2 FIND " + lit("user.bob") + b"\r\n"
         + b"X3 DEACTIVATE " + lit("user.bob") + b" " + lit("be2!default") + b"\r\n"
         + b"X4 DELETE " + lit("user.bob") + b"\r\n"
         + b"Q01 LOGOUT\r\n")
scram = (b'A01 AUTHENTICATE "SCRAM-SHA-256"\r\n'
         + base64.b64encode(b"n,,n=mupdate,r=rOprNGfwEbeRWgbNEkqO") + b"\r\n"
         + base64.b64encode(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=") + b"\r\n"
         + b"\r\n"
         + b"U01 UPDATE\r\nN1 NOOP\r\nN2 noop\r\nL LOGOUT\r\n")
quoted = (b'a FIND "user.bob"\r\nb LIST\r\nc LIST "be1"\r\nd UPDATE "be1" "be2"\r\n'
          b'e DELETE "user.\\"x\\\\"\r\nf DEACTIVATE "user.bob" "be1!default"\n'
          b'g STARTTLS\r\nh COMPRESS "DEFLATE"\r\ni AUTHENTICATE "PLAIN" "="\r\n*\r\n')
sync = b"a FIND {8}\r\nuser.bob\r\nb RESERVE {3}\r\nabc {5}\r\nbe1!x\r\n"
errors = (b"* NOOP\r\nfoo\r\nx BOGUS\r\nx FIND atom\r\nx FIND\r\nx NOOP extra\r\n"
          b'x UPDATE ""\r\nx FIND {3+}\r\na\0b\r\nx FIND "\xff"\r\n'
          b"x FIND {100000+}\r\nabc\r\nx FIND {99999999999+}\r\n")
toolong = b"x FIND {70000}\r\ny " + b"A" * 200 + b"\r\nz NOOP\r\n"
put("mupdate_request", "cyrus-plain", b"\0\0" + cyrus)
put("mupdate_request", "cyrus-plain-chunked", b"\0\3\1\7\2" + cyrus)
put("mupdate_request", "scram", b"\0\0" + scram)
put("mupdate_request", "scram-small-limits", b"\1\2\3\5" + scram)
put("mupdate_request", "quoted", b"\0\0" + quoted)
put("mupdate_request", "sync-literal", b"\0\1\1" + sync)
put("mupdate_request", "errors", b"\0\0" + errors)
put("mupdate_request", "too-long", b"\2\0" + toolong)

# --- responses: [limits, k, sizes..., stream] ------------------------------
greeting = (b'* AUTH "SCRAM-SHA-256" "PLAIN"\r\n* STARTTLS\r\n* COMPRESS "DEFLATE"\r\n'
            b'* PARTIAL-UPDATE\r\n* OK MUPDATE "corvid" "Corvid" "0.1.0" "(master)"\r\n')
entries = (b"X14 MAILBOX " + lit("user.bob") + b" " + lit("be1!default") + b" " + lit(ACL) + b"\r\n"
           + b"X10 RESERVE " + lit("user.bob") + b" " + lit("be1!default") + b"\r\n"
           + b"U1 DELETE " + lit("user.frank") + b"\r\n"
           + b'U1 OK "streaming starts"\r\nN1 OK "Noop done"\r\n')
sasl = (b'* AUTH "SCRAM-SHA-256"\r\n* OK MUPDATE "r" "Corvid" "0.1.0" "mupdate://m1"\r\n\r\n'
        + base64.b64encode(b"r=abc,s=QSXCR+Q6sek8bf92,i=4096") + b"\r\n"
        + base64.b64encode(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=") + b"\r\n"
        + b'A01 OK "Authenticated"\r\n')
errors_r = (b'* BAD "Need command"\r\nx NO "mailbox already exists"\r\nx BAD {5+}\r\nabcde\r\n'
            b'+ go ahead\r\nx OK\r\n* BYE "idle"\r\nx MAILBOX "a" "b" "c"\r\nx RESERVE a b\r\n'
            b"x MAILBOX {3+}\r\nab\r\n")
put("mupdate_response", "greeting", b"\0\0" + greeting)
put("mupdate_response", "entries", b"\0\0" + entries)
put("mupdate_response", "entries-chunked", b"\1\2\1\4" + entries)
put("mupdate_response", "sasl", b"\0\0" + sasl)
put("mupdate_response", "errors", b"\0\0" + errors_r)

# --- SASL: [flags, messages separated by LF] -------------------------------
put("sasl", "plain-initial", b"\2\0user\0pencil")
put("sasl", "plain-prompted", b"\0user\0user\0pencil")
put("sasl", "plain-wrong", b"\6\0user\0wrong")
put("sasl", "scram-ok", b"\1n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL\nc=biws,r=%N,p=%P\n")
put("sasl", "scram-initial-wrong-password", b"\3n,,n=admin,r=abc\nc=biws,r=%N,p=%P\n")
put("sasl", "scram-unknown", b"\5n,,n=nobody,r=abc\nc=biws,r=%N,p=%P\n")
put("sasl", "scram-bad-proof", b"\1n,,n=user,r=abc\nc=biws,r=%N,p=AAAA\n")
put("sasl", "scram-authzid", b"\1y,a=admin,n=user,r=abc\nc=eSxhPWFkbWluLA==,r=%N,p=%P\n")

# --- frames: [kind, frames...] ----------------------------------------------
def frame(body):
    return struct.pack(">I", len(body)) + body

def s(x):
    b = x.encode()
    return bytes([len(b)]) + b

# PeerRequest: 5 ReadIndex, 6 Admin, 8 SyncIndex, 9 Follow{after}
put("frames", "peer-request", b"\0" + frame(b"\5") + frame(b"\x08") + frame(b"\x09\x2a")
    + frame(b"\x09\xfb\x10\x27"))
put("frames", "peer-request-admin", b"\0" + frame(b"\6\0\1\1" + s("127.0.0.1:4001")))
# PeerResponse: 4 ReadIndex(u64), 6 Error(String)
put("frames", "peer-response", b"\1" + frame(b"\4\7") + frame(b"\6" + s("not leader")))
# StreamFrame: 0 SnapshotBegin{None}, 2 SnapshotEnd, 3 Records{[], applied}, 4 Heartbeat
put("frames", "stream", b"\2" + frame(b"\0\0") + frame(b"\2") + frame(b"\3\0\3")
    + frame(b"\4\5\1"))
put("frames", "stream-small-limit", b"\x82" + frame(b"\4\5\0") + struct.pack(">I", 1 << 20))

# --- config -----------------------------------------------------------------
put("config", "empty", b"")
put("config", "node", b'''[node]
data_dir = "/var/lib/corvid"
server_name = "reg1"

[mupdate]
listen = "10.0.0.1:3905"

[metrics]
listen = "10.0.0.1:9905"

[raft]
node_id = 1
peer_listen = "10.0.0.1:3906"
peer_advertise = "10.0.0.1:3906"
bootstrap = false
''')
put("config", "replica", b'''[node]
role = "replica"

[replica]
masters = ["10.0.0.1:3906", "10.0.0.2:3906"]
silence_timeout_ms = 5000

[raft]
read_consistency = "local"
heartbeat_ms = 250
election_timeout_min_ms = 1000
election_timeout_max_ms = 2000
''')
put("config", "tls", b'''[tls]
cert = "/etc/corvid/cert.pem"
key = "/etc/corvid/key.pem"

[auth]
users_file = "/etc/corvid/users.toml"

[raft]
peer_tls_cert = "a.pem"
peer_tls_key = "b.pem"
peer_tls_ca = "c.pem"
''')
