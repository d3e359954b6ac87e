//! Secrets (passwords) named in configuration: read from an environment
//! variable or a file, held only in memory, never printed.

use std::fmt;

/// Where a secret comes from. Displaying it shows the source, not the value.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(String),
    Plain,
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(v) => write!(f, "<redacted, from env {v}>"),
            SecretSource::File(p) => write!(f, "<redacted, from file {p}>"),
            SecretSource::Plain => write!(f, "<redacted, inline>"),
        }
    }
}

/// A secret value with its source; `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    pub source: SecretSource,
    value: Vec<u8>,
}

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.value
    }

    /// Reads the secret now. Errors name the source, never the content.
    pub fn load(source: SecretSource, inline: Option<&str>) -> Result<Secret, String> {
        let mut value = match &source {
            SecretSource::Env(var) => std::env::var_os(var)
                .ok_or_else(|| format!("environment variable {var} is not set"))?
                .into_encoded_bytes(),
            SecretSource::File(path) => read_bounded(path)?,
            SecretSource::Plain => inline.unwrap_or_default().as_bytes().to_vec(),
        };
        // Files written by `echo` or mounted Secrets often end with a newline.
        if matches!(source, SecretSource::File(_)) {
            if value.ends_with(b"\n") {
                value.pop();
            }
            if value.ends_with(b"\r") {
                value.pop();
            }
        }
        if value.is_empty() {
            return Err(format!("the secret from {source} is empty"));
        }
        Ok(Secret { source, value })
    }
}

/// Longest secret file read: a password, not whatever a path points at
/// (`/dev/zero` must not exhaust memory, even on a reload).
const MAX_SECRET_FILE: u64 = 64 * 1024;

fn read_bounded(path: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    if !file
        .metadata()
        .map_err(|e| format!("cannot read {path}: {e}"))?
        .is_file()
    {
        return Err(format!("{path} is not a regular file"));
    }
    let mut value = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut value)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if value.len() as u64 > MAX_SECRET_FILE {
        return Err(format!(
            "{path} is larger than {MAX_SECRET_FILE} bytes; not a password file"
        ));
    }
    Ok(value)
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_lose_one_trailing_newline_and_values_never_print() {
        let dir = std::env::temp_dir().join(format!("pubwarden-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        std::fs::write(&path, "hunter2\n").unwrap();
        let s = Secret::load(SecretSource::File(path.display().to_string()), None).unwrap();
        assert_eq!(s.expose(), b"hunter2");
        assert!(!format!("{s} {s:?}").contains("hunter2"));
        assert!(
            Secret::load(SecretSource::Env("PUBWARDEN_SURELY_UNSET_VAR".into()), None).is_err()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
