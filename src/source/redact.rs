//! Keeping camera credentials out of logs, errors and status payloads.
//!
//! RTSP cameras are often configured as `rtsp://admin:secret@10.0.0.5/stream1`. The address is
//! worth showing (which camera failed?) but the password is not, and GStreamer's own error
//! texts may quote the address they were given. So the credentials are taken out of the URL
//! before it reaches GStreamer ([`split_credentials`]), addresses are shown through
//! [`redact_url`], and every text that leaves a source passes through a [`Redactor`] that knows
//! the stream's secrets, as a second line of defence.

use crate::config::StreamSettings;

/// What replaces a secret.
const MASK: &str = "***";

/// `scheme://user:password@host/…` → `scheme://user:***@host/…`; an address without a
/// password is returned as it is. Only the authority part is looked at, so an `@` in the path
/// or query is left alone.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let (userinfo, host) = (&authority[..at], &authority[at + 1..]);
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:{MASK}"),
        None => userinfo.to_string(),
    };
    format!("{scheme}://{user}@{host}{tail}")
}

/// The address without its user information, and the user name and password it carried
/// (percent-decoded), if any.
pub fn split_credentials(url: &str) -> (String, Option<(String, String)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_string(), None);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some(at) = authority.rfind('@') else {
        return (url.to_string(), None);
    };
    let (userinfo, host) = (&authority[..at], &authority[at + 1..]);
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let clean = format!("{scheme}://{host}{tail}");
    (clean, Some((percent_decode(user), percent_decode(password))))
}

/// `%40` → `@`; anything that is not a valid escape stays as written.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = bytes.get(index + 1..index + 3).and_then(|hex| {
            std::str::from_utf8(hex).ok().and_then(|hex| u8::from_str_radix(hex, 16).ok())
        });
        match (bytes[index], escape) {
            (b'%', Some(byte)) => {
                out.push(byte);
                index += 3;
            }
            (byte, _) => {
                out.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Masks a stream's secrets (its `password`, and the password inside its `url`, raw and
/// decoded) in any text.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn for_stream(settings: &StreamSettings) -> Redactor {
        let mut secrets = Vec::new();
        if let Some(password) = &settings.password {
            secrets.push(password.clone());
        }
        if let Some(url) = &settings.url
            && let (_, Some((_, password))) = split_credentials(url)
        {
            secrets.push(password);
            if let Some((_, rest)) = url.split_once("://")
                && let Some(userinfo) = rest.split(['/', '?', '#']).next()
                && let Some((userinfo, _)) = userinfo.rsplit_once('@')
                && let Some((_, raw)) = userinfo.split_once(':')
            {
                secrets.push(raw.to_string());
            }
        }
        // Longest first, so a secret that contains another is masked whole; an empty or
        // one-character password would mask half the text and protects nothing anyway.
        secrets.retain(|secret| secret.chars().count() > 1);
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    /// `text` with every secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), MASK);
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_the_password_of_an_address() {
        assert_eq!(
            redact_url("rtsp://admin:hunter2@10.0.0.5:554/live?x=1"),
            "rtsp://admin:***@10.0.0.5:554/live?x=1"
        );
        assert_eq!(redact_url("rtsp://10.0.0.5/live"), "rtsp://10.0.0.5/live");
        assert_eq!(redact_url("rtsp://token@cam/live"), "rtsp://token@cam/live");
        assert_eq!(redact_url("rtsp://cam/live@night"), "rtsp://cam/live@night");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("rtsp://a:p@ss@cam/x"), "rtsp://a:***@cam/x");
    }

    #[test]
    fn splits_and_decodes_credentials() {
        let (clean, credentials) = split_credentials("rtsp://ad%40min:p%3Ass@cam:8554/a");
        assert_eq!(clean, "rtsp://cam:8554/a");
        assert_eq!(credentials, Some(("ad@min".into(), "p:ss".into())));
        assert_eq!(split_credentials("rtsp://cam/a"), ("rtsp://cam/a".into(), None));
        assert_eq!(percent_decode("100%"), "100%");
    }

    #[test]
    fn scrubs_every_form_of_the_secrets() {
        let settings = StreamSettings {
            url: Some("rtsp://u:s%23cret@cam/a".into()),
            password: Some("other-pw".into()),
            ..StreamSettings::default()
        };
        let redactor = Redactor::for_stream(&settings);
        let text = "failed rtsp://u:s%23cret@cam/a (s#cret) with other-pw";
        let scrubbed = redactor.scrub(text);
        assert_eq!(scrubbed, "failed rtsp://u:***@cam/a (***) with ***");
        assert_eq!(Redactor::default().scrub(text), text);
    }
}
