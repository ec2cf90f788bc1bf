//! The Rust SDK delivers a payload in any encoding the protocol allows, not
//! only the one the host writes: it reads a payload event encoded as
//! protobuf libraries encode it straight from the batch's bytes, and gives
//! any other encoding (here an unknown field, fields out of order) to
//! prost. A host that writes raw bytes serves the session on a real Unix
//! socket; the SDK's `run_async` is the client.

mod support;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use pim_core::NodeId;
use pim_sidecar::proto::pb;
use pim_sidecar::{ConnectOptions, Sidecar};
use prost::Message;
use tokio::sync::mpsc;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::{Request, Response, Status};

use support::RawBytes;

/// A `PluginSession` that answers Register, streams one batch written as
/// given, and reports each Ack's position.
#[derive(Clone)]
struct RawHost {
    batch: Bytes,
    acks: mpsc::UnboundedSender<u64>,
}

impl NamedService for RawHost {
    const NAME: &'static str = "pim.plugin.v1.PluginSession";
}

struct Register;

impl UnaryService<Bytes> for Register {
    type Response = Bytes;
    type Future = std::future::Ready<Result<Response<Bytes>, Status>>;

    fn call(&mut self, _: Request<Bytes>) -> Self::Future {
        let resp = pb::RegisterResponse {
            session_id: "raw".into(),
            protocol_version: pim_sidecar::proto::PROTOCOL_VERSION,
            host_instance: "raw-host".into(),
            ..Default::default()
        };
        std::future::ready(Ok(Response::new(resp.encode_to_vec().into())))
    }
}

struct Ack(mpsc::UnboundedSender<u64>);

impl UnaryService<Bytes> for Ack {
    type Response = Bytes;
    type Future = std::future::Ready<Result<Response<Bytes>, Status>>;

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let seq = pb::AckRequest::decode(req.into_inner()).map_or(0, |a| a.seq);
        let _ = self.0.send(seq);
        let resp = pb::AckResponse { acked_seq: seq };
        std::future::ready(Ok(Response::new(resp.encode_to_vec().into())))
    }
}

struct Events(Bytes);

impl ServerStreamingService<Bytes> for Events {
    type Response = Bytes;
    type ResponseStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Bytes, Status>> + Send>>;
    type Future = std::future::Ready<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, _: Request<Bytes>) -> Self::Future {
        // The batch, then the stream stays open.
        let stream = tokio_stream::StreamExt::chain(
            tokio_stream::once(Ok(self.0.clone())),
            tokio_stream::pending(),
        );
        std::future::ready(Ok(Response::new(Box::pin(stream))))
    }
}

impl Service<http::Request<tonic::body::Body>> for RawHost {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let host = self.clone();
        Box::pin(async move {
            let mut grpc = Grpc::new(RawBytes);
            Ok(match req.uri().path() {
                "/pim.plugin.v1.PluginSession/Register" => grpc.unary(Register, req).await,
                "/pim.plugin.v1.PluginSession/Ack" => grpc.unary(Ack(host.acks), req).await,
                pim_sidecar::proto::codec::EVENTS_PATH => {
                    grpc.server_streaming(Events(host.batch), req).await
                }
                _ => Status::unimplemented("not served by this host").into_http(),
            })
        })
    }
}

/// Records what it was handed.
struct Recorder(Mutex<Vec<(NodeId, String, Bytes)>>);

#[async_trait::async_trait]
impl Sidecar for Recorder {
    fn name(&self) -> &str {
        "raw"
    }

    fn payload_kinds(&self) -> &[&str] {
        &["raw.a"]
    }

    async fn handle_payload(&self, src: NodeId, kind: &str, body: Bytes) -> anyhow::Result<()> {
        self.0.lock().unwrap().push((src, kind.to_owned(), body));
        Ok(())
    }
}

/// A length-delimited field.
fn field(key: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![key];
    prost::encoding::encode_varint(value.len() as u64, &mut out);
    out.extend(value);
    out
}

#[tokio::test(flavor = "current_thread")]
async fn payloads_in_every_encoding_prost_reads_are_delivered_in_order() {
    let canonical = |seq: u64, body: &[u8]| pb::Event {
        seq,
        event: Some(pb::event::Event::Payload(pb::Payload {
            src: Bytes::from_static(&[1; 16]),
            kind: "raw.a".into(),
            body: Bytes::copy_from_slice(body),
        })),
    };
    let mut batch = Vec::new();
    // 1: as the host writes it.
    batch.extend(field(0x0a, &canonical(1, b"one").encode_to_vec()));
    // 2: an unknown field (number 9, a varint) after the payload.
    let mut two = canonical(2, b"two").encode_to_vec();
    two.extend([0x48, 1]);
    batch.extend(field(0x0a, &two));
    // 3: the payload's fields in reverse order, then the seq.
    let mut payload = field(0x1a, b"three");
    payload.extend(field(0x12, b"raw.a"));
    payload.extend(field(0x0a, &[1; 16]));
    let mut three = field(0x12, &payload);
    three.extend([0x08, 3]);
    batch.extend(field(0x0a, &three));
    // 4: as the host writes it again.
    batch.extend(field(0x0a, &canonical(4, b"four").encode_to_vec()));

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("raw.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (acks, mut acked) = mpsc::unbounded_channel();
    let host = RawHost {
        batch: batch.into(),
        acks,
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(host)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let plugin = Arc::new(Recorder(Mutex::new(Vec::new())));
    let client = tokio::spawn(pim_sidecar::run_async(
        plugin.clone(),
        ConnectOptions::new(&sock, "00ff"),
    ));
    let last = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match acked.recv().await {
                Some(4) => return 4,
                Some(_) => continue,
                None => return 0,
            }
        }
    })
    .await
    .expect("the SDK acked the batch within 10 s");
    assert_eq!(last, 4, "the host went away before the Ack of seq 4");
    client.abort();
    server.abort();
    let got = plugin.0.lock().unwrap().clone();
    let want: Vec<_> = [&b"one"[..], b"two", b"three", b"four"]
        .into_iter()
        .map(|body| {
            (
                NodeId::from_bytes([1; 16]),
                "raw.a".to_owned(),
                Bytes::copy_from_slice(body),
            )
        })
        .collect();
    assert_eq!(got, want, "every payload, once, in order");
}
