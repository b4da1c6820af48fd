//! Validation of the spool and TLS keys of `[mqtt]`, and where the spool lives.

use std::path::{Path, PathBuf};

use super::Settings;

impl Settings {
    /// The spool and TLS keys of `[mqtt]`.
    pub(super) fn validate_publisher(&self, problem: &mut impl FnMut(&str, String)) {
        let mqtt = &self.mqtt;
        if mqtt.spool_max_mb == 0 {
            problem("mqtt.spool_max_mb", "must be at least 1 (MiB)".into());
        }
        if mqtt.spool_dir.as_ref().is_some_and(|dir| dir.as_os_str().is_empty()) {
            problem("mqtt.spool_dir", "must not be empty; leave it out for the default".into());
        }
        let Some(tls) = &mqtt.tls else { return };
        if tls.ca_file.is_none() {
            problem("mqtt.tls.ca_file", "required when [mqtt.tls] is present".into());
        }
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            problem("mqtt.tls.key_file", "cert_file and key_file go together".into());
        }
        if tls.server_name.as_ref().is_some_and(|name| name.trim().is_empty()) {
            problem("mqtt.tls.server_name", "must not be empty; leave it out for mqtt.host".into());
        }
    }

    /// The spool directory: `mqtt.spool_dir`, else `$STATE_DIRECTORY/spool` (systemd), else
    /// `<cache dir>/spool/<client_id>`.
    pub fn spool_dir(&self, cache_dir: &Path) -> PathBuf {
        if let Some(dir) = &self.mqtt.spool_dir {
            return dir.clone();
        }
        // systemd may pass several directories separated by colons; the first is ours.
        let state = std::env::var_os("STATE_DIRECTORY").filter(|dir| !dir.is_empty());
        if let Some(first) = state.as_ref().and_then(|dirs| std::env::split_paths(dirs).next()) {
            return first.join("spool");
        }
        cache_dir.join("spool").join(self.client_id())
    }
}
