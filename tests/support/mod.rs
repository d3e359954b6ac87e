//! Harness for pubwarden's integration tests: private `redis-server` processes, the pubwarden
//! binary, raw RESP sockets, and scripted sessions compared byte for byte between direct Redis
//! and pubwarden.
//!
//! Every test starts its own servers on free loopback ports (never 6379), every wait is bounded.
//! A pubwarden dropped while its test panics prints the tail of its stderr.
//!
//! Validating the harness itself (not part of a normal run):
//! - `PUBWARDEN_TESTS_SELF_CHECK=1 cargo test --tests` replays every comparison script against a
//!   second Redis instead of pubwarden (and [`Front`] connects to Redis directly), so a script
//!   that is not deterministic against Redis itself shows up as a failure there.
//! - `PUBWARDEN_TESTS_BIN=/path/to/stand-in` runs another executable in place of pubwarden.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod net;
pub mod otlp;
pub mod policy;
pub mod procs;
pub mod prom;
pub mod resp;
pub mod script;
pub mod sentinel;
pub mod tls;

pub use net::{RawConn, Stop, free_port, http_get, http_status, loopback};
pub use procs::{Pubwarden, RedisServer, WaitFor, run_pubwarden, scratch_dir};
pub use resp::{Value, decode, encode, encode_line, escape, escape_short, frame_len};
pub use script::{
    Case, Session, assert_all_transparent, assert_transparent, mask_hello_id, mask_monitor_line,
};

use std::time::Duration;

/// Seconds, for brevity in tests.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Milliseconds, for brevity in tests.
pub fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Pubwarden in front of `redis`, or (with `PUBWARDEN_TESTS_SELF_CHECK=1`) Redis itself, to
/// validate a test's expectations against the real server.
pub struct Front {
    pub proxy: Option<Pubwarden>,
    addr: std::net::SocketAddr,
}

impl Front {
    pub fn new(redis: &RedisServer) -> Front {
        if std::env::var_os("PUBWARDEN_TESTS_SELF_CHECK").is_some() {
            return Front {
                proxy: None,
                addr: redis.addr(),
            };
        }
        let proxy = Pubwarden::start(redis.port());
        let addr = proxy.addr();
        Front {
            proxy: Some(proxy),
            addr,
        }
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    pub fn connect(&self) -> RawConn {
        RawConn::connect(self.addr)
    }
}
