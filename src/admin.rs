//! The admin HTTP listener.
//!
//! | endpoint   | answer                                                        |
//! |------------|---------------------------------------------------------------|
//! | `/healthz` | 200 while the process runs (liveness)                         |
//! | `/readyz`  | 200 when Redis answers and no shutdown is under way, else 503 |
//! | `/metrics` | Prometheus text; OpenMetrics when `Accept` asks for it        |
//! | `POST /reload` | re-read the policy file and TLS certificates: 200, or 422 with every error, or 404 with neither configured |

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};

/// What `POST /reload` re-reads.
#[derive(Clone, Default)]
pub struct Reloaders {
    pub policy: Option<Arc<crate::policy::reload::Reloader>>,
    pub tls: Option<Arc<crate::tls::Reloader>>,
}
use crate::upstream::Health;

/// Serves admin requests until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    reloader: Reloaders,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let health = health.clone();
        let metrics = metrics.clone();
        let reloader = reloader.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let health = health.clone();
                let metrics = metrics.clone();
                let reloader = reloader.clone();
                async move {
                    if req.uri().path() == "/reload" {
                        return Ok::<_, Infallible>(reload(&req, reloader).await);
                    }
                    Ok::<_, Infallible>(route(&req, &health, &metrics))
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}

fn route(req: &Request<Incoming>, health: &Health, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/metrics" => scrape(req, health, metrics),
        "/readyz" => match health.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz or /metrics\n".into(),
        ),
    }
}

async fn reload(req: &Request<Incoming>, reloaders: Reloaders) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use POST /reload\n".into());
    }
    if reloaders.policy.is_none() && reloaders.tls.is_none() {
        return text(
            StatusCode::NOT_FOUND,
            "no policy file or TLS certificates are configured; nothing to reload\n".into(),
        );
    }
    let outcome = tokio::task::spawn_blocking(move || {
        let mut body = String::new();
        let mut ok = true;
        if let Some(policy) = &reloaders.policy {
            match policy.reload("POST /reload", true) {
                Ok(_) => body.push_str("policy reloaded\n"),
                Err(errors) => {
                    ok = false;
                    body.push_str(&format!(
                        "policy not reloaded; the previous one stays in force:\n{errors}\n"
                    ));
                }
            }
        }
        if let Some(tls) = &reloaders.tls {
            match tls.reload("POST /reload", true) {
                Ok(_) => body.push_str("TLS certificates reloaded\n"),
                Err(errors) => {
                    ok = false;
                    body.push_str(&format!(
                        "TLS certificates not reloaded; the previous ones stay in use:\n{}\n",
                        errors.join("\n")
                    ));
                }
            }
        }
        (ok, body)
    })
    .await;
    match outcome {
        Ok((true, body)) => text(StatusCode::OK, body),
        Ok((false, body)) => text(StatusCode::UNPROCESSABLE_ENTITY, body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed: {e}\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `/metrics`: OpenMetrics only when the scraper lists it in `Accept`, as
/// Prometheus does when configured for it; the classic text format otherwise.
fn scrape(req: &Request<Incoming>, health: &Health, metrics: &Metrics) -> Response<Full<Bytes>> {
    metrics.set_upstream_up(health.upstream_ok());
    let openmetrics = req
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = metrics.render(openmetrics);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(if openmetrics {
            OPENMETRICS_CONTENT_TYPE
        } else {
            TEXT_CONTENT_TYPE
        }),
    );
    resp
}
