//! Proto hygiene: `buf lint` (STANDARD, exceptions listed in proto/buf.yaml)
//! and `buf breaking` against the v1 baseline image kept in the repo, so the
//! check works in any clone, shallow ones included.

mod support;

use std::path::{Path, PathBuf};

use support::*;

fn proto_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto"))
}

async fn buf(dir: &Path, args: &[&str]) -> Option<(bool, String)> {
    let buf = tool("buf", "PIM_BUF")?;
    let mut cmd = tokio::process::Command::new(&buf);
    cmd.args(args).current_dir(dir).kill_on_drop(true);
    let out = tokio::time::timeout(WAIT * 3, cmd.output())
        .await
        .expect("buf finished in time")
        .expect("running buf");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

#[tokio::test]
async fn the_protos_pass_buf_lint() {
    let Some((ok, out)) = buf(&proto_dir(), &["lint"]).await else {
        return;
    };
    assert!(ok, "buf lint:\n{out}");
}

#[tokio::test]
async fn the_protos_have_no_breaking_change_against_the_v1_baseline() {
    let Some((ok, out)) = buf(
        &proto_dir(),
        &["breaking", "--against", "baseline/pim-plugin-v1.binpb"],
    )
    .await
    else {
        return;
    };
    assert!(ok, "buf breaking against proto/baseline:\n{out}");
}

#[tokio::test]
async fn buf_breaking_catches_a_removed_field() {
    // A copy of the protos with one field removed must fail the same check,
    // or the check above proves nothing.
    let dir = temp_dir();
    let copy = dir.path().join("proto");
    for entry in [
        "buf.yaml",
        "baseline/pim-plugin-v1.binpb",
        "pim/plugin/v1/session.proto",
        "pim/plugin/v1/peer_directory.proto",
        "pim/plugin/v1/control_sender.proto",
        "pim/plugin/v1/identity_secrets.proto",
    ] {
        let to = copy.join(entry);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(proto_dir().join(entry), &to).unwrap();
    }
    let session = copy.join("pim/plugin/v1/session.proto");
    let text = std::fs::read_to_string(&session).unwrap();
    let broken = text.replace("  string host_instance = 7;\n", "");
    assert_ne!(text, broken, "the field to remove is in session.proto");
    std::fs::write(&session, broken).unwrap();
    let Some((ok, out)) = buf(
        &copy,
        &["breaking", "--against", "baseline/pim-plugin-v1.binpb"],
    )
    .await
    else {
        return;
    };
    assert!(!ok, "buf breaking missed a removed field:\n{out}");
    assert!(out.contains("host_instance"), "{out}");
}
