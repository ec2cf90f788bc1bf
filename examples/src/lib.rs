//! Shared pieces of the examples: a small simulated mesh that hosts plugins
//! the way `pim-daemon` does.

pub mod mesh;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The path of this package's binary `name` (`echo-sidecar`,
/// `demo-host`, …) for a test or a benchmark of another package, in the
/// same target directory and profile as the running executable.
///
/// Cargo builds a package's binaries for its own tests only; under cargo
/// (`$CARGO` set, as `cargo test` and `cargo run` do) this builds them
/// first, once per process, so that a test never runs a stale binary.
/// Without cargo, a binary that is not there is an error naming the
/// command that builds it.
pub fn example_bin(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let profile = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let profile_flag = match profile.as_str() {
        "debug" => Vec::new(),
        "release" => vec!["--release".to_owned()],
        other => vec!["--profile".to_owned(), other.to_owned()],
    };
    if let Ok(cargo) = std::env::var("CARGO") {
        let target_dir = dir.parent().unwrap_or(dir).to_owned();
        BUILT
            .get_or_init(|| build(&cargo, &target_dir, &profile_flag))
            .clone()
            .map_err(anyhow::Error::msg)?;
    }
    let bin = dir.join(name);
    if !bin.exists() {
        anyhow::bail!(
            "{} is not built: run `cargo build -p pim-sidecar-examples --bins {}`",
            bin.display(),
            profile_flag.join(" ")
        );
    }
    Ok(bin)
}

/// `cargo build` of this package's binaries into `target_dir`.
fn build(cargo: &str, target_dir: &Path, profile: &[String]) -> Result<(), String> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args(["build", "--quiet", "--bins", "--manifest-path", manifest])
        .args(profile)
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .map_err(|e| format!("running {cargo}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the examples' binaries failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The directory of the Python sidecars and their module,
/// `examples/python`.
pub fn python_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
}

/// The Python with grpcio and grpcio-tools that runs the Python sidecars:
/// `PIM_PYTHON`, else the workspace's `.venv` (which `tests/run.sh`
/// makes), checked by importing `pim_sidecar` (which generates the stubs).
/// The error says what is missing and how to get it.
pub fn python() -> Result<PathBuf, String> {
    let python = std::env::var_os("PIM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python3"))
        });
    let script = format!(
        "import sys; sys.path.insert(0, {:?}); import pim_sidecar",
        python_dir().display().to_string()
    );
    let ready = python.is_file()
        && std::process::Command::new(&python)
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .output()
            .is_ok_and(|out| out.status.success());
    if ready {
        Ok(python)
    } else {
        Err(format!(
            "{} with grpcio and grpcio-tools not found (run tests/run.sh, or set PIM_PYTHON)",
            python.display()
        ))
    }
}

/// [`python`] for a test or a benchmark phase that needs it: outside CI a
/// missing Python prints `SKIPPED <what>: <why>` and gives `None`; under
/// `CI=true` nothing may skip, and it panics with the reason.
pub fn python_or_skip(what: &str) -> Option<PathBuf> {
    match python() {
        Ok(python) => Some(python),
        Err(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and {why}"
            );
            println!("SKIPPED {what}: {why}");
            None
        }
    }
}

/// What the sandbox must let a Python sidecar read besides the system:
/// `examples/python`, `extra` (the directory of a script elsewhere), the
/// virtual environment and the installation it was made from.
pub fn python_read_paths(python: &Path, extra: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import sys; print(sys.prefix); print(sys.base_prefix)",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{} could not print its prefixes",
        python.display()
    );
    let mut paths = vec![python_dir()];
    paths.extend(extra.iter().cloned());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        paths.push(std::fs::canonicalize(line.trim())?);
    }
    Ok(paths)
}

/// Standard base64 with padding: how grpcurl's JSON spells bytes fields.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(super::base64(b""), "");
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(&[2; 16]), "AgICAgICAgICAgICAgICAg==");
    }
}

/// The README's Rust samples, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
