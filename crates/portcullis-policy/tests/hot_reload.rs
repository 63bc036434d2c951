//! The bundle watcher: swapping changed bundles in, keeping the active policy on failure.
//!
//! Tests change bundles with atomic renames, as Kubernetes and deployment tools do, so the
//! watcher never reads a half-written file.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RecordingObserver, replace_file, tar_gz_files, write_files};
use portcullis_policy::{BundleWatcher, Policy, PolicyStore, load_bundle};
use regorus::Value;

const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Upper bound for a reload to show up; a healthy run needs a few poll intervals.
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);

const DECISION: &str = "envoy/authz/allow";

fn policy_source(value: &str) -> String {
    format!("package envoy.authz\n\nallow := {value}\n")
}

fn store_for(source: &Path) -> Arc<PolicyStore> {
    let bundle = load_bundle(source).expect("initial bundle loads");
    let policy = Policy::compile(&bundle, DECISION).expect("initial bundle compiles");
    Arc::new(PolicyStore::new(policy))
}

fn spawn_watcher(
    store: &Arc<PolicyStore>,
    source: &Path,
    observer: &Arc<RecordingObserver>,
) -> tokio::task::JoinHandle<()> {
    BundleWatcher::spawn(
        Arc::clone(store),
        source.to_path_buf(),
        DECISION.to_string(),
        POLL_INTERVAL,
        observer.clone(),
    )
}

fn active_value(store: &PolicyStore) -> Value {
    store
        .current()
        .evaluate(Value::Undefined)
        .expect("test policy evaluates")
}

/// Polls `condition` until it is true or [`RELOAD_DEADLINE`] passes.
async fn wait_until(description: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + RELOAD_DEADLINE;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {RELOAD_DEADLINE:?} waiting until {description}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn watcher_swaps_in_a_changed_folder_bundle() {
    let folder = tempfile::tempdir().unwrap();
    let policy_file = folder.path().join("envoy/authz/policy.rego");
    write_files(
        folder.path(),
        &[("envoy/authz/policy.rego", &policy_source("1"))],
    );
    let store = store_for(folder.path());
    let first_generation = store.current().generation();
    let observer = Arc::new(RecordingObserver::default());
    let watcher = spawn_watcher(&store, folder.path(), &observer);

    replace_file(&policy_file, policy_source("2").as_bytes());
    wait_until("the new policy is active", || {
        active_value(&store) == Value::from(2u64)
    })
    .await;
    watcher.abort();

    let expected_revision = format!("sha256:{}", load_bundle(folder.path()).unwrap().digest());
    let current = store.current();
    assert_eq!(current.revision(), expected_revision);
    assert!(current.generation() > first_generation);
    assert_eq!(observer.reloaded(), vec![expected_revision]);
    assert_eq!(observer.failed(), Vec::<String>::new());
}

#[tokio::test]
async fn broken_bundle_keeps_previous_policy_and_reports_once() {
    let folder = tempfile::tempdir().unwrap();
    let policy_file = folder.path().join("envoy/authz/policy.rego");
    write_files(
        folder.path(),
        &[("envoy/authz/policy.rego", &policy_source("1"))],
    );
    let store = store_for(folder.path());
    let first_revision = store.current().revision().to_string();
    let observer = Arc::new(RecordingObserver::default());
    let watcher = spawn_watcher(&store, folder.path(), &observer);

    replace_file(&policy_file, b"package envoy.authz\n\nallow := \n");
    wait_until("the failure is reported", || !observer.failed().is_empty()).await;

    // Ten more polls of the same broken content must not report it again.
    tokio::time::sleep(POLL_INTERVAL * 10).await;
    let failures = observer.failed();
    assert_eq!(failures.len(), 1, "failures: {failures:?}");
    assert!(
        failures[0].starts_with("failed to parse envoy/authz/policy.rego at line"),
        "unexpected failure: {}",
        failures[0]
    );
    assert_eq!(store.current().revision(), first_revision);
    assert_eq!(active_value(&store), Value::from(1u64));

    // A fixed bundle is picked up again.
    replace_file(&policy_file, policy_source("2").as_bytes());
    wait_until("the fixed policy is active", || {
        active_value(&store) == Value::from(2u64)
    })
    .await;
    watcher.abort();

    assert_eq!(observer.reloaded().len(), 1);
    assert_eq!(observer.failed().len(), 1);
}

#[tokio::test]
async fn bundle_with_undefined_function_keeps_previous_policy() {
    let folder = tempfile::tempdir().unwrap();
    let policy_file = folder.path().join("envoy/authz/policy.rego");
    write_files(
        folder.path(),
        &[("envoy/authz/policy.rego", &policy_source("1"))],
    );
    let store = store_for(folder.path());
    let first_revision = store.current().revision().to_string();
    let observer = Arc::new(RecordingObserver::default());
    let watcher = spawn_watcher(&store, folder.path(), &observer);

    // `allow` itself would evaluate, because no input reaches the misspelt call.
    let misspelt =
        "package envoy.authz\n\nallow := 2\n\nunused := no_such_function(1) if input.never\n";
    replace_file(&policy_file, misspelt.as_bytes());
    wait_until("the failure is reported", || !observer.failed().is_empty()).await;
    tokio::time::sleep(POLL_INTERVAL * 10).await;
    watcher.abort();

    assert_eq!(
        observer.failed(),
        vec!["envoy/authz/policy.rego:5:11: undefined function no_such_function".to_string()]
    );
    assert_eq!(observer.reloaded(), Vec::<String>::new());
    assert_eq!(store.current().revision(), first_revision);
    assert_eq!(active_value(&store), Value::from(1u64));
}

#[tokio::test]
async fn unreadable_archive_is_reported_once_then_recovers() {
    let folder = tempfile::tempdir().unwrap();
    let archive = folder.path().join("bundle.tar.gz");
    let archive_bytes = |revision: &str, value: &str| {
        let manifest = format!(r#"{{"revision": "{revision}", "roots": ["envoy"]}}"#);
        tar_gz_files(&[
            (".manifest", &manifest),
            ("envoy/authz/policy.rego", &policy_source(value)),
        ])
    };
    replace_file(&archive, &archive_bytes("a1", "1"));
    let store = store_for(&archive);
    let observer = Arc::new(RecordingObserver::default());
    let watcher = spawn_watcher(&store, &archive, &observer);

    replace_file(&archive, b"not an archive");
    wait_until("the failure is reported", || !observer.failed().is_empty()).await;
    tokio::time::sleep(POLL_INTERVAL * 10).await;
    let failures = observer.failed();
    assert_eq!(failures.len(), 1, "failures: {failures:?}");
    assert!(
        failures[0].contains("is neither a folder nor a gzip-compressed tar archive"),
        "unexpected failure: {}",
        failures[0]
    );
    assert_eq!(store.current().revision(), "a1");

    replace_file(&archive, &archive_bytes("a2", "2"));
    wait_until("revision a2 is active", || {
        store.current().revision() == "a2"
    })
    .await;
    watcher.abort();

    assert_eq!(active_value(&store), Value::from(2u64));
    assert_eq!(observer.reloaded(), vec!["a2".to_string()]);
}

#[tokio::test]
async fn configmap_symlink_swap_is_detected() {
    // Kubernetes updates a ConfigMap volume by writing a new timestamped folder and
    // renaming a fresh `..data` symlink over the old one.
    let mount = tempfile::tempdir().unwrap();
    let publish = |version: &str, revision: &str, value: &str| {
        let manifest = format!(r#"{{"revision": "{revision}"}}"#);
        write_files(
            &mount.path().join(version),
            &[
                (".manifest", &manifest),
                ("policy.rego", &policy_source(value)),
            ],
        );
        let staging = mount.path().join("..data_tmp");
        std::os::unix::fs::symlink(version, &staging).unwrap();
        std::fs::rename(&staging, mount.path().join("..data")).unwrap();
    };
    publish("..2025_06_01_v1", "cm-1", "1");
    for name in [".manifest", "policy.rego"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), mount.path().join(name)).unwrap();
    }
    let store = store_for(mount.path());
    let observer = Arc::new(RecordingObserver::default());
    let watcher = spawn_watcher(&store, mount.path(), &observer);

    publish("..2025_06_01_v2", "cm-2", "2");
    wait_until("revision cm-2 is active", || {
        store.current().revision() == "cm-2"
    })
    .await;
    watcher.abort();

    assert_eq!(active_value(&store), Value::from(2u64));
    assert_eq!(observer.reloaded(), vec!["cm-2".to_string()]);
}
