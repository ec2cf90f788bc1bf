//! `PeerDirectory`, `ControlSender` and `IdentitySecrets`, served from the
//! daemon's `PluginContext` ports.

use std::pin::Pin;

use bytes::Bytes;
use pim_plugin_proto::convert;
use pim_plugin_proto::pb;
use pim_plugin_proto::pb::control_sender_server::ControlSender;
use pim_plugin_proto::pb::identity_secrets_server::IdentitySecrets;
use pim_plugin_proto::pb::peer_directory_server::PeerDirectory;
use pim_protocol::ControlFrame;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Host, HostServices};

impl Host {
    /// Checks that this plugin may send `frame`: without the raw-control
    /// grant, only `PluginPayload` frames in its own `<name>.` namespace.
    fn check_frame(&self, frame: &ControlFrame) -> Result<(), Status> {
        if self.grants.raw_control {
            return Ok(());
        }
        match frame {
            ControlFrame::PluginPayload { kind, .. }
                if kind.strip_prefix(self.name).is_some_and(|rest| rest.starts_with('.')) =>
            {
                Ok(())
            }
            ControlFrame::PluginPayload { kind, .. } => Err(Status::permission_denied(format!(
                "field `frame.plugin_payload.kind`: {kind:?} is outside this plugin's namespace `{}.`; sending it needs the RAW_CONTROL capability",
                self.name
            ))),
            other => Err(Status::permission_denied(format!(
                "field `frame`: sending a {} frame needs the RAW_CONTROL capability; without it a plugin sends only PluginPayload frames",
                variant_name(other)
            ))),
        }
    }
}

fn variant_name(frame: &ControlFrame) -> &'static str {
    match frame {
        ControlFrame::Goodbye { .. } => "Goodbye",
        ControlFrame::Rekey => "Rekey",
        ControlFrame::Ping { .. } => "Ping",
        ControlFrame::Pong { .. } => "Pong",
        ControlFrame::PeerInfo { .. } => "PeerInfo",
        ControlFrame::PluginPayload { .. } => "PluginPayload",
    }
}

fn frame_of(frame: Option<pb::ControlFrame>) -> Result<ControlFrame, Status> {
    let frame = convert::required("frame", frame)?;
    Ok(ControlFrame::try_from(frame).map_err(|e| e.within("frame"))?)
}

#[tonic::async_trait]
impl PeerDirectory for HostServices {
    async fn lookup_x25519(
        &self,
        req: Request<pb::LookupX25519Request>,
    ) -> Result<Response<pb::LookupX25519Response>, Status> {
        let req = req.into_inner();
        self.0.check_session(&req.session_id)?;
        let node = convert::node_id("node", &req.node)?;
        let key = self.0.ctx.peers.lookup_x25519(&node).await;
        Ok(Response::new(pb::LookupX25519Response {
            x25519: key.map(|k| Bytes::copy_from_slice(&k)),
        }))
    }

    async fn lookup_name(
        &self,
        req: Request<pb::LookupNameRequest>,
    ) -> Result<Response<pb::LookupNameResponse>, Status> {
        let req = req.into_inner();
        self.0.check_session(&req.session_id)?;
        let node = convert::node_id("node", &req.node)?;
        let name = self.0.ctx.peers.lookup_name(&node).await;
        Ok(Response::new(pb::LookupNameResponse { name }))
    }

    type WatchStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = req.into_inner();
        self.0.check_session(&req.session_id)?;
        let mut events = self.0.ctx.peers.subscribe();
        let stopping = self.0.stopping.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    ev = events.recv() => match ev {
                        Ok(ev) => pb::WatchResponse::from(&ev),
                        Err(RecvError::Lagged(missed)) => pb::WatchResponse {
                            event: Some(pb::watch_response::Event::Lagged(pb::WatchLagged { missed })),
                        },
                        Err(RecvError::Closed) => break,
                    },
                    () = stopping.cancelled() => break,
                    () = tx.closed() => break,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl ControlSender for HostServices {
    async fn send_direct(
        &self,
        req: Request<pb::SendDirectRequest>,
    ) -> Result<Response<pb::SendDirectResponse>, Status> {
        let req = req.into_inner();
        self.0.check_session(&req.session_id)?;
        let peer = convert::node_id("peer", &req.peer)?;
        let frame = frame_of(req.frame)?;
        self.0.check_frame(&frame)?;
        self.0.ctx.control.send_direct(peer, frame).await;
        Ok(Response::new(pb::SendDirectResponse {}))
    }

    async fn send_routed(
        &self,
        req: Request<pb::SendRoutedRequest>,
    ) -> Result<Response<pb::SendRoutedResponse>, Status> {
        let req = req.into_inner();
        self.0.check_session(&req.session_id)?;
        let dst = convert::node_id("dst", &req.dst)?;
        let frame = frame_of(req.frame)?;
        self.0.check_frame(&frame)?;
        let attempted = self.0.ctx.control.send_routed(dst, frame).await;
        Ok(Response::new(pb::SendRoutedResponse { attempted }))
    }
}

#[tonic::async_trait]
impl IdentitySecrets for HostServices {
    async fn signing_seed(
        &self,
        req: Request<pb::SigningSeedRequest>,
    ) -> Result<Response<pb::SigningSeedResponse>, Status> {
        let req = req.into_inner();
        self.0.check_session(&req.session_id)?;
        if !self.0.grants.signing_seed {
            return Err(Status::permission_denied(
                "SigningSeed needs the SIGNING_SEED capability, which this plugin's config does not grant",
            ));
        }
        let seed = self.0.ctx.identity.signing_seed();
        Ok(Response::new(pb::SigningSeedResponse {
            seed: Bytes::copy_from_slice(&seed),
        }))
    }
}
