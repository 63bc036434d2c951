//! Reading a bundle from a gzip-compressed tar archive, in memory and within limits.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

use flate2::read::MultiGzDecoder;
use tar::EntryType;

use super::{BundleFiles, BundleLimits, MAX_PATH_SEGMENTS, is_bundle_file};
use crate::error::BundleError;

/// Reads the bundle files of a `.tar.gz` stream.
///
/// Entries are never written to disk. Entry names are bundle-relative: OPA's `opa build`
/// writes every name with a leading `/` (for example `/.manifest`), so one leading `/`
/// means the bundle root rather than the file-system root. Names with a `..` segment, links,
/// devices and duplicate names are rejected.
pub(crate) fn read_tar_gz<R: Read>(
    reader: R,
    limits: &BundleLimits,
) -> Result<BundleFiles, BundleError> {
    let exceeded = Rc::new(Cell::new(false));
    let decompressed = LimitedReader {
        inner: MultiGzDecoder::new(reader),
        remaining: limits.max_total_bytes,
        exceeded: Rc::clone(&exceeded),
    };
    let mut archive = tar::Archive::new(decompressed);

    // Any read error after the byte limit was hit is reported as the limit, whatever
    // wrapping the tar reader added around it.
    let archive_error = |error: io::Error| {
        if exceeded.get() {
            BundleError::TooLarge {
                limit: limits.max_total_bytes,
            }
        } else {
            BundleError::InvalidArchive {
                message: error.to_string(),
            }
        }
    };

    let mut files = BundleFiles::new();
    let mut entry_count = 0usize;
    for entry in archive.entries().map_err(archive_error)? {
        let mut entry = entry.map_err(archive_error)?;

        entry_count += 1;
        if entry_count > limits.max_files {
            return Err(BundleError::TooManyFiles {
                limit: limits.max_files,
            });
        }

        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let entry_type = entry.header().entry_type();
        match entry_type {
            EntryType::Regular | EntryType::Continuous => {}
            EntryType::Directory | EntryType::XGlobalHeader => continue,
            EntryType::Symlink | EntryType::Link => {
                return Err(unsafe_entry(raw_name, "links are not allowed in a bundle"));
            }
            _ => {
                return Err(unsafe_entry(
                    raw_name,
                    "only regular files and folders are allowed in a bundle",
                ));
            }
        }

        let Ok(name) = std::str::from_utf8(&entry.path_bytes()).map(str::to_owned) else {
            return Err(unsafe_entry(raw_name, "the name is not valid UTF-8"));
        };
        let Some(path) = normalize_entry_name(&name)? else {
            continue;
        };
        if !is_bundle_file(&path) {
            continue;
        }
        if files.contains_key(&path) {
            return Err(BundleError::DuplicateEntry { entry: path });
        }

        let mut content = Vec::new();
        entry.read_to_end(&mut content).map_err(archive_error)?;
        files.insert(path, content);
    }

    // The tar reader stops at the first header-sized gap, so an archive cut short between
    // two entries would load with entries missing. Reading the gzip stream to its end
    // checks its trailer (CRC and length) and turns such a cut into an error.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(archive_error)?;

    Ok(files)
}

/// Turns a tar entry name into a bundle path such as `envoy/authz/policy.rego`.
///
/// Returns `None` for the archive root itself (`./` or `/`).
fn normalize_entry_name(name: &str) -> Result<Option<String>, BundleError> {
    let mut segments = Vec::new();
    for segment in name.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                return Err(unsafe_entry(
                    name.to_string(),
                    "a `..` segment leaves the bundle",
                ));
            }
            segment => segments.push(segment),
        }
    }

    if segments.len() > MAX_PATH_SEGMENTS {
        return Err(unsafe_entry(
            name.to_string(),
            "the name is nested deeper than the bundle limit",
        ));
    }
    if segments.is_empty() {
        return Ok(None);
    }
    Ok(Some(segments.join("/")))
}

fn unsafe_entry(entry: String, reason: &'static str) -> BundleError {
    BundleError::UnsafeEntry { entry, reason }
}

/// A reader that fails once more than `remaining` bytes were requested from it, so a
/// gzip bomb stops at the limit instead of filling memory.
struct LimitedReader<R> {
    inner: R,
    remaining: u64,
    exceeded: Rc<Cell<bool>>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            // One probe byte distinguishes a stream that ends exactly at the limit from a longer one.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.exceeded.set(true);
            return Err(io::Error::other("bundle byte limit exceeded"));
        }

        let allowed = buffer
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let count = self.inner.read(&mut buffer[..allowed])?;
        self.remaining -= count as u64;
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_slash_means_bundle_root() {
        assert_eq!(
            normalize_entry_name("/envoy/authz/policy.rego").unwrap(),
            Some("envoy/authz/policy.rego".to_string())
        );
        assert_eq!(
            normalize_entry_name("./data.json").unwrap(),
            Some("data.json".to_string())
        );
        assert_eq!(normalize_entry_name("./").unwrap(), None);
    }

    #[test]
    fn parent_segment_is_rejected() {
        let error = normalize_entry_name("envoy/../../etc/data.json").unwrap_err();

        assert_eq!(
            error.to_string(),
            r#"bundle archive entry "envoy/../../etc/data.json" rejected: a `..` segment leaves the bundle"#
        );
    }

    #[test]
    fn limited_reader_stops_past_limit() {
        let exceeded = Rc::new(Cell::new(false));
        let mut exact = LimitedReader {
            inner: &b"abcd"[..],
            remaining: 4,
            exceeded: Rc::clone(&exceeded),
        };
        let mut content = Vec::new();
        exact.read_to_end(&mut content).unwrap();
        assert_eq!(content, b"abcd");
        assert!(!exceeded.get());

        let mut longer = LimitedReader {
            inner: &b"abcde"[..],
            remaining: 4,
            exceeded: Rc::clone(&exceeded),
        };
        assert!(longer.read_to_end(&mut Vec::new()).is_err());
        assert!(exceeded.get());
    }
}
