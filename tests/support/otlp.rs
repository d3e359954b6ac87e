//! An in-process OpenTelemetry collector stand-in: the official OTLP protobuf messages received
//! over gRPC (tonic) or HTTP/protobuf (hyper) on a free loopback port, kept for assertions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

/// One received span, flattened for assertions.
#[derive(Debug, Clone)]
pub struct RxSpan {
    pub service: String,
    pub resource: HashMap<String, String>,
    pub name: String,
    /// OTLP `SpanKind`: 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub attrs: HashMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(Vec<u8>, Vec<u8>)>,
    pub start_ns: u64,
    pub end_ns: u64,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
}

pub const PRODUCER: i32 = 4;
pub const CONSUMER: i32 = 5;
pub const CLIENT: i32 = 3;

impl RxSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attrs.get(key).map(String::as_str)
    }
}

fn value_text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn map(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_text(&kv.value)))
        .collect()
}

fn flatten(req: &ExportTraceServiceRequest) -> Vec<RxSpan> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| map(&r.attributes))
            .unwrap_or_default();
        let service = resource.get("service.name").cloned().unwrap_or_default();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                out.push(RxSpan {
                    service: service.clone(),
                    resource: resource.clone(),
                    name: s.name.clone(),
                    kind: s.kind,
                    trace_id: s.trace_id.clone(),
                    span_id: s.span_id.clone(),
                    parent_span_id: s.parent_span_id.clone(),
                    attrs: map(&s.attributes),
                    links: s
                        .links
                        .iter()
                        .map(|l| (l.trace_id.clone(), l.span_id.clone()))
                        .collect(),
                    start_ns: s.start_time_unix_nano,
                    end_ns: s.end_time_unix_nano,
                    status: s.status.as_ref().map_or(0, |st| st.code),
                });
            }
        }
    }
    out
}

type Store = Arc<Mutex<Vec<RxSpan>>>;

struct Grpc(Store);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = flatten(request.get_ref());
        self.0.lock().unwrap().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Which OTLP transport the receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    Http,
}

/// A receiver on a background runtime; stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    spans: Store,
    /// HTTP requests that were not `POST /v1/traces` with a protobuf body.
    pub bad_requests: Arc<Mutex<Vec<String>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    pub fn start(transport: Transport) -> Receiver {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("receiver addr");
        let spans: Store = Arc::default();
        let bad_requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (store, bad) = (spans.clone(), bad_requests.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("receiver runtime");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
                match transport {
                    Transport::Grpc => {
                        let incoming = tonic::transport::server::TcpIncoming::from(listener);
                        let serve = tonic::transport::Server::builder()
                            .serve_with_incoming(TraceServiceServer::new(Grpc(store)), incoming);
                        tokio::select! {
                            _ = serve => {}
                            _ = rx => {}
                        }
                    }
                    Transport::Http => {
                        tokio::select! {
                            _ = serve_http(listener, store, bad) => {}
                            _ = rx => {}
                        }
                    }
                }
            });
        });
        Receiver {
            addr,
            spans,
            bad_requests,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, as an OTLP endpoint setting.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<RxSpan> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the spans received (true) or `timeout` passes (false).
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&[RxSpan]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.spans()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_http(listener: tokio::net::TcpListener, store: Store, bad: Arc<Mutex<Vec<String>>>) {
    use http_body_util::BodyExt;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (store, bad) = (store.clone(), bad.clone());
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (store, bad) = (store.clone(), bad.clone());
                    async move {
                        let ok_path =
                            req.method() == hyper::Method::POST && req.uri().path() == "/v1/traces";
                        let ctype = req
                            .headers()
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let what = format!("{} {} {ctype}", req.method(), req.uri());
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let decoded = body
                            .ok()
                            .filter(|_| ok_path && ctype == "application/x-protobuf")
                            .and_then(|b| ExportTraceServiceRequest::decode(b).ok());
                        let status = match decoded {
                            Some(r) => {
                                store.lock().unwrap().extend(flatten(&r));
                                200
                            }
                            None => {
                                bad.lock().unwrap().push(what);
                                400
                            }
                        };
                        let reply = ExportTraceServiceResponse {
                            partial_success: None,
                        }
                        .encode_to_vec();
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", "application/x-protobuf")
                            .body(http_body_util::Full::new(bytes::Bytes::from(reply)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Hex of an id, for messages.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
