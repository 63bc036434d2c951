//! Writes small policy bundles for tests.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

/// Writes a bundle folder with a `.manifest` (the given revision, root `envoy`) and the Rego
/// module `envoy/authz/policy.rego`.
///
/// Each file is written to a temporary file in the bundle's parent folder and renamed into
/// place, so a bundle watcher never reads a half-written file. The two renames are separate,
/// so a watcher can still see the new manifest with the old policy for one poll.
pub fn write_bundle(dir: &Path, revision: &str, rego: &str) -> io::Result<()> {
    let manifest = serde_json::json!({ "revision": revision, "roots": ["envoy"] });
    let policy_dir = dir.join("envoy").join("authz");
    fs::create_dir_all(&policy_dir)?;

    // Staged files sit beside the bundle folder, on the same file system for the rename but
    // outside the folder that a watcher lists.
    let staging_dir = match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    replace_file(
        staging_dir,
        &dir.join(".manifest"),
        manifest.to_string().as_bytes(),
    )?;
    replace_file(
        staging_dir,
        &policy_dir.join("policy.rego"),
        rego.as_bytes(),
    )
}

fn replace_file(staging_dir: &Path, path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut staged = tempfile::NamedTempFile::new_in(staging_dir)?;
    staged.write_all(contents)?;
    staged.as_file().sync_all()?;
    staged.persist(path).map_err(|error| error.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_bundle_creates_manifest_and_policy() {
        let root = tempfile::tempdir().expect("creating a temporary folder failed");
        let bundle = root.path().join("bundle");

        write_bundle(&bundle, "r7", "package envoy.authz\n").expect("write_bundle failed");

        let manifest =
            fs::read_to_string(bundle.join(".manifest")).expect("reading .manifest failed");
        assert_eq!(manifest, r#"{"revision":"r7","roots":["envoy"]}"#);
        let policy = fs::read_to_string(bundle.join("envoy/authz/policy.rego"))
            .expect("reading policy.rego failed");
        assert_eq!(policy, "package envoy.authz\n");
    }

    #[test]
    fn write_bundle_replaces_policy_without_leftover_files() {
        let root = tempfile::tempdir().expect("creating a temporary folder failed");
        let bundle = root.path().join("bundle");
        write_bundle(&bundle, "r1", "package envoy.authz\n# one\n")
            .expect("first write_bundle failed");

        write_bundle(&bundle, "r2", "package envoy.authz\n# two\n")
            .expect("second write_bundle failed");

        let policy = fs::read_to_string(bundle.join("envoy/authz/policy.rego"))
            .expect("reading policy.rego failed");
        assert_eq!(policy, "package envoy.authz\n# two\n");
        assert_eq!(sorted_entry_names(root.path()), vec!["bundle"]);
        assert_eq!(sorted_entry_names(&bundle), vec![".manifest", "envoy"]);
    }

    fn sorted_entry_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("listing the folder failed")
            .map(|entry| {
                let entry = entry.expect("reading a folder entry failed");
                entry.file_name().to_string_lossy().into_owned()
            })
            .collect();
        names.sort();
        names
    }
}
