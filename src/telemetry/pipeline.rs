//! The export pipeline: OTLP exporter (gRPC or HTTP/protobuf), a bounded
//! batch processor that never blocks the relay, and drop accounting.
//!
//! The SDK's async-runtime `BatchSpanProcessor` keeps its own queue but does
//! not say how many spans it dropped. So [`Bounded`] caps the spans handed to
//! it below its own limit and counts what it turns away, and [`Counted`]
//! counts spans whose export failed (dead collector, timeout).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::runtime;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, Sampler, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use prometheus_client::metrics::counter::Counter;

use super::settings::{Protocol, TracingSettings};

/// Spans per export request.
const BATCH: usize = 512;
/// How often a partial batch is sent.
const DELAY: Duration = Duration::from_millis(500);

/// Rejects spans once `max` are waiting for export.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor<runtime::Tokio>,
    queued: Arc<AtomicUsize>,
    max: usize,
    dropped: Counter,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.inc();
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter, counting what leaves the queue and what fails to arrive.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    queued: Arc<AtomicUsize>,
    failed: Counter,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let n = batch.len();
        self.queued.fetch_sub(n, Ordering::Relaxed);
        let failed = self.failed.clone();
        let export = self.inner.export(batch);
        async move {
            let result = export.await;
            if result.is_err() {
                failed.inc_by(n as u64);
            }
            result
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The URL spans are sent to: the setting (or the protocol's default) as a
/// base URL, with `/v1/traces` added for HTTP as OTEL_EXPORTER_OTLP_ENDPOINT
/// is treated.
pub fn traces_url(s: &TracingSettings) -> String {
    let base = s
        .endpoint
        .clone()
        .unwrap_or_else(|| s.protocol.default_endpoint().to_string());
    match s.protocol {
        Protocol::Grpc => base,
        Protocol::HttpProtobuf if base.ends_with("/v1/traces") => base,
        Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
    }
}

/// Drop counters: (queue full, export failed).
pub type DropCounters = (Counter, Counter);

/// Builds the provider; must run inside the Tokio runtime.
pub fn provider(s: &TracingSettings, drops: DropCounters) -> anyhow::Result<SdkTracerProvider> {
    let url = traces_url(s);
    let headers: Vec<(String, String)> = s
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v.expose()).into_owned()))
        .collect();
    let queued = Arc::new(AtomicUsize::new(0));
    let (queue_full, failed) = drops;
    let processor = match s.protocol {
        Protocol::Grpc => {
            let mut metadata = opentelemetry_otlp::tonic_types::metadata::MetadataMap::new();
            for (k, v) in &headers {
                let key = k
                    .parse::<tonic::metadata::AsciiMetadataKey>()
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "telemetry.tracing.headers: `{k}` is not a valid gRPC metadata key"
                        )
                    })?;
                let value = v.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "telemetry.tracing.headers.{k}: the value is not valid gRPC metadata"
                    )
                })?;
                metadata.insert(key, value);
            }
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(url)
                .with_timeout(s.timeout)
                .with_metadata(metadata)
                .build()?;
            bounded(exporter, s.max_queue_size, queued, queue_full, failed)
        }
        Protocol::HttpProtobuf => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url)
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_timeout(s.timeout)
                .with_headers(headers.into_iter().collect())
                .build()?;
            bounded(exporter, s.max_queue_size, queued, queue_full, failed)
        }
    };
    let resource = Resource::builder_empty()
        .with_service_name(s.service_name.clone())
        .with_attributes(
            s.resource_attributes
                .iter()
                .map(|(k, v)| opentelemetry::KeyValue::new(k.clone(), v.clone())),
        )
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        // The relay decides sampling before a span exists (so unsampled
        // messages allocate nothing); what reaches the SDK is already
        // chosen, and children follow their parent.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(resource)
        .build())
}

fn bounded<E: SpanExporter + 'static>(
    exporter: E,
    max: usize,
    queued: Arc<AtomicUsize>,
    queue_full: Counter,
    failed: Counter,
) -> Bounded {
    let counted = Counted {
        inner: exporter,
        queued: queued.clone(),
        failed,
    };
    // The SDK's own queue is larger than ours so that it never drops
    // silently: ours turns spans away first, and counts them.
    let config = BatchConfigBuilder::default()
        .with_max_queue_size(max * 2 + BATCH)
        .with_max_export_batch_size(BATCH.min(max))
        .with_scheduled_delay(DELAY)
        .build();
    let inner = BatchSpanProcessor::builder(counted, runtime::Tokio)
        .with_batch_config(config)
        .build();
    Bounded {
        inner,
        queued,
        max,
        dropped: queue_full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_urls_get_the_traces_path_once() {
        let mut s = TracingSettings {
            protocol: Protocol::HttpProtobuf,
            ..TracingSettings::default()
        };
        assert_eq!(traces_url(&s), "http://localhost:4318/v1/traces");
        s.endpoint = Some("http://c:4318/v1/traces".into());
        assert_eq!(traces_url(&s), "http://c:4318/v1/traces");
        s.protocol = Protocol::Grpc;
        s.endpoint = Some("http://c:4317".into());
        assert_eq!(traces_url(&s), "http://c:4317");
    }
}
