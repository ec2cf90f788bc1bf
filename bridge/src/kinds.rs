//! The payload kinds claimed by the sidecar plugins started in this process,
//! per daemon.
//!
//! The daemon hands a payload to the first plugin that claims its kind, so a
//! second claimant would never see it: two `SidecarPlugin`s started by one
//! daemon (with its `PluginContext`) that claim one kind are refused at
//! `start()`, whichever file or code created them. A daemon is told apart
//! by its ports: a process that runs several (a simulated mesh, tests)
//! keeps their claims apart.

use std::collections::HashMap;
use std::sync::Mutex;

/// (daemon, kind) → (claimant id, plugin name).
type Claims = HashMap<(usize, &'static str), (u64, &'static str)>;
static CLAIMS: Mutex<Option<Claims>> = Mutex::new(None);

/// Which daemon a context belongs to: the address of its peer directory,
/// which every plugin of one daemon shares and which lives as long as any
/// of them runs.
pub(crate) fn daemon_of(ctx: &pim_plugin::PluginContext) -> usize {
    std::sync::Arc::as_ptr(&ctx.peers).cast::<()>() as usize
}

/// A unique id for a claimant.
pub(crate) fn claimant_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Claims every kind for plugin `name` of `daemon`, all or none. The error
/// names the kind and both plugins.
pub(crate) fn claim(
    daemon: usize,
    id: u64,
    name: &'static str,
    kinds: &[&'static str],
) -> anyhow::Result<()> {
    let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    let claims = claims.get_or_insert_with(HashMap::new);
    for kind in kinds {
        if let Some((owner, owner_name)) = claims.get(&(daemon, *kind)) {
            if *owner != id {
                anyhow::bail!(
                    "payload kind `{kind}` is already claimed by sidecar plugin `{owner_name}`; \
                     sidecar plugin `{name}` cannot claim it too (the daemon hands each kind to one plugin)"
                );
            }
        }
    }
    for kind in kinds {
        claims.insert((daemon, kind), (id, name));
    }
    Ok(())
}

/// Releases the kinds `id` claimed.
pub(crate) fn release(id: u64) {
    let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(claims) = claims.as_mut() {
        claims.retain(|_, (owner, _)| *owner != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_has_one_claimant_until_released() {
        let (a, b) = (claimant_id(), claimant_id());
        claim(1, a, "first", &["kinds-test.x", "kinds-test.y"]).unwrap();
        // Another daemon in the same process claims what it likes.
        claim(2, claimant_id(), "other", &["kinds-test.x"]).unwrap();
        let err = claim(1, b, "second", &["kinds-test.z", "kinds-test.y"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`kinds-test.y`"), "{err}");
        assert!(err.contains("`first`") && err.contains("`second`"), "{err}");
        // All or none: z was not claimed by the refused plugin.
        claim(1, claimant_id(), "third", &["kinds-test.z"]).unwrap();
        // The same claimant may claim again (a restart of the plugin).
        claim(1, a, "first", &["kinds-test.x"]).unwrap();
        release(a);
        claim(1, b, "second", &["kinds-test.y"]).unwrap();
        release(b);
    }
}
