//! OPA-compatible policy bundles read from a folder or a `.tar.gz` archive.
//!
//! The layout follows OPA's bundle format. An optional `.manifest` sits at the root. Data
//! files named `data.json`, `data.yaml` or `data.yml` may sit at any depth, and their
//! content lands at the data path named by their folder: `a/b/data.json` becomes
//! `data.a.b`. `.rego` modules may sit at any depth. Other files are ignored, as OPA
//! ignores them.

mod archive;
mod data;
mod directory;
mod manifest;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{Read, Seek};
use std::path::Path;

use serde_json::{Map as JsonMap, Value as JsonValue};
use sha2::{Digest, Sha256};

use crate::error::BundleError;
use manifest::Manifest;
pub use manifest::RegoVersion;
pub(crate) use manifest::roots_contain;

/// Default for [`BundleLimits::max_total_bytes`]: 64 MiB.
///
/// Policy bundles for a sidecar are typically kilobytes to a few megabytes (an estimate,
/// not a measurement). The limit bounds the memory that a corrupt or hostile archive (a gzip bomb) can take while it is read.
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 64 * 1024 * 1024;

/// Default for [`BundleLimits::max_files`]: 10,000 entries.
///
/// Bounds the work spent on an archive or folder with very many small entries.
pub const DEFAULT_MAX_FILES: usize = 10_000;

/// Maximum number of folder levels in a bundle path. Deeper paths are rejected so that a
/// symlink loop in a folder, or a crafted archive name, cannot nest data without bound.
pub(crate) const MAX_PATH_SEGMENTS: usize = 64;

/// Bundle files by bundle-relative path. Sorted, so the digest does not depend on the
/// order in which a folder or archive lists them.
pub(crate) type BundleFiles = BTreeMap<String, Vec<u8>>;

/// Resource limits applied while a bundle is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BundleLimits {
    /// Maximum uncompressed bytes: the whole decompressed tar stream for an archive, or the
    /// bytes of the bundle files read from a folder.
    pub max_total_bytes: u64,
    /// Maximum number of entries in the archive or folder, including ignored ones.
    pub max_files: usize,
}

impl Default for BundleLimits {
    fn default() -> Self {
        BundleLimits {
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

/// One Rego module of a bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct BundleModule {
    path: String,
    source: String,
}

impl BundleModule {
    pub(crate) fn new(path: impl Into<String>, source: impl Into<String>) -> BundleModule {
        BundleModule {
            path: path.into(),
            source: source.into(),
        }
    }

    /// Returns the bundle-relative path, such as `envoy/authz/policy.rego`, which regorus
    /// names in error messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Returns the Rego source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Returns whether this is a Rego test file (`*_test.rego`).
    ///
    /// [`crate::Policy::compile`] leaves test files out, so test rules and fixtures never
    /// reach the policy that serves requests. OPA itself loads them with the bundle.
    pub fn is_test(&self) -> bool {
        self.path.ends_with("_test.rego")
    }
}

impl fmt::Debug for BundleModule {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("BundleModule")
            .field("path", &self.path)
            .field("bytes", &self.source.len())
            .finish()
    }
}

/// A loaded, validated bundle: its modules, data document and identity.
///
/// Data paths are checked against the manifest roots here. Package paths are checked when
/// the bundle is compiled, because only the Rego parser reads them exactly.
#[derive(Clone)]
pub struct Bundle {
    manifest: Manifest,
    revision: String,
    digest: String,
    modules: Vec<BundleModule>,
    data: JsonValue,
}

/// Loads a bundle from a folder or a `.tar.gz` file with the default [`BundleLimits`].
pub fn load_bundle(path: &Path) -> Result<Bundle, BundleError> {
    load_bundle_with_limits(path, &BundleLimits::default())
}

/// Loads a bundle from a folder or a `.tar.gz` file.
///
/// A folder is read as a bundle folder. A file must start with the gzip magic bytes
/// (`1f 8b`) and contain a tar archive.
pub fn load_bundle_with_limits(path: &Path, limits: &BundleLimits) -> Result<Bundle, BundleError> {
    let io_error = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };

    let metadata = fs::metadata(path).map_err(io_error)?;
    if metadata.is_dir() {
        let files = directory::read_directory(path, limits)?;
        return Bundle::from_files(files);
    }

    let mut file = fs::File::open(path).map_err(io_error)?;
    let mut magic = Vec::with_capacity(4);
    (&mut file)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(io_error)?;
    if !magic.starts_with(&[0x1f, 0x8b]) {
        return Err(BundleError::UnknownFormat {
            path: path.to_path_buf(),
            magic: hex::encode(&magic),
        });
    }
    file.rewind().map_err(io_error)?;

    Bundle::from_tar_gz(std::io::BufReader::new(file), limits)
}

impl Bundle {
    /// Reads a bundle from a gzip-compressed tar stream, such as an HTTP bundle download.
    pub fn from_tar_gz<R: Read>(reader: R, limits: &BundleLimits) -> Result<Bundle, BundleError> {
        let files = archive::read_tar_gz(reader, limits)?;
        Bundle::from_files(files)
    }

    fn from_files(files: BundleFiles) -> Result<Bundle, BundleError> {
        let digest = digest_files(&files);

        let manifest = match files.get(".manifest") {
            Some(bytes) => Manifest::parse(bytes)?,
            None => Manifest::default(),
        };

        let mut modules = Vec::new();
        let mut document = JsonMap::new();
        for (path, content) in files {
            if path == ".manifest" {
                continue;
            }
            if path.ends_with(".rego") {
                let source = String::from_utf8(content)
                    .map_err(|_| BundleError::InvalidUtf8 { file: path.clone() })?;
                modules.push(BundleModule::new(path, source));
                continue;
            }

            let value = if path.ends_with(".json") {
                data::parse_json(&path, &content)?
            } else {
                data::parse_yaml(&path, &content)?
            };
            let segments: Vec<&str> = path.split('/').collect();
            let folder = &segments[..segments.len() - 1];
            data::place(&mut document, folder, value, &path)?;
        }

        let data = JsonValue::Object(document);
        data::check_roots(&data, &manifest.roots)?;

        let revision = match &manifest.revision {
            Some(revision) => revision.clone(),
            None => format!("sha256:{digest}"),
        };

        Ok(Bundle {
            manifest,
            revision,
            digest,
            modules,
            data,
        })
    }

    /// Returns the revision for logs and audit events: the manifest's `revision`, or
    /// `sha256:<digest>` when the manifest has none, so it always identifies the content.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// Returns the manifest's `revision`, if it has a non-empty one.
    pub fn manifest_revision(&self) -> Option<&str> {
        self.manifest.revision.as_deref()
    }

    /// Returns the manifest roots without leading or trailing `/`. `[""]` (the default without a
    /// manifest) means the bundle owns the whole `data` tree.
    pub fn roots(&self) -> &[String] {
        &self.manifest.roots
    }

    /// Returns the Rego version declared by the manifest's `rego_version`, if any.
    pub fn rego_version(&self) -> Option<RegoVersion> {
        self.manifest.rego_version
    }

    /// Returns the hex SHA-256 over the sorted (path, content) pairs of the bundle files,
    /// used to detect that a bundle changed.
    ///
    /// Files that the bundle format ignores do not count, and neither does the order in
    /// which a folder or archive lists its files.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Returns all Rego modules, tests included, sorted by path.
    pub fn modules(&self) -> &[BundleModule] {
        &self.modules
    }

    /// Returns the data document built from the bundle's data files, always a JSON object.
    pub fn data(&self) -> &JsonValue {
        &self.data
    }
}

impl fmt::Debug for Bundle {
    /// Omits the data document, which may be large or hold values operators consider
    /// private.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Bundle")
            .field("revision", &self.revision)
            .field("digest", &self.digest)
            .field("roots", &self.manifest.roots)
            .field("modules", &self.modules)
            .finish_non_exhaustive()
    }
}

/// Returns whether a bundle-relative path is a file that the bundle format reads.
pub(crate) fn is_bundle_file(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    path == ".manifest"
        || matches!(name, "data.json" | "data.yaml" | "data.yml")
        || name.ends_with(".rego")
}

/// Hashes each path and content with a length prefix, so that no two different file sets
/// produce the same byte stream.
fn digest_files(files: &BundleFiles) -> String {
    let mut hasher = Sha256::new();
    for (path, content) in files {
        hasher.update((path.len() as u64).to_be_bytes());
        hasher.update(path.as_bytes());
        hasher.update((content.len() as u64).to_be_bytes());
        hasher.update(content);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_file_names_follow_opa() {
        assert!(is_bundle_file(".manifest"));
        assert!(is_bundle_file("a/b/data.json"));
        assert!(is_bundle_file("data.yml"));
        assert!(is_bundle_file("envoy/policy.rego"));
        assert!(!is_bundle_file("a/.manifest"));
        assert!(!is_bundle_file("testdata/inputs/allow.json"));
        assert!(!is_bundle_file("README.md"));
    }

    #[test]
    fn digest_separates_path_from_content() {
        let first = BundleFiles::from([("ab".to_string(), b"c".to_vec())]);
        let second = BundleFiles::from([("a".to_string(), b"bc".to_vec())]);

        assert_ne!(digest_files(&first), digest_files(&second));
    }
}
