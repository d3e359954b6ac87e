//! Live policy reload: on SIGHUP, on `POST /reload`, and when the policy
//! file's content changes.
//!
//! The file is re-read and compared by content every `interval` rather than
//! through inotify: Kubernetes updates a mounted ConfigMap by swapping a
//! symlink to a new directory, which file-level watches miss and directory
//! watches report as a burst of events; reading a small file once a second
//! sees every kind of update, once. A new policy is parsed and validated
//! whole before it replaces the old one atomically; a bad one changes
//! nothing and every error is logged with its key path and line.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::gate::PolicyRuntime;
use super::schema;
use crate::config::yaml::ConfigErrors;
use crate::config::{Overrides, Settings};
use crate::metrics::Metrics;

/// Reloads one policy file into a running [`PolicyRuntime`].
pub struct Reloader {
    path: PathBuf,
    runtime: Arc<PolicyRuntime>,
    metrics: Arc<Metrics>,
    /// Content hash of the policy in force, so an unchanged file is no reload.
    loaded: Mutex<Option<[u8; 32]>>,
    /// The settings file and the settings running now, to report edits that
    /// need a restart instead of ignoring them silently.
    settings: Option<(PathBuf, Settings)>,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Reloaded,
    Unchanged,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        runtime: Arc<PolicyRuntime>,
        metrics: Arc<Metrics>,
        settings: Option<(PathBuf, Settings)>,
    ) -> Self {
        let loaded = std::fs::read(&path).ok().map(|b| Sha256::digest(&b).into());
        Self {
            path,
            runtime,
            metrics,
            loaded: Mutex::new(loaded),
            settings,
        }
    }

    /// Re-reads the policy. `force`: reload even if the content is unchanged
    /// (an operator asked explicitly).
    pub fn reload(&self, trigger: &str, force: bool) -> Result<Outcome, ConfigErrors> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let errors = ConfigErrors(vec![crate::config::yaml::ConfigError {
                    path: String::new(),
                    pos: Default::default(),
                    message: format!("cannot read policy {}: {e}", self.path.display()),
                }]);
                self.failed(trigger, &errors);
                return Err(errors);
            }
        };
        let hash: [u8; 32] = Sha256::digest(&text).into();
        let Ok(mut loaded) = self.loaded.lock() else {
            return Ok(Outcome::Unchanged);
        };
        if !force && *loaded == Some(hash) {
            return Ok(Outcome::Unchanged);
        }
        let parsed = std::str::from_utf8(&text)
            .map_err(|_| {
                ConfigErrors(vec![crate::config::yaml::ConfigError {
                    path: String::new(),
                    pos: Default::default(),
                    message: "the policy file is not UTF-8".into(),
                }])
            })
            .and_then(schema::parse);
        match parsed {
            Ok(policy) => {
                let users = policy.users.len();
                self.runtime.replace(policy);
                *loaded = Some(hash);
                self.metrics.config_reload(true);
                tracing::info!(trigger, path = %self.path.display(), users, "policy reloaded");
                self.report_settings_edits();
                Ok(Outcome::Reloaded)
            }
            Err(errors) => {
                // Remember the bad content so the watcher does not repeat the
                // same errors every second; an explicit reload still retries.
                *loaded = Some(hash);
                self.failed(trigger, &errors);
                Err(errors)
            }
        }
    }

    fn failed(&self, trigger: &str, errors: &ConfigErrors) {
        self.metrics.config_reload(false);
        tracing::error!(trigger, path = %self.path.display(), problems = errors.0.len(), "policy reload failed; the previous policy stays in force");
        for e in &errors.0 {
            tracing::error!(trigger, "  {e}");
        }
    }

    /// Settings are read once at start: say so when the file was edited.
    fn report_settings_edits(&self) {
        let Some((path, running)) = &self.settings else {
            return;
        };
        match Settings::load(path, &Overrides::default()) {
            Ok(mut now) => {
                // Flags and environment variables override the file; the
                // policy path is what is being reloaded.
                now.listen = running.listen;
                now.upstream.address.clone_from(&running.upstream.address);
                now.admin.listen = running.admin.listen;
                now.policy.clone_from(&running.policy);
                if now != *running {
                    tracing::warn!(path = %path.display(), "the settings file changed; settings other than the policy need a restart to apply");
                }
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), problems = e.0.len(), "the settings file has errors; they would stop a restart: {e}");
            }
        }
    }
}

impl crate::reload::Reload for Reloader {
    fn reload_now(&self, trigger: &'static str, force: bool) {
        let _ = self.reload(trigger, force);
    }
}
