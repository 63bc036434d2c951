//! Reading a bundle from a folder, such as a mounted Kubernetes ConfigMap.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{BundleFiles, BundleLimits, MAX_PATH_SEGMENTS, is_bundle_file};
use crate::error::BundleError;

/// Reads the bundle files under `root`, following symlinks.
///
/// Entries whose name starts with `..` are skipped: Kubernetes mounts a ConfigMap as
/// symlinks into a `..data` folder and keeps older copies in `..<timestamp>` folders, so
/// reading those would load every file twice. Every folder entry counts toward
/// `max_files`, and only bundle files (`.manifest`, data files, `.rego`) are read.
pub(crate) fn read_directory(
    root: &Path,
    limits: &BundleLimits,
) -> Result<BundleFiles, BundleError> {
    let mut files = BundleFiles::new();
    let mut entry_count = 0usize;
    let mut remaining_bytes = limits.max_total_bytes;
    let mut pending: Vec<(PathBuf, Vec<String>)> = vec![(root.to_path_buf(), Vec::new())];

    while let Some((folder, segments)) = pending.pop() {
        let entries = fs::read_dir(&folder).map_err(|source| io_error(&folder, source))?;
        for entry in entries {
            let entry = entry.map_err(|source| io_error(&folder, source))?;
            let path = entry.path();

            entry_count += 1;
            if entry_count > limits.max_files {
                return Err(BundleError::TooManyFiles {
                    limit: limits.max_files,
                });
            }

            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                return Err(BundleError::InvalidUtf8 {
                    file: path.display().to_string(),
                });
            };
            if name.starts_with("..") {
                continue;
            }

            let mut child_segments = segments.clone();
            child_segments.push(name);

            // fs::metadata follows symlinks, which ConfigMap mounts consist of.
            let metadata = fs::metadata(&path).map_err(|source| io_error(&path, source))?;
            if metadata.is_dir() {
                if child_segments.len() > MAX_PATH_SEGMENTS {
                    return Err(BundleError::TooDeep {
                        path,
                        limit: MAX_PATH_SEGMENTS,
                    });
                }
                pending.push((path, child_segments));
                continue;
            }

            let bundle_path = child_segments.join("/");
            if !metadata.is_file() || !is_bundle_file(&bundle_path) {
                continue;
            }
            let content = read_limited(&path, &mut remaining_bytes, limits)?;
            files.insert(bundle_path, content);
        }
    }

    Ok(files)
}

/// Reads one file, charging its bytes to the bundle's remaining byte budget.
fn read_limited(
    path: &Path,
    remaining_bytes: &mut u64,
    limits: &BundleLimits,
) -> Result<Vec<u8>, BundleError> {
    let file = fs::File::open(path).map_err(|source| io_error(path, source))?;

    // Reading at most one byte past the budget detects a file that exceeds it without
    // reading the whole file.
    let mut content = Vec::new();
    file.take(remaining_bytes.saturating_add(1))
        .read_to_end(&mut content)
        .map_err(|source| io_error(path, source))?;

    let size = content.len() as u64;
    if size > *remaining_bytes {
        return Err(BundleError::TooLarge {
            limit: limits.max_total_bytes,
        });
    }
    *remaining_bytes -= size;
    Ok(content)
}

fn io_error(path: &Path, source: std::io::Error) -> BundleError {
    BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}
