//! The bearer-token check every call goes through.

use std::sync::Arc;

use pim_plugin_proto::auth;

use crate::conn::ConnInfo;
use tonic::{Request, Status};

/// A tonic interceptor that admits only calls from an allowed uid
/// (`SO_PEERCRED`) carrying the plugin's token.
#[derive(Clone)]
pub(crate) struct AuthCheck {
    token: Arc<str>,
    plugin: &'static str,
    /// Uids allowed to connect; the daemon's own effective uid when empty.
    allowed_uids: Arc<[u32]>,
}

impl std::fmt::Debug for AuthCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCheck")
            .field("plugin", &self.plugin)
            .field("token", &"<redacted>")
            .field("allowed_uids", &self.allowed_uids)
            .finish()
    }
}

/// The uids that may use a plugin socket: the configured ones, or the
/// daemon's own effective uid when none are.
pub(crate) fn allowed_uids(configured: &[u32]) -> Arc<[u32]> {
    if configured.is_empty() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        Arc::from([unsafe { libc::geteuid() }])
    } else {
        configured.into()
    }
}

impl AuthCheck {
    pub(crate) fn new(token: Arc<str>, plugin: &'static str, allowed_uids: Arc<[u32]>) -> Self {
        Self {
            token,
            plugin,
            allowed_uids,
        }
    }

    fn check_peer(&self, req: &Request<()>) -> Result<(), Status> {
        let uid = req
            .extensions()
            .get::<ConnInfo>()
            .and_then(|info| info.uds.peer_cred)
            .map(|cred| cred.uid());
        match uid {
            Some(uid) if self.allowed_uids.contains(&uid) => Ok(()),
            Some(uid) => {
                tracing::warn!(
                    plugin = self.plugin,
                    uid,
                    "refused a call from a process of another uid"
                );
                Err(Status::permission_denied(format!(
                    "processes of uid {uid} may not use this plugin socket (allowed uids: {:?})",
                    self.allowed_uids
                )))
            }
            None => Err(Status::permission_denied(
                "the peer's credentials (SO_PEERCRED) could not be read",
            )),
        }
    }
}

impl tonic::service::Interceptor for AuthCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check_peer(&req)?;
        let value = req.metadata().get(auth::METADATA_KEY);
        let Some(value) = value else {
            tracing::warn!(
                plugin = self.plugin,
                "refused a call without `authorization` metadata"
            );
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata (a spawned sidecar reads the token from the descriptor PIM_PLUGIN_TOKEN_FD names, an external one from <socket_dir>/<name>.token)",
            ));
        };
        let presented = auth::token_of(value.as_bytes()).unwrap_or_default();
        if !auth::constant_time_eq(presented, self.token.as_bytes()) {
            tracing::warn!(plugin = self.plugin, "refused a call with a wrong token");
            return Err(Status::unauthenticated(
                "wrong token in `authorization: Bearer <token>` metadata",
            ));
        }
        if let Some(info) = req.extensions().get::<ConnInfo>() {
            if !info.admit() {
                return Err(Status::unavailable(
                    "this connection was closed before its first authenticated call (too late, or evicted): reconnect",
                ));
            }
        }
        Ok(req)
    }
}
