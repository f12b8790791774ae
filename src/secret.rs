//! Secret values: where they come from (`env`, `file`, literal) and a type that cannot print them.

use std::fmt;
use std::path::{Path, PathBuf};

use http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// How a secret is given in the config file.
///
/// `{ env = "NAME" }` and `{ file = "/path" }` are the production forms; a plain string is
/// accepted for local development and logged as a warning at load.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SecretSpec {
    /// Read from an environment variable.
    Env {
        /// The variable's name.
        env: String,
    },
    /// Read from a file; one trailing newline (`\n` or `\r\n`) is trimmed.
    File {
        /// The file's path.
        file: PathBuf,
    },
    /// The value itself, written in the config file (development only).
    Literal(String),
}

impl fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env { env } => write!(f, "env:{env}"),
            Self::File { file } => write!(f, "file:{}", file.display()),
            Self::Literal(_) => f.write_str("literal:[redacted]"),
        }
    }
}

/// Why a secret could not be resolved. Names the source, never the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} is not set")]
    EnvMissing(String),
    #[error("environment variable {0} is not valid UTF-8")]
    EnvNotUnicode(String),
    #[error("cannot read secret file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("the secret is empty")]
    Empty,
    #[error("the secret contains characters not allowed in an HTTP header")]
    NotHeaderSafe,
}

impl SecretSpec {
    /// Reads the value now. Literals are returned as they are.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        let value = match self {
            Self::Env { env } => match std::env::var(env) {
                Ok(v) => v,
                Err(std::env::VarError::NotPresent) => {
                    return Err(SecretError::EnvMissing(env.clone()))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(SecretError::EnvNotUnicode(env.clone()))
                }
            },
            Self::File { file } => read_secret_file(file)?,
            Self::Literal(v) => v.clone(),
        };
        if value.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Secret(SecretString::from(value)))
    }

    /// The file this secret is read from, if any (watched for rotation).
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::File { file } => Some(file),
            _ => None,
        }
    }

    /// Whether the value is written in the config file itself.
    pub fn is_literal(&self) -> bool {
        matches!(self, Self::Literal(_))
    }
}

fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    let mut s = std::fs::read_to_string(path).map_err(|e| SecretError::File {
        path: path.to_owned(),
        reason: e.kind().to_string(),
    })?;
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Ok(s)
}

/// A resolved secret. `Debug` prints `[redacted]`; there is no `Display`.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// The value, for the few places that must send it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// A header value holding the secret, marked sensitive so that no layer logs it
    /// and HPACK never indexes it.
    pub fn header_value(&self) -> Result<HeaderValue, SecretError> {
        sensitive_header(self.expose())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(SecretString::from(s))
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Builds a header value from secret text, marked sensitive.
pub fn sensitive_header(value: &str) -> Result<HeaderValue, SecretError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| SecretError::NotHeaderSafe)?;
    v.set_sensitive(true);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_value() {
        let s = SecretSpec::Literal("hunter2-literal".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        let r = s.resolve().unwrap();
        assert_eq!(format!("{r:?}"), "[redacted]");
        assert!(r.header_value().unwrap().is_sensitive());
    }

    #[test]
    fn file_secret_trims_one_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("credgate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s");
        std::fs::write(&p, "abc\r\n").unwrap();
        let spec = SecretSpec::File { file: p.clone() };
        assert_eq!(spec.resolve().unwrap().expose(), "abc");
        std::fs::remove_file(&p).unwrap();
        let err = spec.resolve().unwrap_err().to_string();
        assert!(err.contains("cannot read secret file"), "{err}");
    }

    #[test]
    fn missing_env_names_the_variable() {
        let spec = SecretSpec::Env {
            env: "CREDGATE_TEST_SURELY_UNSET_VAR".into(),
        };
        let err = spec.resolve().unwrap_err().to_string();
        assert_eq!(
            err,
            "environment variable CREDGATE_TEST_SURELY_UNSET_VAR is not set"
        );
    }
}
