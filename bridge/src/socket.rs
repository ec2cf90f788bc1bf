//! The socket directory and the plugin's listening socket.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tokio::net::UnixListener;

/// Creates `dir` with mode 0700, or checks an existing one: it must be a
/// directory owned by this user and closed to everyone else. With
/// `searchable` (a sidecar of another uid connects), others may search it
/// (mode 0711): reach a socket by its name, never list the directory.
pub(crate) fn prepare_dir(dir: &Path, searchable: bool) -> io::Result<()> {
    match std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("creating the socket directory {}: {e}", dir.display()),
            ))
        }
    }
    let meta = std::fs::metadata(dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "socket directory {} is owned by uid {}, not by this process (uid {uid}); use a directory of your own",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o066 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "socket directory {} has mode {mode:o}; group and others may at most search it (chmod 700, or 711)",
                dir.display()
            ),
        ));
    }
    if searchable && mode & 0o011 != 0o011 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o011))?;
    }
    Ok(())
}

/// Creates a plugin's data directory with mode 0700; with `close`, an
/// existing one is closed to group and others too. With an `owner` (the
/// sidecar's own uid and gid) the directory becomes theirs, and its parent,
/// if it is the `plugins` directory the bridge makes, searchable (0711).
pub(crate) fn prepare_data_dir(
    dir: &Path,
    close: bool,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .and_then(|()| match close {
            true => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)),
            false => Ok(()),
        })
        .and_then(|()| match owner {
            Some((uid, gid)) => {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
                match dir.parent() {
                    Some(parent) if close && parent.file_name() == Some("plugins".as_ref()) => {
                        let mode = std::fs::metadata(parent)?.mode() & 0o777;
                        std::fs::set_permissions(
                            parent,
                            std::fs::Permissions::from_mode(mode | 0o011),
                        )
                    }
                    _ => Ok(()),
                }
            }
            None => Ok(()),
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("preparing the plugin data directory {}: {e}", dir.display()),
            )
        })
}

/// Binds `path` with mode 0600, owned by `owner` if given (the sidecar's
/// uid and gid). A socket file left by a dead host is replaced; one that a
/// live host still accepts on is not taken over.
pub(crate) fn bind(path: &Path, owner: Option<(u32, u32)>) -> io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "another host is serving on {}; stop it or choose another socket_dir",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("binding {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(listener)
}

/// Writes `token` to `path` with mode 0600, replacing any older file.
pub(crate) fn write_token(path: &Path, token: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("writing the token file {}: {e}", path.display()),
            )
        })?;
    file.write_all(token.as_bytes())?;
    Ok(())
}
