//! The network key: the ed25519 identity behind our `PeerId`.
//!
//! Stored in libp2p's protobuf encoding, in a file only its owner can read
//! (mode 0600), written atomically (temporary file + rename) so a crash never
//! leaves half a key behind.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libp2p::identity::Keypair;
use tracing::warn;

use crate::Result;

/// A fresh random ed25519 network key.
pub fn generate_key() -> Keypair {
    Keypair::generate_ed25519()
}

/// Loads a network key saved by [`save_key`].
pub fn load_key(path: &Path) -> Result<Keypair> {
    let mode = fs::metadata(path)?.permissions().mode();
    if mode & 0o077 != 0 {
        warn!(path = %path.display(), mode = format!("{mode:o}"), "network key file is readable by others");
    }
    let bytes = fs::read(path)?;
    Ok(Keypair::from_protobuf_encoding(&bytes)?)
}

/// Saves `key` to `path` with mode 0600, replacing any file there atomically.
pub fn save_key(key: &Keypair, path: &Path) -> Result<()> {
    let bytes = key.to_protobuf_encoding()?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)?;
    // `mode` only applies to new files; an old temp file keeps its bits.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)?;
    Ok(())
}

/// Loads the key at `path`, or generates one and saves it there.
pub fn load_or_generate_key(path: &Path) -> Result<Keypair> {
    if path.exists() {
        return load_key(path);
    }
    let key = generate_key();
    save_key(&key, path)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_roundtrips_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.key");
        let key = load_or_generate_key(&path).expect("generate");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_generate_key(&path).expect("load");
        assert_eq!(key.public().to_peer_id(), again.public().to_peer_id());
        assert!(!dir.path().join("net.key.tmp").exists());
    }

    #[test]
    fn garbage_key_file_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.key");
        fs::write(&path, b"not a key").expect("write");
        assert!(matches!(load_key(&path), Err(crate::Error::Key(_))));
        assert!(matches!(
            load_key(&dir.path().join("missing")),
            Err(crate::Error::Io(_))
        ));
    }
}
