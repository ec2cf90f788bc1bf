//! The uid and gid a sidecar runs as.

use std::ffi::CString;

/// Who a spawned sidecar is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// Whether the child switches to them (a `user` or `group` was
    /// configured); otherwise they are the daemon's own.
    pub(crate) switch: bool,
}

/// Resolves the configured `user` and `group` (names or decimal ids). A
/// user without a group runs with the user's primary group, or, for an id
/// with no passwd entry, the gid of the same number. Neither configured:
/// the daemon's own ids, no switch.
pub(crate) fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Identity, String> {
    // SAFETY: geteuid and getegid have no preconditions and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    resolve_as(euid, egid, user, group)
}

/// [`resolve`] for a daemon running as `euid`/`egid`.
fn resolve_as(
    euid: u32,
    egid: u32,
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Identity, String> {
    if user.is_none() && group.is_none() {
        return Ok(Identity {
            uid: euid,
            gid: egid,
            switch: false,
        });
    }
    if euid != 0 {
        return Err(format!(
            "`user`/`group` need the daemon to run as root, and it runs as uid {euid}: only root can start a process as another user (leave them out to run the sidecar as uid {euid})"
        ));
    }
    let (uid, primary) = match user {
        None => (euid, None),
        Some(user) => lookup_user(user)?,
    };
    let gid = match group {
        Some(group) => lookup_group(group)?,
        None => primary.unwrap_or(uid),
    };
    // setresuid/setresgid read (uid_t)-1 as "leave unchanged": such a
    // sidecar would keep the daemon's root.
    for (field, id) in [("user", uid), ("group", gid)] {
        if id == u32::MAX {
            return Err(format!(
                "{field} 4294967295 is (id_t)-1, which the kernel reads as \"leave unchanged\"; an id is 0..=4294967294"
            ));
        }
    }
    Ok(Identity {
        uid,
        gid,
        switch: true,
    })
}

fn lookup_user(user: &str) -> Result<(u32, Option<u32>), String> {
    let name = CString::new(user).map_err(|_| format!("user `{user}` contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; getpwnam_r fills it, pointing its
    // strings into `buf`, which outlives every use below.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, `buf.len()` is its size.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc == 0 && !found.is_null() {
        return Ok((pwd.pw_uid, Some(pwd.pw_gid)));
    }
    match user.parse::<u32>() {
        Ok(uid) => Ok((uid, None)),
        Err(_) => Err(format!(
            "user `{user}` is neither a user of this machine nor a numeric uid"
        )),
    }
}

fn lookup_group(group: &str) -> Result<u32, String> {
    let name = CString::new(group).map_err(|_| format!("group `{group}` contains a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: as in `lookup_user`, for getgrnam_r and `group`.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, `buf.len()` is its size.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc == 0 && !found.is_null() {
        return Ok(grp.gr_gid);
    }
    group.parse::<u32>().map_err(|_| {
        format!("group `{group}` is neither a group of this machine nor a numeric gid")
    })
}

/// Whether `uid`/`gid` can reach `path` (search every directory above it);
/// the error names the first directory that stops them.
pub(crate) fn check_reachable(path: &std::path::Path, uid: u32, gid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if uid == 0 {
        return Ok(());
    }
    let mut dirs: Vec<&std::path::Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.mode();
        let can = if meta.uid() == uid {
            mode & 0o100 != 0
        } else if meta.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !can {
            return Err(format!(
                "uid {uid} cannot reach {}: {} has mode {:o} (owner {}, group {}); give others search permission (chmod o+x) or choose a path it can reach",
                path.display(),
                dir.display(),
                mode & 0o7777,
                meta.uid(),
                meta.gid()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_user_is_the_daemons_own_identity() {
        let id = resolve(None, None).unwrap();
        assert!(!id.switch);
        // SAFETY: geteuid cannot fail.
        assert_eq!(id.uid, unsafe { libc::geteuid() });
    }

    #[test]
    fn a_daemon_that_is_not_root_refuses_a_user_saying_why() {
        let err = resolve_as(1000, 1000, Some("65534"), None).unwrap_err();
        assert!(
            err.contains("need the daemon to run as root, and it runs as uid 1000"),
            "{err}"
        );
        let err = resolve_as(1000, 1000, None, Some("65534")).unwrap_err();
        assert!(err.contains("need the daemon to run as root"), "{err}");
        assert!(!resolve_as(1000, 1000, None, None).unwrap().switch);
    }

    #[test]
    fn names_and_numbers_resolve_or_say_what_they_are_not() {
        let resolve = |u, g| resolve_as(0, 0, u, g);
        let id = resolve(Some("61001"), None).unwrap();
        assert_eq!((id.uid, id.gid, id.switch), (61001, 61001, true));
        let id = resolve(Some("61001"), Some("61002")).unwrap();
        assert_eq!((id.uid, id.gid), (61001, 61002));
        let id = resolve(Some("root"), None).unwrap();
        assert_eq!((id.uid, id.gid), (0, 0));
        let err = resolve(Some("no-such-user-here"), None).unwrap_err();
        assert!(err.contains("neither a user of this machine"), "{err}");
        let err = resolve(None, Some("no-such-group-here")).unwrap_err();
        assert!(err.contains("neither a group"), "{err}");
        for (user, group, field) in [
            (Some("4294967295"), None, "user"),
            (Some("61001"), Some("4294967295"), "group"),
        ] {
            let err = resolve(user, group).unwrap_err();
            assert!(
                err.contains(&format!("{field} 4294967295 is (id_t)-1")),
                "{err}"
            );
        }
    }
}
