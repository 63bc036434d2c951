//! Helpers shared by the integration tests: bundle folders, archives and observers.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use flate2::Compression;
use flate2::write::GzEncoder;
use portcullis_policy::ReloadObserver;

/// Absolute path of a bundle in the repository's `policies/` folder.
///
/// The path is canonical because `opa` 1.22 derives data paths wrongly from a bundle path
/// that contains `..`.
pub fn repository_bundle(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../policies")
        .join(name)
        .canonicalize()
        .expect("repository bundle exists")
}

/// Writes `files` (bundle-relative path, content) under `root`, creating folders.
pub fn write_files(root: &Path, files: &[(&str, &str)]) {
    for (path, content) in files {
        let full = root.join(path);
        std::fs::create_dir_all(full.parent().expect("file has a parent")).expect("create folder");
        std::fs::write(&full, content).expect("write bundle file");
    }
}

/// One entry of a test archive. The name is written into the header verbatim, so tests
/// can build archives that well-behaved tools refuse to write.
pub enum TarEntry<'a> {
    File(&'a str, &'a [u8]),
    Directory(&'a str),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
}

/// Builds a `.tar.gz` archive in memory.
pub fn tar_gz(entries: &[TarEntry<'_>]) -> Vec<u8> {
    let encoder = GzEncoder::new(Vec::new(), Compression::default());
    let mut builder = tar::Builder::new(encoder);

    for entry in entries {
        let mut header = tar::Header::new_old();
        let (name, data, entry_type, link): (&str, &[u8], tar::EntryType, Option<&str>) =
            match entry {
                TarEntry::File(name, data) => (name, data, tar::EntryType::Regular, None),
                TarEntry::Directory(name) => (name, b"", tar::EntryType::Directory, None),
                TarEntry::Symlink(name, target) => {
                    (name, b"", tar::EntryType::Symlink, Some(target))
                }
                TarEntry::HardLink(name, target) => (name, b"", tar::EntryType::Link, Some(target)),
            };

        let raw_name = &mut header.as_old_mut().name;
        assert!(
            name.len() < raw_name.len(),
            "test entry name too long: {name}"
        );
        raw_name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(target) = link {
            let raw_link = &mut header.as_old_mut().linkname;
            raw_link[..target.len()].copy_from_slice(target.as_bytes());
        }
        header.set_entry_type(entry_type);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append(&header, data).expect("append test entry");
    }

    builder
        .into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gzip")
}

/// Builds a `.tar.gz` archive of regular files.
pub fn tar_gz_files(files: &[(&str, &str)]) -> Vec<u8> {
    let entries: Vec<TarEntry<'_>> = files
        .iter()
        .map(|(name, content)| TarEntry::File(name, content.as_bytes()))
        .collect();
    tar_gz(&entries)
}

/// Writes `bytes` to `path`.
pub fn write_bytes(path: &Path, bytes: &[u8]) {
    let mut file = std::fs::File::create(path).expect("create file");
    file.write_all(bytes).expect("write file");
}

/// Replaces `path` with `bytes` in one rename, so a concurrent reader sees the old or the
/// new content, never a partly written file. The temporary name ends in `.tmp`, which no
/// bundle reads.
pub fn replace_file(path: &Path, bytes: &[u8]) {
    let temporary = path.with_extension("tmp");
    write_bytes(&temporary, bytes);
    std::fs::rename(&temporary, path).expect("rename over the old file");
}

/// A [`ReloadObserver`] that records every call.
#[derive(Default)]
pub struct RecordingObserver {
    pub reloaded: Mutex<Vec<String>>,
    pub failed: Mutex<Vec<String>>,
}

impl RecordingObserver {
    pub fn reloaded(&self) -> Vec<String> {
        self.reloaded.lock().expect("observer lock").clone()
    }

    pub fn failed(&self) -> Vec<String> {
        self.failed.lock().expect("observer lock").clone()
    }
}

impl ReloadObserver for RecordingObserver {
    fn reloaded(&self, revision: &str) {
        self.reloaded
            .lock()
            .expect("observer lock")
            .push(revision.to_string());
    }

    fn reload_failed(&self, error: &str) {
        self.failed
            .lock()
            .expect("observer lock")
            .push(error.to_string());
    }
}
