//! Loading bundles from folders and `.tar.gz` archives, and rejecting unsafe ones.

mod common;

use common::{TarEntry, repository_bundle, tar_gz, tar_gz_files, write_bytes, write_files};
use portcullis_policy::{
    BundleError, BundleLimits, Policy, PolicyError, load_bundle, load_bundle_with_limits,
};
use serde_json::json;

const POLICY: &str = "package envoy.authz\n\nallow := true\n";

fn module_paths(bundle: &portcullis_policy::Bundle) -> Vec<&str> {
    bundle
        .modules()
        .iter()
        .map(|module| module.path())
        .collect()
}

#[test]
fn example_folder_loads_manifest_modules_and_data() {
    let bundle = load_bundle(&repository_bundle("example")).expect("example bundle loads");

    assert_eq!(bundle.revision(), "example-1");
    assert_eq!(bundle.manifest_revision(), Some("example-1"));
    assert_eq!(bundle.roots(), ["envoy".to_string()]);
    assert_eq!(
        module_paths(&bundle),
        ["envoy/authz/policy.rego", "envoy/authz/policy_test.rego"]
    );
    assert!(bundle.modules()[1].is_test());
    assert!(!bundle.modules()[0].is_test());
    assert_eq!(
        bundle.data()["envoy"]["authz"]["admin_roles"],
        json!(["admin"])
    );
    // The differential-test inputs under testdata/ are not data files.
    assert_eq!(bundle.data().get("testdata"), None);
    assert_eq!(bundle.digest().len(), 64);
}

#[test]
fn archive_and_folder_digests_match() {
    let files = [
        (".manifest", r#"{"revision": "r7", "roots": ["envoy"]}"#),
        ("envoy/authz/policy.rego", POLICY),
        ("envoy/authz/data.json", r#"{"roles": ["admin"]}"#),
    ];
    let folder = tempfile::tempdir().unwrap();
    write_files(folder.path(), &files);
    let archive_folder = tempfile::tempdir().unwrap();
    let archive_path = archive_folder.path().join("bundle.tar.gz");
    write_bytes(&archive_path, &tar_gz_files(&files));

    let from_folder = load_bundle(folder.path()).unwrap();
    let from_archive = load_bundle(&archive_path).unwrap();

    assert_eq!(from_archive.revision(), "r7");
    assert_eq!(from_archive.digest(), from_folder.digest());
    assert_eq!(module_paths(&from_archive), ["envoy/authz/policy.rego"]);
    assert_eq!(
        from_archive.data(),
        &json!({"envoy": {"authz": {"roles": ["admin"]}}})
    );
}

#[test]
fn leading_slash_names_are_bundle_relative() {
    // `opa build` writes `/.manifest`, `/data.json` and `/<path>.rego`.
    let bytes = tar_gz_files(&[
        ("/.manifest", r#"{"revision": "built", "roots": ["envoy"]}"#),
        (
            "/data.json",
            r#"{"envoy": {"authz": {"roles": ["admin"]}}}"#,
        ),
        ("/envoy/authz/policy.rego", POLICY),
    ]);

    let bundle = portcullis_policy::Bundle::from_tar_gz(&bytes[..], &BundleLimits::default())
        .expect("archive loads");

    assert_eq!(bundle.revision(), "built");
    assert_eq!(module_paths(&bundle), ["envoy/authz/policy.rego"]);
    assert_eq!(bundle.data()["envoy"]["authz"]["roles"], json!(["admin"]));
}

#[test]
fn absolute_entry_name_never_leaves_the_bundle() {
    // The name means the bundle root, and nothing is written to disk: `/etc/passwd` is an
    // ignored bundle file, not the system file.
    let bytes = tar_gz_files(&[("/etc/passwd", "root:x:0:0"), ("/envoy/p.rego", POLICY)]);

    let bundle = portcullis_policy::Bundle::from_tar_gz(&bytes[..], &BundleLimits::default())
        .expect("archive loads");

    assert_eq!(module_paths(&bundle), ["envoy/p.rego"]);
    assert_eq!(bundle.data(), &json!({}));
}

#[test]
fn bundle_without_manifest_is_named_by_content_digest() {
    let folder = tempfile::tempdir().unwrap();
    write_files(folder.path(), &[("envoy/authz/policy.rego", POLICY)]);

    let bundle = load_bundle(folder.path()).unwrap();

    assert_eq!(bundle.revision(), format!("sha256:{}", bundle.digest()));
    assert_eq!(bundle.manifest_revision(), None);
    assert_eq!(bundle.roots(), [String::new()]);
}

#[test]
fn digest_tracks_only_bundle_files() {
    let folder = tempfile::tempdir().unwrap();
    write_files(folder.path(), &[("envoy/authz/policy.rego", POLICY)]);
    let original = load_bundle(folder.path()).unwrap().digest().to_string();

    write_files(
        folder.path(),
        &[("README.md", "notes"), ("envoy/input.json", "{}")],
    );
    let with_ignored_files = load_bundle(folder.path()).unwrap().digest().to_string();

    write_files(
        folder.path(),
        &[(
            "envoy/authz/policy.rego",
            "package envoy.authz\n\nallow := false\n",
        )],
    );
    let edited = load_bundle(folder.path()).unwrap().digest().to_string();

    assert_eq!(with_ignored_files, original);
    assert_ne!(edited, original);
}

#[test]
fn data_files_are_placed_by_folder() {
    let folder = tempfile::tempdir().unwrap();
    write_files(
        folder.path(),
        &[
            ("data.json", r#"{"global": {"tenant": "acme"}}"#),
            ("envoy/authz/data.json", r#"{"roles": ["admin"]}"#),
            (
                "envoy/authz/limits/data.yaml",
                "max_quantity: 100\nmethods:\n  - GET\n  - HEAD\n",
            ),
            ("envoy/routes/data.yml", "- /public\n- /health\n"),
            ("global/data.yaml", "region: eu-1\n"),
        ],
    );

    let bundle = load_bundle(folder.path()).unwrap();

    assert_eq!(
        bundle.data(),
        &json!({
            "global": {"tenant": "acme", "region": "eu-1"},
            "envoy": {
                "authz": {
                    "roles": ["admin"],
                    "limits": {"max_quantity": 100, "methods": ["GET", "HEAD"]},
                },
                "routes": ["/public", "/health"],
            },
        })
    );
}

#[test]
fn conflicting_data_files_are_reported_with_path() {
    let folder = tempfile::tempdir().unwrap();
    write_files(
        folder.path(),
        &[
            ("data.json", r#"{"envoy": {"authz": {"roles": ["admin"]}}}"#),
            ("envoy/authz/data.yaml", "roles: [user]\n"),
        ],
    );

    let error = load_bundle(folder.path()).unwrap_err();

    assert_eq!(
        error.to_string(),
        "data file envoy/authz/data.yaml conflicts with other bundle data at path /envoy/authz/roles"
    );
}

#[test]
fn invalid_data_json_reports_file_line_and_column() {
    let folder = tempfile::tempdir().unwrap();
    write_files(
        folder.path(),
        &[("envoy/data.json", "{\n  \"a\": 1,\n  \"b\": \n}\n")],
    );

    let error = load_bundle(folder.path()).unwrap_err();

    let BundleError::InvalidData {
        file, line, column, ..
    } = &error
    else {
        panic!("expected InvalidData, got {error:?}");
    };
    assert_eq!(file, "envoy/data.json");
    assert_eq!(*line, 4);
    assert_eq!(*column, 1);
}

#[test]
fn data_outside_manifest_roots_is_rejected() {
    let folder = tempfile::tempdir().unwrap();
    write_files(
        folder.path(),
        &[
            (".manifest", r#"{"roots": ["envoy"]}"#),
            ("envoy/authz/policy.rego", POLICY),
            ("acme/data.json", r#"{"secret": 1}"#),
        ],
    );

    let error = load_bundle(folder.path()).unwrap_err();

    assert_eq!(
        error.to_string(),
        r#"manifest roots ["envoy"] do not permit data at path /acme"#
    );
}

#[test]
fn package_outside_manifest_roots_fails_compilation() {
    let folder = tempfile::tempdir().unwrap();
    write_files(
        folder.path(),
        &[
            (".manifest", r#"{"roots": ["envoy/authz"]}"#),
            ("envoy/authz/policy.rego", POLICY),
            ("other/policy.rego", "package envoy.other\n\nx := 1\n"),
        ],
    );
    let bundle = load_bundle(folder.path()).expect("data and layout are valid");

    let error = Policy::compile(&bundle, "envoy/authz/allow").unwrap_err();

    let PolicyError::PackageOutsideRoots {
        file,
        package,
        roots,
    } = &error
    else {
        panic!("expected PackageOutsideRoots, got {error:?}");
    };
    assert_eq!(file, "other/policy.rego");
    assert_eq!(package, "data.envoy.other");
    assert_eq!(roots, &["envoy/authz".to_string()]);
}

#[test]
fn configmap_mount_is_read_once_through_symlinks() {
    // Kubernetes' layout: files live in a timestamped folder, `..data` points at it and each
    // key is a symlink through `..data`.
    let mount = tempfile::tempdir().unwrap();
    let version = mount.path().join("..2025_06_01_12_00_00.000000001");
    write_files(
        &version,
        &[("policy.rego", POLICY), ("data.json", r#"{"x": 1}"#)],
    );
    std::os::unix::fs::symlink(version.file_name().unwrap(), mount.path().join("..data")).unwrap();
    for name in ["policy.rego", "data.json"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), mount.path().join(name)).unwrap();
    }

    let bundle = load_bundle(mount.path()).unwrap();

    assert_eq!(module_paths(&bundle), ["policy.rego"]);
    assert_eq!(bundle.data(), &json!({"x": 1}));
}

#[test]
fn archive_entry_with_parent_segment_is_rejected() {
    let bytes = tar_gz(&[
        TarEntry::File("envoy/p.rego", POLICY.as_bytes()),
        TarEntry::File("../x.rego", POLICY.as_bytes()),
    ]);

    let error =
        portcullis_policy::Bundle::from_tar_gz(&bytes[..], &BundleLimits::default()).unwrap_err();

    assert_eq!(
        error.to_string(),
        r#"bundle archive entry "../x.rego" rejected: a `..` segment leaves the bundle"#
    );
}

#[test]
fn archive_symlink_is_rejected() {
    let bytes = tar_gz(&[TarEntry::Symlink("envoy/p.rego", "/etc/passwd")]);

    let error =
        portcullis_policy::Bundle::from_tar_gz(&bytes[..], &BundleLimits::default()).unwrap_err();

    assert_eq!(
        error.to_string(),
        r#"bundle archive entry "envoy/p.rego" rejected: links are not allowed in a bundle"#
    );
}

#[test]
fn archive_hard_link_is_rejected() {
    let bytes = tar_gz(&[
        TarEntry::File("a.rego", POLICY.as_bytes()),
        TarEntry::HardLink("b.rego", "a.rego"),
    ]);

    let error =
        portcullis_policy::Bundle::from_tar_gz(&bytes[..], &BundleLimits::default()).unwrap_err();

    assert!(
        matches!(&error, BundleError::UnsafeEntry { entry, .. } if entry == "b.rego"),
        "unexpected error: {error:?}"
    );
}

#[test]
fn archive_with_folders_loads() {
    let bytes = tar_gz(&[
        TarEntry::Directory("./"),
        TarEntry::Directory("./envoy/"),
        TarEntry::File("./envoy/p.rego", POLICY.as_bytes()),
    ]);

    let bundle =
        portcullis_policy::Bundle::from_tar_gz(&bytes[..], &BundleLimits::default()).unwrap();

    assert_eq!(module_paths(&bundle), ["envoy/p.rego"]);
}

#[test]
fn duplicate_archive_entry_is_rejected() {
    let bytes = tar_gz_files(&[("envoy/p.rego", POLICY), ("./envoy/p.rego", POLICY)]);

    let error =
        portcullis_policy::Bundle::from_tar_gz(&bytes[..], &BundleLimits::default()).unwrap_err();

    assert_eq!(
        error.to_string(),
        r#"bundle archive contains "envoy/p.rego" more than once"#
    );
}

#[test]
fn archive_over_byte_limit_is_rejected() {
    // Ten MiB of zeros compress to a few KiB: a small gzip bomb.
    let zeros = vec![0u8; 10 * 1024 * 1024];
    let bytes = tar_gz(&[TarEntry::File("envoy/big.rego", &zeros)]);
    assert!(
        bytes.len() < 100 * 1024,
        "test archive is not compact: {}",
        bytes.len()
    );
    let limits = BundleLimits {
        max_total_bytes: 1024 * 1024,
        ..BundleLimits::default()
    };

    let error = portcullis_policy::Bundle::from_tar_gz(&bytes[..], &limits).unwrap_err();

    assert!(
        matches!(error, BundleError::TooLarge { limit } if limit == 1024 * 1024),
        "unexpected error: {error:?}"
    );
}

#[test]
fn archive_over_file_limit_is_rejected() {
    let names: Vec<String> = (0..5).map(|index| format!("envoy/p{index}.rego")).collect();
    let files: Vec<(&str, &str)> = names.iter().map(|name| (name.as_str(), POLICY)).collect();
    let bytes = tar_gz_files(&files);
    let limits = BundleLimits {
        max_files: 4,
        ..BundleLimits::default()
    };

    let error = portcullis_policy::Bundle::from_tar_gz(&bytes[..], &limits).unwrap_err();

    assert_eq!(
        error.to_string(),
        "bundle exceeds the limit of 4 files; raise max_files if it is expected"
    );
}

#[test]
fn folder_over_byte_limit_is_rejected() {
    let folder = tempfile::tempdir().unwrap();
    let large_source = format!("package envoy\n\n# {}\nallow := true\n", "x".repeat(4096));
    write_files(folder.path(), &[("envoy/p.rego", &large_source)]);
    let limits = BundleLimits {
        max_total_bytes: 1024,
        ..BundleLimits::default()
    };

    let error = load_bundle_with_limits(folder.path(), &limits).unwrap_err();

    assert!(
        matches!(error, BundleError::TooLarge { limit: 1024 }),
        "unexpected error: {error:?}"
    );
}

#[test]
fn truncated_archive_is_an_error() {
    let bytes = tar_gz_files(&[
        ("envoy/p.rego", POLICY),
        (
            "envoy/data.json",
            r#"{"roles": ["admin", "user", "auditor"]}"#,
        ),
    ]);

    // Every cut, including one that drops only the gzip trailer or falls between two tar
    // entries, must fail rather than load a partial bundle.
    for cut in 0..bytes.len() {
        let result =
            portcullis_policy::Bundle::from_tar_gz(&bytes[..cut], &BundleLimits::default());

        assert!(
            matches!(result, Err(BundleError::InvalidArchive { .. })),
            "cut at {cut} of {}: {result:?}",
            bytes.len()
        );
    }
}

#[test]
fn random_bytes_are_an_error() {
    // A fixed xorshift sequence, so a failure reproduces.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut garbage = Vec::with_capacity(8192);
    for _ in 0..8192 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        garbage.push(state as u8);
    }
    let folder = tempfile::tempdir().unwrap();

    let plain = folder.path().join("garbage.tar.gz");
    write_bytes(&plain, &garbage);
    let error = load_bundle(&plain).unwrap_err();
    assert!(
        matches!(&error, BundleError::UnknownFormat { magic, .. } if magic.len() == 8),
        "unexpected error: {error:?}"
    );

    let mut gzip_garbage = vec![0x1f, 0x8b, 0x08, 0x00];
    gzip_garbage.extend_from_slice(&garbage);
    let with_magic = folder.path().join("garbage-with-magic.tar.gz");
    write_bytes(&with_magic, &gzip_garbage);
    let error = load_bundle(&with_magic).unwrap_err();
    assert!(
        matches!(error, BundleError::InvalidArchive { .. }),
        "unexpected error: {error:?}"
    );

    // Valid gzip around bytes that are not a tar archive.
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, &garbage).unwrap();
    let compressed_garbage = encoder.finish().unwrap();
    let result =
        portcullis_policy::Bundle::from_tar_gz(&compressed_garbage[..], &BundleLimits::default());
    assert!(
        matches!(result, Err(BundleError::InvalidArchive { .. })),
        "unexpected result: {result:?}"
    );
}

#[test]
fn missing_bundle_path_is_an_io_error() {
    let folder = tempfile::tempdir().unwrap();
    let missing = folder.path().join("absent");

    let error = load_bundle(&missing).unwrap_err();

    assert_eq!(
        error.to_string(),
        format!(
            "failed to read bundle {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
}
