//! Files on the host that cgipool owns: atomic writes, symlinks, reading back
//! the generated unit tree, and removing only what carries cgipool's header.
use crate::render::{is_generated, Entry};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` atomically: a temporary file in the same
/// directory, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = stage(path, contents, mode)?.rename_in()?;
    sync_dir(&dir);
    Ok(())
}

/// Two files written atomically, renamed in back to back: both are written
/// and synced under temporary names first, so that between the two renames
/// there is no write or sync (a reader sees the first one new and the
/// second one old only for that moment).
pub fn write_atomic_pair(
    (first, first_contents): (&Path, &[u8]),
    (second, second_contents): (&Path, &[u8]),
    mode: u32,
) -> Result<()> {
    let a = stage(first, first_contents, mode)?;
    let b = stage(second, second_contents, mode)?;
    let dirs = [a.rename_in()?, b.rename_in()?];
    sync_dir(&dirs[0]);
    if dirs[1] != dirs[0] {
        sync_dir(&dirs[1]);
    }
    Ok(())
}

/// A file written and synced under a temporary name beside its path.
struct Staged {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
    dir: PathBuf,
}

fn stage(path: &Path, contents: &[u8], mode: u32) -> Result<Staged> {
    use std::os::unix::fs::PermissionsExt;
    let dir = parent(path)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".cgipool-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(contents)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))?;
    tmp.as_file().sync_all()?;
    Ok(Staged {
        tmp,
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
    })
}

impl Staged {
    /// Renames it into place; returns its directory (not synced yet).
    fn rename_in(self) -> Result<PathBuf> {
        let Staged { tmp, path, dir } = self;
        tmp.persist(&path)
            .with_context(|| format!("renaming into {}", path.display()))?;
        Ok(dir)
    }
}

/// Points `path` at `target` atomically (symlink under a temporary name, rename).
pub fn link_atomic(path: &Path, target: &Path) -> Result<()> {
    let dir = parent(path)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".cgipool-{}-{name}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .with_context(|| format!("creating symlink {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    sync_dir(dir);
    Ok(())
}

fn parent(path: &Path) -> Result<&Path> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => Ok(p),
        _ => bail!("{} has no parent directory", path.display()),
    }
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// True for names cgipool generates in a unit directory.
pub fn is_cgipool_name(name: &str) -> bool {
    name == "cgipool.target" || name.starts_with("cgipool-")
}

/// The cgipool-generated part of a unit directory, as the renderer would
/// describe it: our files (with the header) and our links in `.wants` dirs.
/// Files with a cgipool name but without the header are returned in `foreign`.
pub struct OnDisk {
    pub entries: BTreeMap<PathBuf, Entry>,
    pub foreign: Vec<PathBuf>,
}

pub fn read_unit_dir(unit_dir: &Path) -> Result<OnDisk> {
    let mut entries = BTreeMap::new();
    let mut foreign = Vec::new();
    let read = match fs::read_dir(unit_dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(OnDisk { entries, foreign })
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", unit_dir.display())),
    };
    for item in read {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        let ft = item.file_type()?;
        if ft.is_dir() && name.ends_with(".wants") {
            read_wants(unit_dir, &name, &mut entries)?;
        } else if ft.is_file() && is_cgipool_name(&name) {
            let contents = fs::read_to_string(item.path()).unwrap_or_default();
            if is_generated(&contents) {
                entries.insert(PathBuf::from(&name), Entry::File(contents));
            } else {
                foreign.push(item.path());
            }
        }
    }
    Ok(OnDisk { entries, foreign })
}

fn read_wants(unit_dir: &Path, dir: &str, entries: &mut BTreeMap<PathBuf, Entry>) -> Result<()> {
    let ours_dir = is_cgipool_name(dir.trim_end_matches(".wants"));
    for item in fs::read_dir(unit_dir.join(dir))? {
        let item = item?;
        let name = item.file_name().to_string_lossy().into_owned();
        if !item.file_type()?.is_symlink() || !is_cgipool_name(&name) {
            continue;
        }
        let target = fs::read_link(item.path())?;
        // Outside our own .wants dirs only links to our files are ours.
        let points_to_us = target
            .file_name()
            .map(|f| is_cgipool_name(&f.to_string_lossy()))
            .unwrap_or(false);
        if ours_dir || points_to_us {
            entries.insert(Path::new(dir).join(&name), Entry::Link(target));
        }
    }
    Ok(())
}

/// Writes one rendered entry below `unit_dir`.
pub fn write_entry(unit_dir: &Path, rel: &Path, entry: &Entry) -> Result<()> {
    let path = unit_dir.join(rel);
    match entry {
        Entry::File(text) => write_atomic(&path, text.as_bytes(), 0o644),
        Entry::Link(target) => link_atomic(&path, target),
    }
}

/// Removes one entry below `unit_dir` (only ever called for entries that
/// `read_unit_dir` reported as ours), and its `.wants` dir once empty.
pub fn remove_entry(unit_dir: &Path, rel: &Path) -> Result<()> {
    let path = unit_dir.join(rel);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    if let Some(dir) = path.parent() {
        if dir != unit_dir
            && dir
                .file_name()
                .map(|n| n.to_string_lossy().ends_with(".wants"))
                .unwrap_or(false)
        {
            let _ = fs::remove_dir(dir); // only succeeds when empty
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_link_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a/b.conf");
        write_atomic(&f, b"x", 0o644).unwrap();
        write_atomic(&f, b"y", 0o644).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"y");
        let l = dir.path().join("w.wants/cgipool-x@1.service");
        link_atomic(&l, Path::new("/etc/systemd/system/cgipool-x@.service")).unwrap();
        link_atomic(&l, Path::new("/etc/systemd/system/cgipool-x@.service")).unwrap();
        assert_eq!(
            fs::read_link(&l).unwrap(),
            PathBuf::from("/etc/systemd/system/cgipool-x@.service")
        );
        remove_entry(dir.path(), Path::new("w.wants/cgipool-x@1.service")).unwrap();
        assert!(!dir.path().join("w.wants").exists());
    }

    #[test]
    fn foreign_files_are_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgipool-hand.service"), "[Unit]\n").unwrap();
        fs::write(dir.path().join("other.service"), "[Unit]\n").unwrap();
        fs::create_dir(dir.path().join("multi-user.target.wants")).unwrap();
        std::os::unix::fs::symlink(
            "/lib/systemd/system/ssh.service",
            dir.path().join("multi-user.target.wants/ssh.service"),
        )
        .unwrap();
        let d = read_unit_dir(dir.path()).unwrap();
        assert!(d.entries.is_empty());
        assert_eq!(d.foreign, vec![dir.path().join("cgipool-hand.service")]);
    }
}
