//! Connections to the backing Redis, and the health check behind /readyz.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Upstream;

/// Why a connection to Redis could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Opens one relay connection to Redis, bounded by the connect timeout.
pub async fn connect(settings: &Upstream) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(
        settings.connect_timeout,
        TcpStream::connect(&settings.address),
    )
    .await
    .map_err(|_| ConnectError::Timeout(settings.connect_timeout))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Process health as the admin endpoints report it.
#[derive(Debug, Default)]
pub struct Health {
    upstream_ok: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn set_upstream(&self, ok: bool) {
        let was = self.upstream_ok.swap(ok, Ordering::Relaxed);
        if was != ok {
            if ok {
                tracing::info!("upstream Redis is reachable");
            } else {
                tracing::warn!("upstream Redis is unreachable");
            }
        }
    }

    pub fn upstream_ok(&self) -> bool {
        self.upstream_ok.load(Ordering::Relaxed)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready to take traffic: Redis answers and no shutdown is under way.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.draining() {
            Err("shutting down")
        } else if !self.upstream_ok() {
            Err("upstream Redis unreachable")
        } else {
            Ok(())
        }
    }
}

/// Checks that Redis answers PING, every `health_check_interval`, for ever.
pub async fn watch_health(settings: Upstream, health: Arc<Health>) {
    let mut tick = tokio::time::interval(settings.health_check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = match probe(&settings).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "upstream health check failed");
                false
            }
        };
        health.set_upstream(ok);
    }
}

async fn probe(settings: &Upstream) -> Result<(), String> {
    let mut s = connect(settings).await.map_err(|e| e.to_string())?;
    let check = async {
        s.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await?;
        Ok::<_, io::Error>(buf[..n].to_vec())
    };
    let reply = tokio::time::timeout(settings.connect_timeout, check)
        .await
        .map_err(|_| "no answer to PING".to_string())?
        .map_err(|e| e.to_string())?;
    // A Redis that demands AUTH is up; LOADING or a full server is not.
    if reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH") {
        Ok(())
    } else {
        Err(format!(
            "unexpected answer to PING: {}",
            String::from_utf8_lossy(&reply).trim_end()
        ))
    }
}
