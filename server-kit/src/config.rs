//! Settings errors and files. Each server layers command-line flags over environment
//! variables (both by `clap`) over an optional TOML file over defaults; a bad value is
//! reported with the key that holds it.

use std::net::SocketAddr;
use std::path::Path;

use serde::de::DeserializeOwned;

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {key}: {message}")]
pub struct ConfigError {
    /// The key, as in the config file.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// A `map_err` adapter: the message of a failed parse, under `key`.
    pub fn at(key: &str) -> impl FnOnce(String) -> ConfigError {
        let key = key.to_owned();
        move |message| ConfigError { key, message }
    }
}

/// Reads a TOML file of settings; errors are reported under the key `config`.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        key: "config".into(),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    toml::from_str(&text).map_err(|e| ConfigError {
        key: "config".into(),
        message: format!("{}: {}", path.display(), e.message()),
    })
}

/// The address to listen on: `bind` (default `0.0.0.0`) and `port`. A `bind` that is not an
/// IP address is reported under the key `bind`.
pub fn listen_addr(bind: Option<String>, port: u16) -> Result<SocketAddr, ConfigError> {
    let bind = bind.unwrap_or_else(|| "0.0.0.0".into());
    format!("{bind}:{port}")
        .parse()
        .map_err(|_| ConfigError::at("bind")(format!("{bind:?} is not an IP address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_binds_and_files_name_their_key() {
        assert_eq!(
            listen_addr(None, 7).map(|a| a.to_string()).ok(),
            Some("0.0.0.0:7".to_owned())
        );
        let err = listen_addr(Some("localhost".into()), 7).unwrap_err();
        assert_eq!(
            (err.key.as_str(), err.message.as_str()),
            ("bind", "\"localhost\" is not an IP address")
        );
        let missing = read_toml::<toml::Table>(Path::new("/nonexistent/qbus.toml")).unwrap_err();
        assert_eq!(missing.key, "config");
    }
}
