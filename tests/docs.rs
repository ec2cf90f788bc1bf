//! Docs that cannot drift: every README block marked
//! `<!-- file: PATH -->` is that file of the repository, verbatim (the
//! template plugin crate, which the suite builds and tests outside the
//! workspace through `tests/outside.sh`); docs/PROTOCOL.md states the
//! host's batch bounds.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `(path, block)` for each marked block of `markdown`.
fn marked_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut lines = markdown.lines();
    while let Some(line) = lines.next() {
        let Some(path) = line
            .strip_prefix("<!-- file: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "the marker for {path} is not followed by a code block"
        );
        let mut block = String::new();
        for line in lines.by_ref() {
            if line == "```" {
                break;
            }
            block.push_str(line);
            block.push('\n');
        }
        blocks.push((path.to_owned(), block));
    }
    blocks
}

#[test]
fn the_readme_shows_the_template_files_verbatim() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let blocks = marked_blocks(&readme);
    let paths: Vec<&str> = blocks.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "templates/plugin/Cargo.toml",
            "templates/plugin/src/main.rs",
            "templates/plugin/tests/plugin.rs"
        ]
    );
    for (path, block) in blocks {
        let file = std::fs::read_to_string(root().join(&path)).unwrap();
        assert!(
            block == file,
            "README's block for {path} differs from the file; copy the file into the README"
        );
    }
}

/// docs/PROTOCOL.md's Events section states the host's batch bounds (a
/// client may take a smaller batch for a caught-up stream).
#[test]
fn the_protocol_states_the_hosts_batch_bounds() {
    use pim_sidecar::proto::limits::{MAX_BATCH_BYTES, MAX_BATCH_EVENTS};
    const MIB: usize = 1024 * 1024;
    assert_eq!(
        MAX_BATCH_BYTES % MIB,
        0,
        "MAX_BATCH_BYTES is no longer whole MiB: state it in bytes in docs/PROTOCOL.md and here"
    );
    let protocol = std::fs::read_to_string(root().join("docs/PROTOCOL.md")).unwrap();
    let words = protocol.split_whitespace().collect::<Vec<_>>().join(" ");
    let sentence = format!(
        "A batch holds up to {MAX_BATCH_EVENTS} events and up to {} MiB of payload bodies",
        MAX_BATCH_BYTES / MIB
    );
    assert!(
        words.contains(&sentence),
        "docs/PROTOCOL.md (Events) should say \"{sentence}\""
    );
}
