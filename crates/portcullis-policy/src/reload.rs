//! The active policy and its hot reload from a bundle on disk.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::bundle::{Bundle, BundleLimits, load_bundle_with_limits};
use crate::policy::{CompileOptions, Policy};

/// Receives the outcome of each reload, for metrics and health reporting.
pub trait ReloadObserver: Send + Sync {
    /// Called after a new policy was swapped in.
    fn reloaded(&self, revision: &str);
    /// Called once per distinct failure; the previous policy stays active.
    fn reload_failed(&self, error: &str);
}

/// The active policy, replaced atomically on reload.
///
/// Readers take no lock, because [`PolicyStore::current`] is an `ArcSwap` load. A request
/// that started on the old policy finishes on it.
pub struct PolicyStore {
    current: ArcSwap<Policy>,
}

impl PolicyStore {
    /// Creates a store that serves `policy` until the first swap.
    pub fn new(policy: Policy) -> PolicyStore {
        PolicyStore {
            current: ArcSwap::from_pointee(policy),
        }
    }

    /// Returns the active policy.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Makes `policy` the active policy and returns the previous one.
    pub fn swap(&self, policy: Policy) -> Arc<Policy> {
        self.current.swap(Arc::new(policy))
    }
}

/// Settings for [`BundleWatcher::spawn_with_options`] beyond those of
/// [`BundleWatcher::spawn`].
#[derive(Debug, Clone, Default)]
pub struct ReloadOptions {
    /// Limits applied each time the bundle is read.
    pub limits: BundleLimits,
    /// Options for compiling a changed bundle.
    pub compile: CompileOptions,
}

/// Polls a bundle folder or archive and swaps in a new policy when its content changes.
///
/// Polling is deliberate: Kubernetes updates a mounted ConfigMap by swapping a symlink,
/// which file-change notifications often miss. Each poll reads and hashes the bundle files,
/// so the cost is one read of the bundle per interval.
pub struct BundleWatcher;

impl BundleWatcher {
    /// Starts watching `source` with default [`ReloadOptions`].
    ///
    /// The task runs until it is aborted: call [`JoinHandle::abort`] at shutdown.
    pub fn spawn(
        store: Arc<PolicyStore>,
        source: PathBuf,
        decision: String,
        interval: Duration,
        observer: Arc<dyn ReloadObserver>,
    ) -> JoinHandle<()> {
        BundleWatcher::spawn_with_options(
            store,
            source,
            decision,
            interval,
            observer,
            ReloadOptions::default(),
        )
    }

    /// Starts watching `source`, compiling changed bundles for the rule at `decision`.
    ///
    /// On failure the previous policy stays active, a warning is logged and
    /// [`ReloadObserver::reload_failed`] is called. The same failure is reported once: a
    /// bundle that failed to compile is not compiled again until its content changes.
    pub fn spawn_with_options(
        store: Arc<PolicyStore>,
        source: PathBuf,
        decision: String,
        interval: Duration,
        observer: Arc<dyn ReloadObserver>,
        options: ReloadOptions,
    ) -> JoinHandle<()> {
        let watcher = Watcher {
            store,
            source,
            decision,
            observer,
            options,
            last_failure: None,
        };
        tokio::spawn(watcher.run(interval))
    }
}

/// The input of the last failed reload, kept so the same failure is neither retried nor
/// reported again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// Reading the bundle failed with this message.
    Load(String),
    /// The bundle with this digest failed to compile.
    Compile(String),
}

struct Watcher {
    store: Arc<PolicyStore>,
    source: PathBuf,
    decision: String,
    observer: Arc<dyn ReloadObserver>,
    options: ReloadOptions,
    last_failure: Option<Failure>,
}

impl Watcher {
    async fn run(mut self, interval: Duration) {
        tracing::info!(
            bundle.source = %self.source.display(),
            poll.interval = ?interval,
            "watching policy bundle"
        );

        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The first tick completes at once, and the store already contains the startup policy.
        ticker.tick().await;

        loop {
            ticker.tick().await;
            self.poll().await;
        }
    }

    async fn poll(&mut self) {
        let Some(bundle) = self.load().await else {
            return;
        };

        let current = self.store.current();
        if bundle.digest() == current.digest() {
            // Unchanged, or changed back to the active content after a failed edit.
            self.last_failure = None;
            return;
        }
        let failure = Failure::Compile(bundle.digest().to_string());
        if self.last_failure.as_ref() == Some(&failure) {
            return;
        }

        let decision = self.decision.clone();
        let compile_options = self.options.compile.clone();
        let revision = bundle.revision().to_string();
        let digest = bundle.digest().to_string();
        let compiled = tokio::task::spawn_blocking(move || {
            Policy::compile_with(&bundle, &decision, &compile_options)
        })
        .await;

        match compiled {
            Ok(Ok(policy)) => {
                let generation = policy.generation();
                let previous = self.store.swap(policy);
                self.last_failure = None;
                tracing::info!(
                    bundle.source = %self.source.display(),
                    policy.revision = %revision,
                    policy.previous_revision = %previous.revision(),
                    policy.generation = generation,
                    bundle.digest = %digest,
                    "policy bundle reloaded"
                );
                self.observer.reloaded(&revision);
            }
            Ok(Err(error)) => self.report(failure, &error.to_string(), &current),
            Err(join_error) => self.report(
                failure,
                &format!("policy compilation did not finish: {join_error}"),
                &current,
            ),
        }
    }

    /// Reads the bundle on the blocking pool; reports and returns `None` on failure.
    async fn load(&mut self) -> Option<Bundle> {
        let source = self.source.clone();
        let limits = self.options.limits;
        let loaded =
            tokio::task::spawn_blocking(move || load_bundle_with_limits(&source, &limits)).await;

        let message = match loaded {
            Ok(Ok(bundle)) => return Some(bundle),
            Ok(Err(error)) => error.to_string(),
            Err(join_error) => format!("reading the bundle did not finish: {join_error}"),
        };
        let current = self.store.current();
        self.report(Failure::Load(message.clone()), &message, &current);
        None
    }

    fn report(&mut self, failure: Failure, message: &str, current: &Policy) {
        if self.last_failure.as_ref() == Some(&failure) {
            tracing::debug!(
                bundle.source = %self.source.display(),
                error = %message,
                "policy bundle still fails to reload"
            );
            return;
        }

        tracing::warn!(
            bundle.source = %self.source.display(),
            policy.revision = %current.revision(),
            error = %message,
            "policy bundle reload failed; keeping the active policy"
        );
        self.observer.reload_failed(message);
        self.last_failure = Some(failure);
    }
}
