//! Topic names, built in one place so that every part of edgesight (and its tests) agrees on
//! them. The layout is fixed by DESIGN.md: `<prefix>/<device>/status`,
//! `<prefix>/<device>/<stream>/classification`, `<prefix>/<device>/<stream>/state`,
//! `<prefix>/<device>/<stream>/status` and `<prefix>/<device>/stats`. Names are checked by
//! config validation (no `/`, `+`, `#` in the device id or stream names); this struct only
//! joins them.

/// The topic names of one device. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    base: String,
}

impl Topics {
    /// Topics under `<prefix>/<device_id>`. Trailing `/` on the prefix are dropped, so
    /// `edgesight/` and `edgesight` give the same topics; a prefix may have several levels
    /// (`site-4/edgesight`).
    pub fn new(prefix: &str, device_id: &str) -> Topics {
        let prefix = prefix.trim_end_matches('/');
        Topics { base: format!("{prefix}/{device_id}") }
    }

    /// `<prefix>/<device>`: the root of everything this device publishes.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `<prefix>/<device>/status`: retained `online` / `offline`, also the last will.
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// `<prefix>/<device>/<stream>/classification`: one message per classified frame.
    pub fn classification(&self, stream: &str) -> String {
        format!("{}/{stream}/classification", self.base)
    }

    /// `<prefix>/<device>/<stream>/state`: the retained current label of the stream.
    pub fn state(&self, stream: &str) -> String {
        format!("{}/{stream}/state", self.base)
    }

    /// `<prefix>/<device>/<stream>/status`: the retained state of the stream's source
    /// (`online`, `reconnecting`, `failed`, `ended`).
    pub fn stream_status(&self, stream: &str) -> String {
        format!("{}/{stream}/status", self.base)
    }

    /// `<prefix>/<device>/stats`: periodic statistics.
    pub fn stats(&self) -> String {
        format!("{}/stats", self.base)
    }

    /// `<prefix>/<device>/#`: a filter matching every topic above, for subscribers.
    pub fn all(&self) -> String {
        format!("{}/#", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_documented_layout() {
        let topics = Topics::new("edgesight", "box-1");
        assert_eq!(topics.base(), "edgesight/box-1");
        assert_eq!(topics.status(), "edgesight/box-1/status");
        assert_eq!(topics.classification("door"), "edgesight/box-1/door/classification");
        assert_eq!(topics.state("door"), "edgesight/box-1/door/state");
        assert_eq!(topics.stats(), "edgesight/box-1/stats");
        assert_eq!(topics.stream_status("door"), "edgesight/box-1/door/status");
        assert_eq!(topics.all(), "edgesight/box-1/#");
    }

    #[test]
    fn ignores_trailing_slashes_on_the_prefix() {
        assert_eq!(Topics::new("edgesight//", "b"), Topics::new("edgesight", "b"));
    }

    #[test]
    fn keeps_a_multi_level_prefix() {
        let topics = Topics::new("site-4/edgesight", "cam");
        assert_eq!(topics.status(), "site-4/edgesight/cam/status");
    }
}
