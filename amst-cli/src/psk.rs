//! The pre-shared key, from a file or the `AMST_PSK` environment variable, never from an
//! argument: arguments land in shell history and in `ps` output for every local user.

use std::path::Path;

use amst_core::codec::Psk;

use crate::error::{CliResult, Failure, FailureKind};

/// The environment variable that may hold the key.
pub const PSK_ENV: &str = "AMST_PSK";

/// Loads the key: `--psk-file` wins over `AMST_PSK`. Trailing whitespace (the newline an
/// editor or `echo` adds) is not part of the key, so `openssl rand -hex 32 > key` just works.
pub fn load(file: Option<&Path>, env_value: Option<&str>) -> CliResult<Psk> {
    let (bytes, source) = match (file, env_value) {
        (Some(path), _) => {
            let bytes = std::fs::read(path).map_err(|e| {
                Failure::new(
                    FailureKind::Usage,
                    format!(
                        "cannot read the pre-shared key file {}: {e}",
                        path.display()
                    ),
                )
            })?;
            warn_if_readable_by_others(path);
            (bytes, format!("the key file {}", path.display()))
        }
        (None, Some(v)) => (v.as_bytes().to_vec(), format!("${PSK_ENV}")),
        (None, None) => {
            return Err(Failure::usage(format!(
                "no pre-shared key: pass --psk-file FILE or set {PSK_ENV} (the same key on both \
                 sides; create one with `openssl rand -hex 32 > amst.key`)"
            )));
        }
    };
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    Psk::new(&bytes[..end]).map_err(|e| {
        Failure::new(
            FailureKind::Auth,
            format!("the pre-shared key from {source} is unusable: {e}"),
        )
    })
}

/// A fresh random key, for `amst demo`, where both ends live in one process.
pub fn random() -> Psk {
    let bytes: [u8; 32] = amst_core::codec::random_bytes();
    Psk::new(&bytes).expect("32 bytes is above the minimum key length")
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            "the pre-shared key file {} is readable by other users; consider chmod 600",
            path.display()
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_wins_over_env_and_whitespace_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "0123456789abcdef\n").unwrap();
        assert!(load(Some(&path), Some("short")).is_ok());
        std::fs::write(&path, "short  \n").unwrap();
        let e = load(Some(&path), None).unwrap_err();
        assert_eq!(e.kind, FailureKind::Auth);
        assert!(
            e.message.contains("unusable") && e.message.contains("at least"),
            "{e}"
        );
    }

    #[test]
    fn missing_key_and_missing_file_are_explained() {
        let e = load(None, None).unwrap_err();
        assert!(
            e.message.contains("--psk-file") && e.message.contains(PSK_ENV),
            "{e}"
        );
        let e = load(Some(Path::new("/nonexistent/amst.key")), None).unwrap_err();
        assert!(e.message.contains("/nonexistent/amst.key"), "{e}");
        assert!(load(None, Some("a long enough key")).is_ok());
    }
}
