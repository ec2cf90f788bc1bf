//! The bearer-token check every call goes through.

use std::sync::Arc;

use pim_plugin_proto::auth;
use tonic::{Request, Status};

/// A tonic interceptor that admits only calls carrying the plugin's token.
#[derive(Clone)]
pub(crate) struct AuthCheck {
    token: Arc<str>,
    plugin: &'static str,
}

impl std::fmt::Debug for AuthCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthCheck")
            .field("plugin", &self.plugin)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl AuthCheck {
    pub(crate) fn new(token: Arc<str>, plugin: &'static str) -> Self {
        Self { token, plugin }
    }
}

impl tonic::service::Interceptor for AuthCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let value = req.metadata().get(auth::METADATA_KEY);
        let Some(value) = value else {
            tracing::warn!(
                plugin = self.plugin,
                "refused a call without `authorization` metadata"
            );
            return Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata (the token is in PIM_PLUGIN_TOKEN)",
            ));
        };
        let presented = auth::token_of(value.as_bytes()).unwrap_or_default();
        if !auth::constant_time_eq(presented, self.token.as_bytes()) {
            tracing::warn!(plugin = self.plugin, "refused a call with a wrong token");
            return Err(Status::unauthenticated(
                "wrong token in `authorization: Bearer <token>` metadata",
            ));
        }
        Ok(req)
    }
}
