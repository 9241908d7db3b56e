//! Where this cgipool is installed, for the paths that end up in generated
//! units (watch's `ExecStart`, the default `gateway` of CGI pools).
//!
//! The units follow the running binary: `/usr/bin/cgipool` when installed
//! from the Debian package, `/usr/local/bin/cgipool` after `cargo install
//! --root /usr/local`. Never a fixed prefix.

use std::path::{Path, PathBuf};

/// Used when the running binary cannot be found (no `/proc`): where the
/// Debian package installs cgipool.
pub const PACKAGED_BINARY: &str = "/usr/bin/cgipool";

/// The canonical path of the running cgipool binary.
///
/// Linux reports a binary that was replaced while it runs (a package
/// upgrade unpacks the new file, then renames it over the old one) as
/// `PATH (deleted)`; the suffix is dropped, so a daemon that outlives its
/// binary keeps rendering the same units. Unit tests get
/// [`PACKAGED_BINARY`] so that golden files do not depend on where cargo
/// put the test binary.
pub fn cgipool_binary() -> PathBuf {
    if cfg!(test) {
        return PathBuf::from(PACKAGED_BINARY);
    }
    match std::env::current_exe() {
        Ok(exe) => resolve(&exe),
        Err(_) => PathBuf::from(PACKAGED_BINARY),
    }
}

/// `exe` without a ` (deleted)` suffix, canonicalised when it exists.
fn resolve(exe: &Path) -> PathBuf {
    let s = exe.to_string_lossy();
    let live = match s.strip_suffix(" (deleted)") {
        Some(stripped) if !exe.exists() => PathBuf::from(stripped),
        _ => exe.to_path_buf(),
    };
    std::fs::canonicalize(&live).unwrap_or(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_tests_render_the_packaged_path() {
        assert_eq!(cgipool_binary(), Path::new(PACKAGED_BINARY));
    }

    #[test]
    fn follows_symlinks_to_the_real_binary() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real-cgipool");
        std::fs::write(&real, b"").unwrap();
        let link = dir.path().join("cgipool");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(resolve(&link), std::fs::canonicalize(&real).unwrap());
    }

    #[test]
    fn a_replaced_binary_keeps_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let canon = std::fs::canonicalize(dir.path()).unwrap();
        // The new binary is in place: the path is the live file's.
        std::fs::write(canon.join("cgipool"), b"").unwrap();
        let deleted = PathBuf::from(format!("{}/cgipool (deleted)", canon.display()));
        assert_eq!(resolve(&deleted), canon.join("cgipool"));
        // Removed for good: still the path without the suffix.
        std::fs::remove_file(canon.join("cgipool")).unwrap();
        assert_eq!(resolve(&deleted), canon.join("cgipool"));
    }

    #[test]
    fn a_file_really_named_deleted_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let odd = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("cgipool (deleted)");
        std::fs::write(&odd, b"").unwrap();
        assert_eq!(resolve(&odd), odd);
    }
}
